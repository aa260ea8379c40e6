"""TPT: Test-time Prompt Tuning (Shu et al., NeurIPS 2022; repo azshue/TPT).

Per request: 64 views (original + 63 random resized crops with flips; AugMix optional), keep the
10 % lowest-entropy views, one AdamW step (lr 5e-3) on the 4 prompt-context vectors minimising
the marginal entropy of the kept views, then predict on the original image. The prompt is
restored after every request (episodic).

Differences from the reference code, all exact (same math, equal up to float rounding; each is
checked against a straightforward implementation in tests/unit/test_speedups.py):
- the frozen image encoder runs once per request over all views (the reference re-encodes them
  at every step); the original view's features are reused for the final prediction;
- the prompted text encoder skips work that cannot reach an end-of-text feature (truncation,
  length buckets, shared ``[SOS] ctx`` prefix; see tta/prompts.py);
- every request starts from the same context, so the step-0 text features are computed once per
  label set and cached; step 0 then needs one forward with grad, not two;
- the gradient is taken through the loss to the text features first, then pushed through the
  text encoder in class chunks (recompute + backward with that upstream gradient): the same
  gradient with activations for one chunk at a time, so 1000 classes fit a small worker;
- a fresh AdamW per request equals the reference's reload of the initial optimiser state.
Mixed precision (``precision``: bf16/fp16 autocast, fp16 with a static loss scale like the
reference's GradScaler) applies on GPU only; CPU always runs fp32.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from tta.faults import check_deadline, check_step
from tta.features import encode_images
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, check, register
from tta.prompts import DEFAULT_CTX_INIT, PromptLearner
from tta.scoring import marginal_entropy, select_confident
from tta.text import LabelSet
from tta.views import ViewSpec, make_views

log = logging.getLogger(__name__)

AUTO_CHUNK_CLASSES = 256  # above this many classes the backward runs in chunks of this size
FP16_LOSS_SCALE = 1024.0  # the reference's GradScaler starts at 1000; a power of two is exact
Precision = Literal["fp32", "bf16", "fp16", "auto"]


@dataclass(frozen=True)
class TPTOptions(MethodOptions):
    """Defaults of TPT's ImageNet runs (scripts/test_tpt.sh) plus the implementation's knobs."""

    n_views: int = 64
    selection_p: float = 0.1
    lr: float = 5e-3
    steps: int = 1
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which the reference uses
    n_ctx: int = 4
    ctx_init: str = DEFAULT_CTX_INIT
    augmix: bool = False
    chunk_size: int = 0  # classes per backward chunk; 0 = automatic (one chunk up to 256 classes)
    precision: Precision = "fp32"  # GPU autocast: bf16 | fp16 | auto (bf16 when supported); CPU: fp32

    def validate(self) -> None:
        check(1 <= self.n_views <= 512, "n_views must be in [1, 512]")
        check(0.0 < self.selection_p <= 1.0, "selection_p must be in (0, 1]")
        check(0.0 <= self.lr <= 1.0, "lr must be in [0, 1]")
        check(0 <= self.steps <= 16, "steps must be in [0, 16]")
        check(0.0 <= self.weight_decay <= 1.0, "weight_decay must be in [0, 1]")
        check(1 <= self.n_ctx <= 16, "n_ctx must be in [1, 16]")
        check(0 <= self.chunk_size <= 100_000, "chunk_size must be in [0, 100000] (0 = automatic)")
        check(self.precision in ("fp32", "bf16", "fp16", "auto"), "precision must be fp32, bf16, fp16 or auto")


class PromptCache:
    """Bounded LRU of `PromptLearner`s per label set: class-token embeddings and the initial
    text features are built once per label set, not once per request."""

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

    def __len__(self) -> int:
        return len(self._entries)


def resolve_chunk(chunk_size: int | None, n_classes: int) -> int:
    """Classes per backward chunk: explicit, or all of them up to `AUTO_CHUNK_CLASSES`."""
    if chunk_size:
        return max(1, min(int(chunk_size), n_classes))
    return n_classes if n_classes <= AUTO_CHUNK_CLASSES else AUTO_CHUNK_CLASSES


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32 (always on CPU)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def _chunks(learner: PromptLearner, chunk: int) -> list[torch.Tensor]:
    """Class chunks along the length-sorted order, so a chunk's prompts have similar lengths."""
    return list(torch.split(learner.order, chunk))


def backward_in_chunks(
    learner: PromptLearner, upstream: torch.Tensor, chunk: int,
    amp: torch.dtype | None = None, scale: float = 1.0,
) -> None:
    """Accumulate sum_c J_c^T upstream_c into ``learner.ctx.grad``: the gradient of any loss of
    the text features given dLoss/dText, with activations for one chunk of classes at a time."""
    device = upstream.device
    for index in _chunks(learner, chunk):
        with autocast(device, amp):
            feats = learner.text_features(classes=index)
        feats.to(upstream.dtype).backward(upstream[index] * scale)


