"""TPT: Test-time Prompt Tuning (Shu et al., NeurIPS 2022; repo azshue/TPT).

Per request: 64 views (original + 63 random resized crops with flips; AugMix optional), keep the
10 % lowest-entropy views, one AdamW step (lr 5e-3) on the 4 prompt-context vectors minimising
the marginal entropy of the kept views, then predict on the original image. The prompt is
restored after every request (episodic).

Differences from the reference code, all exact (same math):
- the frozen image encoder runs once per request over all views (the reference re-encodes them
  at every step); the original view's features are reused for the final prediction;
- the text transformer runs only up to the longest prompt's end-of-text token (causal mask);
- the step-0 forward gives both the selection and the loss (no separate selection pass);
- a fresh AdamW per request equals the reference's reload of the initial optimiser state.
Not reproduced: AMP + GradScaler (fp32 here; the perf work adds autocast on GPU).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tta.features import encode_images
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, check, register
from tta.prompts import DEFAULT_CTX_INIT, PromptLearner
from tta.scoring import marginal_entropy, select_confident
from tta.text import LabelSet
from tta.views import ViewSpec, make_views


@dataclass(frozen=True)
class TPTOptions(MethodOptions):
    """Defaults of TPT's ImageNet runs (scripts/test_tpt.sh)."""

    n_views: int = 64
    selection_p: float = 0.1
    lr: float = 5e-3
    steps: int = 1
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which the reference uses
    n_ctx: int = 4
    ctx_init: str = DEFAULT_CTX_INIT
    augmix: bool = False

    def validate(self) -> None:
        check(1 <= self.n_views <= 512, "n_views must be in [1, 512]")
        check(0.0 < self.selection_p <= 1.0, "selection_p must be in (0, 1]")
        check(0.0 <= self.lr <= 1.0, "lr must be in [0, 1]")
        check(0 <= self.steps <= 16, "steps must be in [0, 16]")
        check(0.0 <= self.weight_decay <= 1.0, "weight_decay must be in [0, 1]")
        check(1 <= self.n_ctx <= 16, "n_ctx must be in [1, 16]")


class PromptCache:
    """Bounded LRU of `PromptLearner`s per label set: class-token embeddings are built once."""

    def __init__(self, max_entries: int = 8) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, PromptLearner] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, method: Method, labels: LabelSet, n_ctx: int, ctx_init: str) -> PromptLearner:
        key = (labels.names, n_ctx, ctx_init)
        with self._lock:
            learner = self._entries.get(key)
            if learner is not None:
                self._entries.move_to_end(key)
                return learner
        learner = PromptLearner(method.clip, labels.names, n_ctx=n_ctx, ctx_init=ctx_init)
        with self._lock:
            self._entries[key] = learner
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return learner


def tune_prompt(
    learner: PromptLearner,
    image_features: torch.Tensor,
    logit_scale: float,
    selection_p: float,
    lr: float,
    steps: int,
    weight_decay: float,
) -> dict[str, torch.Tensor]:
    """TPT's update on precomputed view features; mutates `learner.ctx` (callers restore it).

    Returns the initial logits of all views, the selected indices and the loss before each step.
    """
    optimizer = torch.optim.AdamW([learner.ctx], lr=lr, weight_decay=weight_decay)
    selected: torch.Tensor | None = None
    initial_logits = None
    losses = []
    for _ in range(steps):
        text = learner.text_features()
        logits = logit_scale * image_features @ text.t()
        if selected is None:
            initial_logits = logits.detach()
            selected = select_confident(initial_logits, selection_p)
        loss = marginal_entropy(logits[selected])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    if selected is None:  # steps == 0: selection only
        with torch.no_grad():
            initial_logits = logit_scale * image_features @ learner.text_features().t()
        selected = select_confident(initial_logits, selection_p)
    return {"initial_logits": initial_logits, "selected": selected, "losses": torch.stack(losses) if losses else None}


@register
class TPT(Method):
    name = "tpt"
    scope = "episodic"
    Options = TPTOptions
    description = "prompt tuning on confident augmented views, one gradient step per request"

    def __init__(self, clip, defaults=None) -> None:  # noqa: ANN001 (signature of Method)
        super().__init__(clip, defaults)
        self.prompts = PromptCache()

    def predict(self, request: MethodInput) -> MethodOutput:
        opts: TPTOptions = request.options  # type: ignore[assignment]
        clip = self.clip
        timer = request.timer
        with timer.stage("augment"):
            views = make_views(request.image, clip.image_size, clip.mean, clip.std,
                               ViewSpec(n_views=opts.n_views, augmix=opts.augmix),
                               generator=request.generator, device=clip.device)
        with timer.stage("encode"):
            feats = encode_images(clip, views)
        learner = self.prompts.get(self, request.labels, opts.n_ctx, opts.ctx_init)
        scale = clip.logit_scale
        with learner.episode():
            with timer.stage("adapt"), torch.enable_grad():
                tune_prompt(learner, feats, scale, opts.selection_p, opts.lr, opts.steps, opts.weight_decay)
            with timer.stage("predict"), torch.no_grad():
                probs = (scale * feats[:1] @ learner.text_features().t()).softmax(-1)[0]
        zeroshot = (scale * feats[:1] @ request.text_features.t()).softmax(-1)[0]
        return MethodOutput(probs=probs, zeroshot_probs=zeroshot, image_features=feats[0])
