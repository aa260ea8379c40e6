"""DiffTPT: TPT with diffusion-generated views (Feng et al., ICCV 2023; repo chunmeifeng/DiffTPT).

Per request: the original image + 63 conventional TPT views + N images generated from the
request image by Stable Diffusion image variations; keep the 80 % of the non-original views
whose *output logits* are closest (cosine) to the original's, prepend the original, keep the
30 % lowest-entropy of those, then 4 TPT steps (AdamW, lr 5e-3) on the prompt context, predict
on the original, restore the prompt (episodic).

Serving differences from the paper, which generates its 63 variations offline:
- generation happens per request, under a per-request cap on generated views and a time
  budget. If the last measured per-view time says generation would not fit, or it passes its
  deadline while running, the request falls back to the conventional TPT views only (same
  filters and steps) and the response says so: ``"fallback": "<reason>"``. A deployment can
  disable generation; a request can lower, never raise, the deployment's cost knobs;
- generated views are resized straight to the CLIP input size (the paper resizes 512 -> 224
  then center-crops, the same for square images) and quantised to 8 bits like its saved files;
- fp32 TPT steps (the reference uses AMP).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tta.admission import remaining_ms
from tta.errors import BadRequest, ModelUnavailable
from tta.faults import check_deadline
from tta.features import encode_images
from tta.generation import (
    DEFAULT_PIPELINE,
    DEFAULT_REVISION,
    Dtype,
    GenerationBudgetExceeded,
    GenerationConfig,
    ViewGenerator,
    get_generator,
)
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, check, register
from tta.methods.tpt import PromptCache, tune_prompt
from tta.prompts import DEFAULT_CTX_INIT
from tta.scoring import n_confident, select_confident
from tta.views import ViewSpec, make_views, normalize

log = logging.getLogger(__name__)

RETRY_LOAD_AFTER_S = 60.0  # a generator that failed to load is retried at most this often

# Options only the deployment sets (loading another pipeline per request would be a DoS).
DEPLOYMENT_ONLY = ("generator", "generator_revision", "generation_dtype", "generation_batch",
                   "generation_cache_size", "max_generated", "preload_generator")

FALLBACK_DISABLED = "generation_disabled"
FALLBACK_OVER_BUDGET = "over_budget"
FALLBACK_DEADLINE = "deadline_exceeded"
FALLBACK_UNAVAILABLE = "generator_unavailable"


@dataclass(frozen=True)
class DiffTPTOptions(MethodOptions):
    """Defaults of scripts/do_tpt_difftpt.sh and image_generator_R.py; the generation fields
    are serving parameters (deployment-level in model-config.yaml; requests may only lower them)."""

    n_views: int = 64  # original + 63 conventional TPT views
    n_generated: int = 63  # diffusion views per request (the paper's 63)
    selection_cosine: float = 0.8
    selection_p: float = 0.3  # entropy filter ("selection_selfentro")
    lr: float = 5e-3
    steps: int = 4
    weight_decay: float = 0.01
    n_ctx: int = 4
    ctx_init: str = DEFAULT_CTX_INIT
    augmix: bool = False
    generation: bool = True
    generator: str = DEFAULT_PIPELINE  # hub id, local folder, or "tiny-random"
    generator_revision: str | None = DEFAULT_REVISION
    diffusion_steps: int = 50
    guidance_scale: float = 3.0
    generation_resolution: int | None = None  # None: the pipeline's native size (512 for SD)
    generation_dtype: Dtype = "auto"
    generation_batch: int = 8
    generation_cache_size: int = 0
    max_generated: int = 64
    time_budget_ms: float = 60_000.0
    preload_generator: bool = False  # load the pipeline when the worker starts, not on first use

    def validate(self) -> None:
        check(1 <= self.n_views <= 512, "n_views must be in [1, 512]")
        check(0.0 < self.selection_cosine <= 1.0, "selection_cosine must be in (0, 1]")
        check(0.0 < self.selection_p <= 1.0, "selection_p must be in (0, 1]")
        check(0.0 <= self.lr <= 1.0, "lr must be in [0, 1]")
        check(0 <= self.steps <= 16, "steps must be in [0, 16]")
        check(0.0 <= self.weight_decay <= 1.0, "weight_decay must be in [0, 1]")
        check(1 <= self.n_ctx <= 16, "n_ctx must be in [1, 16]")
        self.generation_config().validate()

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            pipeline=self.generator, revision=self.generator_revision or None, enabled=self.generation,
            n_views=self.n_generated, max_views=self.max_generated, steps=self.diffusion_steps,
            guidance_scale=self.guidance_scale, resolution=self.generation_resolution,
            dtype=self.generation_dtype, time_budget_ms=self.time_budget_ms,
            batch_size=self.generation_batch, cache_size=self.generation_cache_size,
        )


def cosine_filter(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (>= 1) of the `fraction` of non-original views whose logit vectors are most
    cosine-similar to the original's (row 0), most similar first (`select_confident_samples_cosine`)."""
    others = logits.shape[0] - 1
    if others <= 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    cosine = torch.nn.functional.cosine_similarity(logits[1:], logits[:1].expand(others, -1), dim=-1)
    keep = n_confident(others, fraction)
    return torch.argsort(cosine, descending=True)[:keep] + 1


