"""BoostAdapter (Zhang et al., NeurIPS 2024, "BoostAdapter: Improving Vision-Language Test-Time
Adaptation via Regional Bootstrapping"; repo taolinzhang/BoostAdapter, `runner.py` at 9983e1a).

TDA's caches plus *boosting* samples: the lowest-entropy augmented views of the current image.

- history (stream state, like TDA): a positive cache of the 3 lowest-entropy features per
  predicted class, and a negative cache (2 per class, samples with normalised entropy in
  (0.2, 0.5), their probability mask 0.03 < p < 1) subtracted from the logits. The repo's
  negative cache is FIFO (`update_cache(..., True)` sets `include_prob_map`, `fifo` stays True),
  unlike TDA's lowest-entropy queue; so is ours.
- boosting (per request, never stored): the int(N * 0.1) lowest-entropy of the N views (random
  resized crops + flips, `augmix=False` as the repo's `get_ood_preprocess`) join a per-request copy
  of the positive cache under their own predicted class, with per-class room `pos_capacity +
  delta`; that copy gives the positive affinity of this image only.
- the history entry of an image is its original view (`infer_original`, the repo's setting on the
  10 cross-domain datasets) or the mean of its 10 % most confident views (ImageNet and variants).
  The cache is updated with the current sample before its own prediction, as in TDA.

Defaults: `configs/imagenet.yaml` (alpha 2, beta 5; negative as TDA), 64 views, delta 3 (the
repo's `run.sh` and its ImageNet-A/R configs; `imagenet.yaml` itself has no delta). With one view
no view is confident enough to boost (int(1 * 0.1) = 0, as in the repo) and BoostAdapter is TDA
with a FIFO negative cache.

Differences from the repo: cache capacities come from the deployment's defaults (a request cannot
resize them); a total cap bounds memory for huge label sets; the cache terms are added to
`logit_scale` (100, the repo's constant; 0 = the model's) x f T^T as TDA does; requests with a
label set other than the deployment's are answered zero-shot and leave the caches alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, check, register
from tta.methods.tda import (
    PROB_TOLERANCE,
    _probs_iff_negative,
    cache_logits,
    max_entropy,
    negative_values,
    normalized_entropy,
)
from tta.scoring import entropy, marginal_entropy, select_confident
from tta.state import ClassQueues, StreamStateMixin
from tta.state.queues import Entry
from tta.state.schema import Bool, Float, Int, Maybe, Record, Tensor, class_index, unit_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoostAdapterOptions(MethodOptions):
    """Defaults of BoostAdapter's `configs/imagenet.yaml` with 64 views and delta 3."""

    n_views: int = 64
    augmix: bool = False
    selection_p: float = 0.1
    infer_original: bool = False
    delta: int = 3
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
    max_entries: int = 50_000
    logit_scale: float = 100.0

    def scale(self, model_scale: float) -> float:
        return self.logit_scale if self.logit_scale > 0 else model_scale

    def validate(self) -> None:
        check(1 <= self.n_views <= 512, "n_views must be in [1, 512]")
        check(0.0 < self.selection_p <= 1.0, "selection_p must be in (0, 1]")
        check(0 <= self.delta <= 64, "delta must be in [0, 64]")
        check(1 <= self.pos_capacity <= 64 and 1 <= self.neg_capacity <= 64, "capacities must be in [1, 64]")
        check(1 <= self.max_entries <= 1_000_000, "max_entries must be in [1, 1e6]")
        check(0.0 <= self.logit_scale <= 1000.0, "logit_scale must be in [0, 1000] (0: the model's own)")
        for name in ("pos_alpha", "pos_beta", "neg_alpha", "neg_beta"):
            check(0.0 <= getattr(self, name) <= 1000.0, f"{name} must be in [0, 1000]")
        for name in ("neg_entropy", "neg_mask"):
            pair = getattr(self, name)
            check(len(pair) == 2 and pair[0] <= pair[1], f"{name} must be [lower, upper] with lower <= upper")


