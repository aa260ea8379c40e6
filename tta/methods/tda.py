"""TDA: Training-free Dynamic Adapter (Karmanov et al., CVPR 2024; repo kdiAAA/TDA).

Two caches of past test features survive across requests (scope ``stream``):
- positive: per predicted class, the `pos_capacity` = 3 lowest-entropy features seen so far;
  its Tip-Adapter affinity adds alpha * exp(-beta * (1 - f.k)) @ onehot(class) to the logits;
- negative: only samples whose normalised entropy lies inside (0.2, 0.5) enter (2 per class);
  its affinity with the mask (0.03 < p_cached < 1.0) of the cached probabilities is subtracted.
The cache is updated with the current sample *before* its own prediction (as the repo does).
Normalised entropy is the natural-log entropy divided by log2(C), as in the repo, so its
thresholds carry over. Defaults are `configs/imagenet.yaml` (1 view); on the ImageNet variants
TDA runs 64 AugMix views and keeps the 10 % most confident (set `n_views=64`).

The cache terms are added to 100 * f T^T as in the repo (`logit_scale`; 100 is OpenAI CLIP's own
scale; 0 uses the model's), so its entropy thresholds and alphas keep their meaning for models
trained with another temperature; `zeroshot_probs` use the model's own scale.
Differences from the repo: cache
capacities come from the deployment's defaults (a request cannot resize the caches); a total cap
bounds memory for very large label sets; requests with a label set other than the deployment's
are answered zero-shot and leave the caches alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, check, register
from tta.scoring import entropy, marginal_entropy, select_confident
from tta.state import ClassQueues, StreamStateMixin
from tta.state.schema import Bool, Float, Int, Maybe, Record, Tensor, class_index, unit_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TDAOptions(MethodOptions):
    """Defaults of TDA's `configs/imagenet.yaml` (single view)."""

    n_views: int = 1
    selection_p: float = 0.1
    augmix: bool = True
    positive: bool = True
    pos_capacity: int = 3
    pos_alpha: float = 2.0
    pos_beta: float = 5.0
    negative: bool = True
    neg_capacity: int = 2
    neg_alpha: float = 0.117
    neg_beta: float = 1.0
    neg_entropy: tuple[float, float] = (0.2, 0.5)
    neg_mask: tuple[float, float] = (0.03, 1.0)
    max_entries: int = 50_000  # total cap per cache (memory bound for huge label sets)
    logit_scale: float = 100.0  # the repo's constant; 0 = the model's own

    def scale(self, model_scale: float) -> float:
        return self.logit_scale if self.logit_scale > 0 else model_scale

    def validate(self) -> None:
        check(1 <= self.n_views <= 512, "n_views must be in [1, 512]")
        check(0.0 < self.selection_p <= 1.0, "selection_p must be in (0, 1]")
        check(1 <= self.pos_capacity <= 64 and 1 <= self.neg_capacity <= 64, "capacities must be in [1, 64]")
        check(1 <= self.max_entries <= 1_000_000, "max_entries must be in [1, 1e6]")
        check(0.0 <= self.logit_scale <= 1000.0, "logit_scale must be in [0, 1000] (0: the model's own)")
        for name in ("pos_alpha", "pos_beta", "neg_alpha", "neg_beta"):
            check(0.0 <= getattr(self, name) <= 1000.0, f"{name} must be in [0, 1000]")
        for name in ("neg_entropy", "neg_mask"):
            pair = getattr(self, name)
            check(len(pair) == 2 and pair[0] <= pair[1], f"{name} must be [lower, upper] with lower <= upper")


def normalized_entropy(loss: float, n_classes: int) -> float:
    """The repo's `get_entropy`: nats divided by log2(C) (so its thresholds apply unchanged)."""
    return float(loss) / math.log2(n_classes) if n_classes > 1 else 0.0


def cache_logits(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 alpha: float, beta: float) -> torch.Tensor:
    """Tip-Adapter affinity: alpha * exp(-beta * (1 - f K^T)) V, for features [N, d] -> [N, C]."""
    affinity = features @ keys.t()
    return alpha * torch.exp(-beta * (1.0 - affinity)) @ values


PROB_TOLERANCE = 1e-4  # float32 softmax (and means of it) can exceed 1 by a few ulps


def max_entropy(dims: dict[str, int]) -> float | None:
    """The largest entropy (nats) of a distribution over the deployment's C classes, plus float32 slack."""
    return math.log(dims["C"]) + 1e-4 if "C" in dims else None


def _probs_iff_negative(op: Any, dims: dict[str, int]) -> str | None:
    return None if (op.get("probs") is not None) == bool(op["neg"]) else "probs must be given exactly when neg is true"


def negative_values(probs: torch.Tensor, mask: tuple[float, float]) -> torch.Tensor:
    """Indicator of classes a cached sample found unlikely but possible: lower < p < upper."""
    return ((probs > mask[0]) & (probs < mask[1])).float()