def select_views(logits: torch.Tensor, selection_cosine: float, selection_p: float) -> torch.Tensor:
    """DiffTPT's two filters: the original plus the cosine-kept views, then the `selection_p`
    lowest-entropy of those. Returns view indices (fixed for all steps, as in the reference)."""
    original = torch.zeros(1, dtype=torch.long, device=logits.device)
    candidates = torch.cat([original, cosine_filter(logits, selection_cosine)])
    return candidates[select_confident(logits[candidates], selection_p)]


class Fallback(Exception):
    """Generation is skipped for this request; carries the reason reported in the response."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@register
class DiffTPT(Method):
    name = "difftpt"
    scope = "episodic"
    Options = DiffTPTOptions
    description = "TPT over augmented + diffusion-generated views (cosine then entropy filter); slowest, GPU only"

    def __init__(self, clip, defaults=None) -> None:  # noqa: ANN001 (signature of Method)
        super().__init__(clip, defaults)
        self.prompts = PromptCache()
        self._generator: ViewGenerator | None = None
        self._load_error: tuple[float, str] | None = None
        opts: DiffTPTOptions = self.defaults  # type: ignore[assignment]
        if opts.generation and opts.preload_generator:
            try:
                self.generator()
            except ModelUnavailable as exc:
                log.warning("difftpt generator not loaded at start: %s", exc)

    # --- options: a request may lower the deployment's cost knobs, not raise them --------
    def parse_options(self, overrides: Mapping[str, Any] | None) -> MethodOptions:
        opts: DiffTPTOptions = super().parse_options(overrides)  # type: ignore[assignment]
        base: DiffTPTOptions = self.defaults  # type: ignore[assignment]
        for name in DEPLOYMENT_ONLY:
            if getattr(opts, name) != getattr(base, name):
                raise BadRequest(f"option '{name}' is set by the deployment, not per request", code="bad_options")
        if opts.generation and not base.generation:
            raise BadRequest("generation is disabled in this deployment", code="bad_options")
        if opts.time_budget_ms > base.time_budget_ms or opts.diffusion_steps > base.diffusion_steps:
            raise BadRequest(
                f"time_budget_ms and diffusion_steps may only be lowered per request (deployment: "
                f"{base.time_budget_ms:g} ms, {base.diffusion_steps} steps)", code="bad_options")
        return opts

    # --- generation ----------------------------------------------------------------------
    def generator(self) -> ViewGenerator:
        """The worker's pipeline, loaded once; a failed load is remembered for a minute."""
        if self._generator is not None:
            return self._generator
        if self._load_error is not None and time.monotonic() - self._load_error[0] < RETRY_LOAD_AFTER_S:
            raise ModelUnavailable(self._load_error[1])
        opts: DiffTPTOptions = self.defaults  # type: ignore[assignment]
        try:
            self._generator = get_generator(opts.generation_config(), self.clip.device)
        except ModelUnavailable as exc:
            self._load_error = (time.monotonic(), str(exc))
            raise
        return self._generator

    def _generate(self, request: MethodInput, opts: DiffTPTOptions) -> torch.Tensor:
        """Normalised generated views [n, 3, S, S], or `Fallback` saying why there are none."""
        n = opts.n_generated
        if not opts.generation or n == 0:
            raise Fallback(FALLBACK_DISABLED, "generation is disabled")
        try:
            gen = self.generator()
        except ModelUnavailable as exc:
            log.warning("difftpt falls back to TPT views: %s", exc)
            raise Fallback(FALLBACK_UNAVAILABLE, str(exc)) from exc
        estimate = gen.estimate_ms(n, opts.diffusion_steps)
        if estimate is not None and estimate > opts.time_budget_ms:
            raise Fallback(FALLBACK_OVER_BUDGET,
                           f"estimated {estimate:.0f} ms for {n} views > budget {opts.time_budget_ms:.0f} ms")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=request.generator))
        start = time.perf_counter()
        budget_s = opts.time_budget_ms / 1000.0
        left_ms = remaining_ms(request.deadline)
        if left_ms is not None:  # the request's deadline also bounds generation (its own clock)
            budget_s = min(budget_s, max(left_ms, 0.0) / 1000.0)
        try:
            images = gen.generate(request.image, n, seed=seed, steps=opts.diffusion_steps,
                                  guidance_scale=opts.guidance_scale, out_size=self.clip.image_size,
                                  deadline=start + budget_s)
        except GenerationBudgetExceeded as exc:
            raise Fallback(FALLBACK_DEADLINE,
                           f"generation stopped at its {opts.time_budget_ms:.0f} ms deadline") from exc
        views = images.to(self.clip.device).float().div_(255.0)
        return normalize(views, self.clip.mean, self.clip.std)

    # --- the method ----------------------------------------------------------------------
    def predict(self, request: MethodInput) -> MethodOutput:
        opts: DiffTPTOptions = request.options  # type: ignore[assignment]
        clip = self.clip
        timer = request.timer
        extra: dict[str, Any] = {}
        with timer.stage("augment"):
            views = make_views(request.image, clip.image_size, clip.mean, clip.std,
                               ViewSpec(n_views=opts.n_views, augmix=opts.augmix),
                               generator=request.generator, device=clip.device)
        check_deadline(request.deadline, "generation")
        with timer.stage("generate"):
            try:
                generated = self._generate(request, opts)
                views = torch.cat([views, generated])
                extra["generated_views"] = int(generated.shape[0])
            except Fallback as fb:
                extra.update(fallback=fb.reason, fallback_detail=fb.detail, generated_views=0)
        check_deadline(request.deadline, "encoding")
        with timer.stage("encode"):
            feats = encode_images(clip, views)
        check_deadline(request.deadline, "adaptation")
        learner = self.prompts.get(self, request.labels, opts.n_ctx, opts.ctx_init)
        scale = clip.logit_scale
        with learner.episode():
            with timer.stage("adapt"):
                with torch.no_grad():
                    initial = scale * feats @ learner.text_features().t()
                selected = select_views(initial, opts.selection_cosine, opts.selection_p)
                with torch.enable_grad():  # selection_p 1.0: tune_prompt keeps every selected view
                    tune_prompt(learner, feats[selected], scale, 1.0, opts.lr, opts.steps, opts.weight_decay,
                                deadline=request.deadline)
            with timer.stage("predict"), torch.no_grad():
                probs = (scale * feats[:1] @ learner.text_features().t()).softmax(-1)[0]
        zeroshot = (scale * feats[:1] @ request.text_features.t()).softmax(-1)[0]
        return MethodOutput(probs=probs, zeroshot_probs=zeroshot, image_features=feats[0], extra=extra)
