"""RLCF: test-time adaptation with CLIP reward feedback (Zhao et al., ICLR 2024; repo mzhaoshuai/RLCF).

Per request: TPT's 64 views; keep the 10 % lowest-entropy views of the policy (the CLIP being
served); a second, frozen, usually larger *reward* CLIP encodes those views once; for each view
the policy's top-K = 3 classes are the "samples", each rewarded by CLIPScore
r = max(0, 2.5 cos(reward image, reward class text)); the baseline is the mean reward of the
view's K samples; loss = mean over samples of (r - baseline) * CE(policy logits, sample);
3 AdamW steps (weight decay 5e-4), then predict on the original view. Two policies:

- ``variant="prompt"`` (TPT/tpt_cls_rl.py, lr 7e-3): the 4 prompt-context vectors;
- ``variant="image"`` (TPT/tune_cls_rl.py, lr 1e-5): the image encoder, all of it
  (``image_params="full"``, the script's setting) or its LayerNorms only (``"norm"``).

The policy is restored bit-exactly after every request, also on error: the CLIP is shared with
the other methods of the worker. The reward model's class text features are computed once per
label set. The reward model is a deployment setting (``reward_model``: any `tta.models.load_model`
spec, default ``ViT-L-14:openai`` as in the paper; ``policy`` reuses the served CLIP), loaded
lazily once per worker on the policy's device.

Differences from the reference: fp32 instead of AMP; the policy's image encoder stays in eval
mode during the image variant's steps (open_clip ViTs have no dropout or BatchNorm at test
time, so only patch-dropout, off by default, would differ); selected views are resized to the
reward model's input size with antialiased bilinear instead of bicubic interpolation.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from tta.errors import BadRequest
from tta.faults import check_deadline, check_step
from tta.features import encode_images
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, check, register
from tta.methods.tpt import PromptCache
from tta.models import ClipModel, load_model
from tta.prompts import DEFAULT_CTX_INIT
from tta.scoring import select_confident
from tta.text import LabelSet, TextFeatureCache
from tta.views import ViewSpec, make_views, normalize, resize_batch

log = logging.getLogger(__name__)

DEFAULT_REWARD_MODEL = "ViT-L-14:openai"
POLICY_AS_REWARD = "policy"
LR_DEFAULTS = {"prompt": 7e-3, "image": 1e-5}
DEPLOYMENT_ONLY = ("reward_model", "preload_reward_model")


@dataclass(frozen=True)
class RLCFOptions(MethodOptions):
    """Defaults of TPT/scripts/rlcf-prompt.sh and rlcf-tune.sh (ViT-L/14 reward, K = 3, 3 steps)."""

    variant: Literal["prompt", "image"] = "prompt"
    image_params: Literal["full", "norm"] = "full"
    n_views: int = 64
    selection_p: float = 0.1
    sample_k: int = 3
    steps: int = 3
    lr: float | None = None  # None: 7e-3 (prompt) or 1e-5 (image)
    weight_decay: float = 5e-4
    clipscore_weight: float = 2.5
    reward_baseline: bool = True  # subtract the mean reward of each view's K samples
    n_ctx: int = 4
    ctx_init: str = DEFAULT_CTX_INIT
    augmix: bool = False
    reward_model: str = DEFAULT_REWARD_MODEL
    preload_reward_model: bool = False

    def validate(self) -> None:
        check(1 <= self.n_views <= 512, "n_views must be in [1, 512]")
        check(0.0 < self.selection_p <= 1.0, "selection_p must be in (0, 1]")
        check(1 <= self.sample_k <= 100, "sample_k must be in [1, 100]")
        check(0 <= self.steps <= 16, "steps must be in [0, 16]")
        check(self.lr is None or 0.0 <= self.lr <= 1.0, "lr must be in [0, 1]")
        check(0.0 <= self.weight_decay <= 1.0, "weight_decay must be in [0, 1]")
        check(0.0 < self.clipscore_weight <= 100.0, "clipscore_weight must be in (0, 100]")
        check(1 <= self.n_ctx <= 16, "n_ctx must be in [1, 16]")
        check(bool(self.reward_model.strip()), "reward_model must be a model spec or 'policy'")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else LR_DEFAULTS[self.variant]


def clip_scores(reward_image_features: torch.Tensor, reward_text_features: torch.Tensor,
                weight: float = 2.5) -> torch.Tensor:
    """CLIPScore of every (view, class) pair [B, C]: max(0, w * cos), features already normalised."""
    return (weight * reward_image_features @ reward_text_features.t()).clamp(min=0.0)


def rlcf_loss(logits: torch.Tensor, scores: torch.Tensor, k: int, baseline: bool = True) -> torch.Tensor:
    """REINFORCE with CLIP reward: the policy's top-k classes of each view are its samples,
    weighted by reward minus the mean reward of that view's samples."""
    k = min(k, logits.shape[-1])
    samples = logits.detach().topk(k, dim=-1).indices  # [B, k]
    rewards = scores.gather(1, samples)
    if baseline and k > 1:
        rewards = rewards - rewards.mean(dim=-1, keepdim=True)
    ce = F.cross_entropy(logits.repeat_interleave(k, dim=0), samples.flatten(), reduction="none")
    return (rewards.flatten().detach() * ce).mean()