@register
class TDA(StreamStateMixin, Method):
    name = "tda"
    scope = "stream"
    Options = TDAOptions
    description = "positive/negative caches of past confident features; forward only, state kept per deployment"
    batch_encoding = "views"
    state_version = 1
    # the positive cache's alpha/beta are what the repo's per-dataset configs tune (caltech101 5/5,
    # dtd 2/3, oxford_flowers 1/5, oxford_pets 2/7); the defaults come first (they win ties)
    val_grid = {"pos_alpha": (2.0, 1.0, 5.0), "pos_beta": (5.0, 3.0, 7.0)}

    def __init__(self, clip, defaults=None) -> None:  # noqa: ANN001 (signature of Method)
        super().__init__(clip, defaults)
        opts: TDAOptions = self.defaults  # type: ignore[assignment]
        self.pos = ClassQueues(opts.pos_capacity, opts.max_entries, "lowest")
        self.neg = ClassQueues(opts.neg_capacity, opts.max_entries, "lowest")
        self.updates = 0
        self._init_stream()

    # --- state ----------------------------------------------------------------------------
    def _export_state(self) -> dict[str, Any]:
        return {"positive": self.pos.state_dict(), "negative": self.neg.state_dict(), "updates": self.updates}

    def _import_state(self, state: Any) -> None:
        self.pos.load_state_dict(state["positive"])
        self.neg.load_state_dict(state["negative"])
        self.updates = int(state.get("updates", 0))

    def _state_schema(self) -> Record:
        probs = Tensor(("n", "C"), low=0.0, high=1.0 + PROB_TOLERANCE)
        return Record(positive=self.pos.schema(score_high=max_entropy), negative=self.neg.schema(
            value=probs, score_high=max_entropy), updates=Int(low=0))

    def _op_schemas(self) -> dict[str, Record]:
        return {"update": Record(cls=class_index(), loss=Float(0.0, max_entropy), pos=Bool(), neg=Bool(),
                                 feature=unit_rows(("d",)), probs=Maybe(Tensor(("C",), low=0.0, high=1.0 + PROB_TOLERANCE)),
                                 checks=(_probs_iff_negative,))}

    def _clear_state(self) -> None:
        self.pos.clear()
        self.neg.clear()
        self.updates = 0

    def _summary(self) -> dict[str, Any]:
        return {"positive": self.pos.summary(self._names), "negative": self.neg.summary(self._names),
                "updates": self.updates, "total": len(self.pos) + len(self.neg)}

    # --- compute --------------------------------------------------------------------------
    def _features(self, request: MethodInput, opts: TDAOptions
                  ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor]:
        """(feature [d], logits [C], entropy loss, prob map [C], original-view zero-shot logits [C])."""
        clip = self.clip
        feats = self.encode_views(request, opts)
        logits = opts.scale(clip.logit_scale) * feats @ request.text_features.t()
        original = clip.logit_scale * feats[0] @ request.text_features.t()
        if feats.shape[0] == 1:
            return feats[0], logits[0], float(entropy(logits[0])), logits[0].softmax(-1), original
        keep = select_confident(logits, opts.selection_p)
        selected = logits[keep]
        return (feats[keep].mean(0), selected.mean(0), float(marginal_entropy(selected)),
                selected.softmax(-1).mean(0), original)

    def adapted_logits(self, feature: torch.Tensor, logits: torch.Tensor, opts: TDAOptions) -> torch.Tensor:
        """Zero-shot logits plus the positive and minus the negative cache's affinity."""
        out = logits.clone()
        n_classes = logits.shape[-1]
        if opts.positive and len(self.pos):
            keys, classes, _ = self.pos.stacked(feature.device)
            onehot = torch.nn.functional.one_hot(classes, n_classes).float()
            out = out + cache_logits(feature[None], keys, onehot, opts.pos_alpha, opts.pos_beta)[0]
        if opts.negative and len(self.neg):
            keys, _, probs = self.neg.stacked(feature.device)
            assert probs is not None
            values = negative_values(probs, opts.neg_mask)
            out = out - cache_logits(feature[None], keys, values, opts.neg_alpha, opts.neg_beta)[0]
        return out

    def update(self, feature: torch.Tensor, pred: int, loss: float, probs: torch.Tensor, opts: TDAOptions) -> bool:
        """TDA's cache rules for one sample, applied here directly (no log); True when a cache changed."""
        before = self.updates
        self._apply_op(self.update_op(feature, pred, loss, probs, opts))
        return self.updates != before

    def update_op(self, feature: torch.Tensor, pred: int, loss: float, probs: torch.Tensor,
                  opts: TDAOptions) -> dict[str, Any]:
        """The operation for one sample: which caches it is offered to is decided here, once."""
        h = normalized_entropy(loss, probs.shape[-1])
        negative = bool(opts.negative and opts.neg_entropy[0] < h < opts.neg_entropy[1])
        op: dict[str, Any] = {"kind": "update", "cls": int(pred), "loss": float(loss), "pos": bool(opts.positive),
                              "neg": negative, "feature": feature.detach().float().cpu()}
        if negative:
            op["probs"] = probs.detach().float().cpu()
        return op

    def _apply_op(self, op: Any) -> None:
        if op["kind"] != "update":
            raise ValueError(f"tda has no operation {op['kind']!r}")
        changed = False
        if op["pos"]:
            changed |= self.pos.offer(op["cls"], op["feature"], op["loss"])
        if op["neg"]:
            changed |= self.neg.offer(op["cls"], op["feature"], op["loss"], op["probs"])
        if changed:
            self.updates += 1

    def predict(self, request: MethodInput) -> MethodOutput:
        opts: TDAOptions = request.options  # type: ignore[assignment]
        feature, logits, loss, probs, original = self._features(request, opts)
        zeroshot = original.softmax(-1)
        if not request.is_default_labels:
            return MethodOutput(probs=zeroshot if opts.n_views == 1 else logits.softmax(-1), zeroshot_probs=zeroshot, image_features=feature,
                                extra={"fallback": "tda keeps state for the deployment's labels only; zero-shot"})
        with request.timer.stage("adapt"):
            self._bind_labels(request.labels.names)
            available = self.host.commit(self.update_op(feature, int(logits.argmax()), loss, probs, opts))
            final = self.adapted_logits(feature, logits, opts)
        extra = {"cache": {"positive": len(self.pos), "negative": len(self.neg)}}
        return MethodOutput(probs=final.softmax(-1), zeroshot_probs=zeroshot, image_features=feature,
                            extra=self._flag(extra, available))