def tune_prompt(
    learner: PromptLearner,
    image_features: torch.Tensor,
    logit_scale: float,
    selection_p: float,
    lr: float,
    steps: int,
    weight_decay: float,
    *,
    chunk_size: int | None = None,
    precision: str = "fp32",
    deadline: float | None = None,
) -> dict[str, torch.Tensor]:
    """TPT's update on precomputed view features; mutates `learner.ctx` (callers restore it).

    Returns the initial logits of all views, the selected indices and the loss before each step.
    Raises `ZeroShotFallback` past `deadline` (checked before every step after the first) and on
    a non-finite or diverging step.
    """
    device = image_features.device
    chunk = resolve_chunk(chunk_size, len(learner))
    amp = autocast_dtype(precision, device)
    scale = FP16_LOSS_SCALE if amp is torch.float16 else 1.0
    optimizer = torch.optim.AdamW([learner.ctx], lr=lr, weight_decay=weight_decay)
    selected: torch.Tensor | None = None
    initial_logits: torch.Tensor | None = None
    losses = []
    first_loss: float | None = None
    for step in range(steps):
        if step > 0:
            check_deadline(deadline, f"adaptation step {step}")
        optimizer.zero_grad(set_to_none=True)
        cached = step == 0 and learner.at_initial_context()
        if not cached and chunk >= len(learner):  # one pass with grad: no separate no-grad forward
            with autocast(device, amp):
                text = learner.text_features()
            logits = logit_scale * image_features @ text.to(image_features.dtype).t()  # fp32 (fp64 in tests)
            if selected is None:
                initial_logits = logits.detach()
                selected = select_confident(initial_logits, selection_p)
            loss = marginal_entropy(logits[selected])
            (loss * scale).backward()
        else:
            if cached:
                text = learner.initial_text_features()
            else:
                with torch.no_grad(), autocast(device, amp):
                    text = learner.text_features()
            text = text.detach().to(image_features.dtype).requires_grad_(True)
            logits = logit_scale * image_features @ text.t()
            if selected is None:
                initial_logits = logits.detach()
                selected = select_confident(initial_logits, selection_p)
            loss = marginal_entropy(logits[selected])
            (upstream,) = torch.autograd.grad(loss, text)
            backward_in_chunks(learner, upstream, chunk, amp, scale)
        if not _unscale(learner, scale):
            log.warning("TPT step %d skipped: non-finite gradient under fp16", step)
            losses.append(loss.detach())
            continue
        optimizer.step()
        first_loss = check_step(loss, [learner.ctx], first_loss, step)
        losses.append(loss.detach())
    learner.ctx.grad = None
    if selected is None:  # steps == 0: selection only
        with torch.no_grad():
            text = learner.initial_text_features() if learner.at_initial_context() else learner.text_features()
            initial_logits = logit_scale * image_features @ text.t()
        selected = select_confident(initial_logits, selection_p)
    return {"initial_logits": initial_logits, "selected": selected, "losses": torch.stack(losses) if losses else None}


def _unscale(learner: PromptLearner, scale: float) -> bool:
    """Undo the fp16 loss scale; False when the gradient overflowed (the step is skipped)."""
    grad = learner.ctx.grad
    if grad is None:
        return False
    if scale != 1.0:
        grad.div_(scale)
        if not torch.isfinite(grad).all():
            return False
    return True


@register
class TPT(Method):
    name = "tpt"
    scope = "episodic"
    Options = TPTOptions
    description = "prompt tuning on confident augmented views, one gradient step per request"
    batch_encoding = "views"

    def __init__(self, clip, defaults=None) -> None:  # noqa: ANN001 (signature of Method)
        super().__init__(clip, defaults)
        self.prompts = PromptCache()

    def predict(self, request: MethodInput) -> MethodOutput:
        opts: TPTOptions = request.options  # type: ignore[assignment]
        clip = self.clip
        timer = request.timer
        amp = autocast_dtype(opts.precision, clip.device)
        with timer.stage("augment"):
            views = make_views(request.image, clip.image_size, clip.mean, clip.std,
                               ViewSpec(n_views=opts.n_views, augmix=opts.augmix),
                               generator=request.generator, device=clip.device)
        check_deadline(request.deadline, "encoding")
        with timer.stage("encode"), autocast(clip.device, amp):
            feats = encode_images(clip, views).float()
        probs = self.adapt_and_predict(request, feats, opts)
        zeroshot = (clip.logit_scale * feats[:1] @ request.text_features.t()).softmax(-1)[0]
        return MethodOutput(probs=probs, zeroshot_probs=zeroshot, image_features=feats[0])

    def batch_views(self, request: MethodInput) -> torch.Tensor | None:
        """Shared batch encoding runs in fp32: not for requests that encode under GPU autocast."""
        if autocast_dtype(request.options.precision, self.clip.device) is not None:  # type: ignore[attr-defined]
            return None
        return super().batch_views(request)

    def adapt_and_predict(self, request: MethodInput, feats: torch.Tensor, opts: TPTOptions) -> torch.Tensor:
        """Tune the prompt on precomputed view features [N, d] (row 0: the original view), restore
        it, and return the class probabilities [C] of the original view. `auto` calls this with
        features it already has, so escalating to TPT never re-encodes a view."""
        clip = self.clip
        timer = request.timer
        amp = autocast_dtype(opts.precision, clip.device)
        check_deadline(request.deadline, "adaptation")
        learner = self.prompts.get(self, request.labels, opts.n_ctx, opts.ctx_init)
        scale = clip.logit_scale
        with learner.episode():
            with timer.stage("adapt"), torch.enable_grad():
                tune_prompt(learner, feats, scale, opts.selection_p, opts.lr, opts.steps, opts.weight_decay,
                            chunk_size=opts.chunk_size, precision=opts.precision, deadline=request.deadline)
            with timer.stage("predict"), torch.no_grad(), autocast(clip.device, amp):
                unchanged = learner.at_initial_context()  # steps=0 or a skipped step
                text = (learner.initial_text_features() if unchanged else learner.text_features()).float()
            return (scale * feats[:1] @ text.t()).softmax(-1)[0]