def trainable_image_params(clip: ClipModel, which: str) -> list[torch.nn.Parameter]:
    """The image-encoder parameters RLCF's image variant updates: all, or LayerNorm affines only."""
    visual = clip.model.visual
    if which == "full":
        return list(visual.parameters())
    return [p for m in visual.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()]


@contextlib.contextmanager
def restored(params: list[torch.nn.Parameter]) -> Iterator[list[torch.nn.Parameter]]:
    """Make `params` trainable for one request and put them back bit-exactly (and frozen) after."""
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        with torch.no_grad():
            for p, s, flag in zip(params, saved, flags, strict=True):
                p.copy_(s)
                p.grad = None
                p.requires_grad_(flag)


def to_model_views(views: torch.Tensor, source: ClipModel, target: ClipModel) -> torch.Tensor:
    """Re-express views normalised for `source` in `target`'s input size and normalisation."""
    if (source.image_size, source.mean, source.std) == (target.image_size, target.mean, target.std):
        return views.to(target.device)
    mean = torch.tensor(source.mean, device=views.device).view(1, -1, 1, 1)
    std = torch.tensor(source.std, device=views.device).view(1, -1, 1, 1)
    pixels = (views * std + mean).clamp(0.0, 1.0)
    return normalize(resize_batch(pixels, target.image_size), target.mean, target.std).to(target.device)