def boosting_views(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the int(N * fraction) lowest-entropy views: none below 1 / fraction views (the repo's rule)."""
    k = int(logits.shape[0] * fraction)
    return torch.argsort(entropy(logits), descending=False)[:k]


def boosted_cache(history: ClassQueues, boost: list[tuple[int, torch.Tensor, float]], capacity: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [M, d], classes [M]) of the history cache with the boosting items inserted.

    Each boosting item (class, feature, entropy) goes into a copy of its class's queue with room
    `capacity`: kept while there is room, otherwise it replaces the highest-entropy entry when its
    entropy is strictly lower (the repo's append / stable sort / truncate). Classes no item touches
    keep their history entries as they are.
    """
    keys, classes, _ = history.stacked()
    touched = sorted({c for c, _, _ in boost})
    merged: dict[int, list[Entry]] = {c: history.entries(c) for c in touched}
    seq = 1 << 62  # boosting items are newer than every history entry: ties keep the history entry
    for cls, feature, score in boost:
        queue = merged[cls]
        entry = Entry(feature, float(score), seq)
        seq += 1
        if len(queue) < capacity:
            queue.append(entry)
        elif (entry.score, entry.seq) < (queue[-1].score, queue[-1].seq):
            queue[-1] = entry
        queue.sort(key=lambda e: (e.score, e.seq))
    if not touched:
        return keys, classes
    keep = ~torch.isin(classes, torch.tensor(touched, dtype=torch.long)) if classes.numel() else classes.bool()
    extra_keys = [e.key for c in touched for e in merged[c]]
    extra_classes = [c for c in touched for _ in merged[c]]
    out_keys = torch.cat([keys[keep], torch.stack(extra_keys)]) if keys.numel() else torch.stack(extra_keys)
    out_classes = torch.cat([classes[keep], torch.tensor(extra_classes, dtype=torch.long)])
    return out_keys, out_classes


@register
class BoostAdapter(StreamStateMixin, Method):
    name = "boostadapter"
    scope = "stream"
    Options = BoostAdapterOptions
    description = "TDA caches + per-image boosting cache of its low-entropy augmented views; forward only"
    batch_encoding = "views"
    state_version = 1
    val_grid: ClassVar[Mapping[str, tuple[Any, ...]]] = {"pos_alpha": (1.0, 2.0, 5.0), "pos_beta": (3.0, 5.0, 8.0)}
    feature_options: ClassVar[Mapping[str, Any]] = {"n_views": 1}
    feature_options_note: ClassVar[str] = (
        "one view: no boosting views (int(1 x 0.1) = 0), so this is TDA's caches with a FIFO negative cache; "
        "the per-image boosting cache, BoostAdapter's own part, is not measured")

    def __init__(self, clip, defaults=None) -> None:  # noqa: ANN001 (signature of Method)
        super().__init__(clip, defaults)
        opts: BoostAdapterOptions = self.defaults  # type: ignore[assignment]
        self.pos = ClassQueues(opts.pos_capacity, opts.max_entries, "lowest")
        self.neg = ClassQueues(opts.neg_capacity, opts.max_entries, "fifo")
        self.updates = 0
        self._init_stream()

    # --- state ----------------------------------------------------------------------------
    def _export_state(self) -> dict[str, Any]:
        return {"positive": self.pos.state_dict(), "negative": self.neg.state_dict(), "updates": self.updates}

    def _state_schema(self) -> Record:
        probs = Tensor(("n", "C"), low=0.0, high=1.0 + PROB_TOLERANCE)
        return Record(positive=self.pos.schema(score_high=max_entropy),
                      negative=self.neg.schema(value=probs, score_high=max_entropy), updates=Int(low=0))

    def _op_schemas(self) -> dict[str, Record]:
        return {"update": Record(cls=class_index(), loss=Float(0.0, max_entropy), pos=Bool(), neg=Bool(),
                                 feature=unit_rows(("d",)), probs=Maybe(Tensor(("C",), low=0.0, high=1.0 + PROB_TOLERANCE)),
                                 checks=(_probs_iff_negative,))}

    def _import_state(self, state: Mapping[str, Any]) -> None:
        d = int(self.clip.embed_dim)
        for name in ("positive", "negative"):
            part = state[name]
            keys = torch.as_tensor(part["keys"])
            if keys.numel() and (keys.ndim != 2 or keys.shape[1] != d or not torch.isfinite(keys).all()):
                raise ValueError(f"boostadapter {name} keys must be finite [M, {d}]")
            values = part.get("values")
            if values is not None and not torch.isfinite(torch.as_tensor(values)).all():
                raise ValueError(f"boostadapter {name} values must be finite")
        self.pos.load_state_dict(state["positive"])
        self.neg.load_state_dict(state["negative"])
        self.updates = int(state.get("updates", 0))

    def _clear_state(self) -> None:
        self.pos.clear()
        self.neg.clear()
        self.updates = 0

    def _summary(self) -> dict[str, Any]:
        return {"positive": self.pos.summary(self._names), "negative": self.neg.summary(self._names),
                "updates": self.updates, "total": len(self.pos) + len(self.neg)}

    # --- operations -----------------------------------------------------------------------
    def update_op(self, feature: torch.Tensor, pred: int, loss: float, probs: torch.Tensor,
                  opts: BoostAdapterOptions) -> dict[str, Any]:
        """The history update of one image (which caches it is offered to is decided here, once)."""
        h = normalized_entropy(loss, probs.shape[-1])
        negative = bool(opts.negative and opts.neg_entropy[0] < h < opts.neg_entropy[1])
        op: dict[str, Any] = {"kind": "update", "cls": int(pred), "loss": float(loss), "pos": bool(opts.positive),
                              "neg": negative, "feature": feature.detach().float().cpu()}
        if negative:
            op["probs"] = probs.detach().float().cpu()
        return op

    def _apply_op(self, op: Mapping[str, Any]) -> None:
        if op["kind"] != "update":
            raise ValueError(f"boostadapter has no operation {op['kind']!r}")
        feature = torch.as_tensor(op["feature"]).float().reshape(-1)
        if feature.numel() != int(self.clip.embed_dim) or not torch.isfinite(feature).all():
            raise ValueError("boostadapter update needs a finite feature of the model's size")
        if int(op["cls"]) < 0 or (self._names is not None and int(op["cls"]) >= len(self._names)):
            raise ValueError(f"boostadapter update class {op['cls']} is outside the label set")
        changed = False
        if op["pos"]:
            changed |= self.pos.offer(int(op["cls"]), feature, float(op["loss"]))
        if op["neg"]:
            changed |= self.neg.offer(int(op["cls"]), feature, float(op["loss"]), torch.as_tensor(op["probs"]).float())
        if changed:
            self.updates += 1

    # --- compute --------------------------------------------------------------------------
    @staticmethod
    def history_entry(feats: torch.Tensor, logits: torch.Tensor, opts: BoostAdapterOptions
                      ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """(feature [d], logits [C], entropy loss, prob map [C]) of the image for the history caches."""
        if feats.shape[0] == 1 or opts.infer_original:
            return feats[0], logits[0], float(entropy(logits[0])), logits[0].softmax(-1)
        keep = select_confident(logits, opts.selection_p)
        selected = logits[keep]
        return feats[keep].mean(0), selected.mean(0), float(marginal_entropy(selected)), selected.softmax(-1).mean(0)

    def adapted_logits(self, feature: torch.Tensor, clip_logits: torch.Tensor, feats: torch.Tensor,
                       logits: torch.Tensor, opts: BoostAdapterOptions) -> torch.Tensor:
        """Zero-shot logits + the boosted positive cache's affinity - the negative cache's."""
        out = clip_logits.clone()
        n_classes = clip_logits.shape[-1]
        device = feature.device
        if opts.positive:
            idx = boosting_views(logits, opts.selection_p)
            scores = entropy(logits[idx])
            boost = [(int(logits[i].argmax()), feats[i].detach().float().cpu(), float(s))
                     for i, s in zip(idx.tolist(), scores.tolist(), strict=True)]
            keys, classes = boosted_cache(self.pos, boost, opts.pos_capacity + opts.delta)
            if classes.numel():
                onehot = torch.nn.functional.one_hot(classes, n_classes).float().to(device)
                out = out + cache_logits(feature[None], keys.to(device), onehot, opts.pos_alpha, opts.pos_beta)[0]
        if opts.negative and len(self.neg):
            keys, _, probs = self.neg.stacked(device)
            assert probs is not None
            out = out - cache_logits(feature[None], keys, negative_values(probs, opts.neg_mask),
                                     opts.neg_alpha, opts.neg_beta)[0]
        return out

    def predict(self, request: MethodInput) -> MethodOutput:
        opts: BoostAdapterOptions = request.options  # type: ignore[assignment]
        feats = self.encode_views(request, opts)
        logits = opts.scale(self.clip.logit_scale) * feats @ request.text_features.t()
        zeroshot = (self.clip.logit_scale * feats[0] @ request.text_features.t()).softmax(-1)
        feature, clip_logits, loss, probs = self.history_entry(feats, logits, opts)
        if not request.is_default_labels:
            return MethodOutput(probs=clip_logits.softmax(-1), zeroshot_probs=zeroshot, image_features=feature,
                                extra={"fallback": "boostadapter keeps state for the deployment's labels only; zero-shot"})
        with request.timer.stage("adapt"):
            self._bind_labels(request.labels.names)
            available = self.host.commit(self.update_op(feature, int(clip_logits.argmax()), loss, probs, opts))
            final = self.adapted_logits(feature, clip_logits, feats, logits, opts)
        extra = {"cache": {"positive": len(self.pos), "negative": len(self.neg)},
                 "boosting": int(opts.selection_p * feats.shape[0]) if opts.positive else 0}
        return MethodOutput(probs=final.softmax(-1), zeroshot_probs=zeroshot, image_features=feature,
                            extra=self._flag(extra, available))