@register
class RLCF(Method):
    name = "rlcf"
    scope = "episodic"
    Options = RLCFOptions
    description = "policy-gradient update rewarded by a larger frozen CLIP (prompt or image encoder); 2 models"

    def __init__(self, clip, defaults=None) -> None:  # noqa: ANN001 (signature of Method)
        super().__init__(clip, defaults)
        self.prompts = PromptCache()
        self.reward_text = TextFeatureCache(max_entries=8)
        self._reward: ClipModel | None = None
        self._reward_lock = threading.Lock()
        if self.defaults.preload_reward_model:  # type: ignore[attr-defined]
            self.reward_clip()

    def parse_options(self, overrides: Mapping[str, Any] | None) -> MethodOptions:
        opts = super().parse_options(overrides)
        for name in DEPLOYMENT_ONLY:
            if getattr(opts, name) != getattr(self.defaults, name):
                raise BadRequest(f"option '{name}' is set by the deployment, not per request", code="bad_options")
        return opts

    # --- the reward model ------------------------------------------------------------------
    def reward_clip(self) -> ClipModel:
        """The frozen reward CLIP, loaded once per method instance (ModelUnavailable if it cannot be)."""
        with self._reward_lock:
            if self._reward is None:
                spec = self.defaults.reward_model  # type: ignore[attr-defined]
                if spec == POLICY_AS_REWARD:
                    self._reward = self.clip
                else:
                    self._reward = load_model(spec, device=self.clip.device)
                    log.info("rlcf reward model %s loaded", spec)
            return self._reward

    def use_reward_model(self, clip: ClipModel) -> None:
        """Inject an already loaded reward model (tests, benchmarks, custom loaders)."""
        with self._reward_lock:
            self._reward = clip
        self.reward_text = TextFeatureCache(max_entries=8)

    def reward_scores(self, views: torch.Tensor, labels: LabelSet, weight: float) -> torch.Tensor:
        """CLIPScore [B, C] of the given policy-normalised views against every class."""
        reward = self.reward_clip()
        text = self.reward_text.get(reward, labels)
        feats = encode_images(reward, to_model_views(views, self.clip, reward))
        return clip_scores(feats, text, weight).to(self.clip.device)

    # --- the method ------------------------------------------------------------------------
    def predict(self, request: MethodInput) -> MethodOutput:
        opts: RLCFOptions = request.options  # type: ignore[assignment]
        clip = self.clip
        timer = request.timer
        with timer.stage("augment"):
            views = make_views(request.image, clip.image_size, clip.mean, clip.std,
                               ViewSpec(n_views=opts.n_views, augmix=opts.augmix),
                               generator=request.generator, device=clip.device)
        check_deadline(request.deadline, "encoding")
        with timer.stage("encode"):
            feats = encode_images(clip, views)
        check_deadline(request.deadline, "the reward model")
        if opts.variant == "prompt":
            probs = self._adapt_prompt(request, opts, views, feats)
        else:
            probs = self._adapt_image(request, opts, views, feats)
        zeroshot = (clip.logit_scale * feats[:1] @ request.text_features.t()).softmax(-1)[0]
        return MethodOutput(probs=probs, zeroshot_probs=zeroshot, image_features=feats[0])

    def _adapt_prompt(self, request: MethodInput, opts: RLCFOptions, views: torch.Tensor,
                      feats: torch.Tensor) -> torch.Tensor:
        timer = request.timer
        scale = self.clip.logit_scale
        learner = self.prompts.get(self, request.labels, opts.n_ctx, opts.ctx_init)
        with learner.episode():
            with torch.no_grad():
                selected = select_confident(scale * feats @ learner.text_features().t(), opts.selection_p)
            with timer.stage("reward"):
                scores = self.reward_scores(views[selected], request.labels, opts.clipscore_weight)
            with timer.stage("adapt"), torch.enable_grad():
                optimizer = torch.optim.AdamW([learner.ctx], lr=opts.learning_rate, weight_decay=opts.weight_decay)
                first_loss: float | None = None
                for step in range(opts.steps):
                    check_deadline(request.deadline, f"adaptation step {step}")
                    logits = scale * feats[selected] @ learner.text_features().t()
                    loss = rlcf_loss(logits, scores, opts.sample_k, opts.reward_baseline)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    first_loss = check_step(loss, [learner.ctx], first_loss, step)
            with timer.stage("predict"), torch.no_grad():
                return (scale * feats[:1] @ learner.text_features().t()).softmax(-1)[0]

    def _adapt_image(self, request: MethodInput, opts: RLCFOptions, views: torch.Tensor,
                     feats: torch.Tensor) -> torch.Tensor:
        timer = request.timer
        clip = self.clip
        scale = clip.logit_scale
        text = request.text_features
        selected = select_confident(scale * feats @ text.t(), opts.selection_p)
        with timer.stage("reward"):
            scores = self.reward_scores(views[selected], request.labels, opts.clipscore_weight)
        chosen = views[selected]
        with restored(trainable_image_params(clip, opts.image_params)) as params:
            with timer.stage("adapt"), torch.enable_grad():
                optimizer = torch.optim.AdamW(params, lr=opts.learning_rate, weight_decay=opts.weight_decay)
                first_loss: float | None = None
                for step in range(opts.steps):
                    check_deadline(request.deadline, f"adaptation step {step}")
                    image_feats = F.normalize(clip.model.encode_image(chosen).float(), dim=-1)
                    loss = rlcf_loss(scale * image_feats @ text.t(), scores, opts.sample_k, opts.reward_baseline)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    first_loss = check_step(loss, params, first_loss, step)
            with timer.stage("predict"), torch.no_grad():
                # the adapted weights live in the eager model: never the exported (frozen) ONNX encoder
                adapted = F.normalize(clip.model.encode_image(views[:1]).float(), dim=-1)
                return (scale * adapted @ text.t()).softmax(-1)[0]
