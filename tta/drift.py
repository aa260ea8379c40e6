"""Input drift: one reference per deployment, shared by every worker and replica, and the signals
a sliding window of recent traffic gives against it.

Why a shared reference: a per-worker reference (the first images each worker happens to see)
differs between workers and pods, is lost on restart and cannot be re-taken after a deliberate
change, so the same traffic would read as "drifted" on one replica and not on another. Here the
reference is stream state owned by the name ``drift``: captured from the first
`DriftConfig.reference_size` answered images after a reset, persisted and synchronised exactly
like TDA/GDA state (an owner on `tta.state.open_host`: in-process, file snapshots, or the Redis operation log shared by all replicas
backend), re-captured with ``{"action": "reset", "method": "drift"}``.

Every change to the reference is a small operation dict (``{"kind": "observe" | "reset" |
"load", ...}``) applied by the pure function `apply`, so an operation-log backend can replay it
and every replica ends with the same reference.

The sliding window is per worker (the last `DriftConfig.window` answered images that worker
served): it is the sample being tested, not shared state. Against the reference it gives:

- embedding shift: cosine distance between the window's mean image embedding and the reference's;
- class-mix divergence: Jensen-Shannon divergence (bits, in [0, 1]) between the zero-shot
  predicted-class histograms of window and reference (deployment label set only);
- entropy / confidence shift: window mean minus reference mean of the zero-shot normalised
  entropy, and reference minus window mean top-1 probability (both positive = less sure).

Finite samples never agree exactly, so the first two come with the value expected *without*
drift (first-order sampling noise of a window of W against a reference of N); the alert rules
compare the excess over that, which keeps one threshold valid for any window size and label set.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tta.errors import BadRequest, Unavailable
from tta.state import check_meta, open_host
from tta.state.schema import (
    Float,
    Int,
    Maybe,
    Record,
    StateRejected,
    Str,
    Tensor,
    class_index,
    unit_rows,
    validate,
)

log = logging.getLogger(__name__)

OWNER = "drift"
STATE_VERSION = 1
ENV_REFERENCE_SIZE = "TTA_DRIFT_REFERENCE_SIZE"
ENV_WINDOW = "TTA_DRIFT_WINDOW"
MAX_SIZE = 100_000


@dataclass(frozen=True)
class DriftConfig:
    """Sizes, in answered images: the reference capture and each worker's sliding window."""

    reference_size: int = 512
    window: int = 256
    sync_s: float = 1.0  # a frozen reference looks for another worker's re-capture this often

    def __post_init__(self) -> None:
        for name in ("reference_size", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_SIZE:
                raise ValueError(f"drift {name} must be an integer in [2, {MAX_SIZE}], got {value!r}")

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> DriftConfig:
        """The archive's `drift_reference_size` / `drift_window`; TTA_DRIFT_* environment variables win."""
        env = os.environ if env is None else env
        size = env.get(ENV_REFERENCE_SIZE) or config.get("drift_reference_size") or cls.reference_size
        window = env.get(ENV_WINDOW) or config.get("drift_window") or cls.window
        return cls(reference_size=int(size), window=int(window))


# --------------------------------------------------------------------------------------------
# The reference as a value, changed only by operations
# --------------------------------------------------------------------------------------------
UNIT_SLACK = 1e-6  # normalised entropy and top-1 probability are in [0, 1] up to float64 rounding


def _observe_consistent(op: Mapping[str, Any], dims: Mapping[str, int]) -> str | None:
    given = [op.get(k) is not None for k in ("cls", "entropy", "confidence")]
    return None if all(given) or not any(given) else "cls, entropy and confidence must be given together"


def _reference_consistent(state: Mapping[str, Any], dims: Mapping[str, int]) -> str | None:
    count, labelled, counts = state["count"], state["labelled"], state["class_counts"]
    if count > state["size"]:
        return "count must be <= size (a reference stops growing once captured)"
    if labelled > count:
        return "labelled must be <= count"
    if bool((counts != counts.round()).any()) or float(counts.sum()) != labelled:
        return "class_counts must be whole numbers summing to labelled"
    if float(state["embedding_sum"].norm()) > count * (1.0 + 1e-6) + 1e-9:
        return "embedding_sum must be a sum of 'count' unit vectors (norm <= count)"
    for key in ("entropy_sum", "confidence_sum"):
        if state[key] > labelled * (1.0 + UNIT_SLACK) + 1e-9:
            return f"{key} must be a sum of 'labelled' values in [0, 1]"
    return None


OBSERVE_SCHEMA = Record(kind=Str(("observe",)), embedding=unit_rows(("d",), "float64"), cls=Maybe(class_index()),
                        entropy=Maybe(Float(0.0, 1.0 + UNIT_SLACK)), confidence=Maybe(Float(0.0, 1.0 + UNIT_SLACK)),
                        checks=(_observe_consistent,))
STATE_SCHEMA = Record(meta=Record(extra=True), size=Int(1, MAX_SIZE), epoch=Int(low=0), count=Int(low=0),
                      labelled=Int(low=0), embedding_sum=Tensor(("d",), "float64"),
                      class_counts=Tensor(("C",), "float64", low=0.0), entropy_sum=Float(low=0.0),
                      confidence_sum=Float(low=0.0), checks=(_reference_consistent,))


def _dims(meta: Mapping[str, Any]) -> dict[str, int]:
    return {"d": int(meta["embed_dim"]), "C": len(meta.get("labels") or [])}


def validate_op(meta: Mapping[str, Any], op: Mapping[str, Any]) -> None:
    """`StateRejected` unless `op` is an ``observe`` operation that fits this deployment (`tta.state.schema`)."""
    if not isinstance(op, Mapping) or op.get("kind") != "observe":
        raise StateRejected("kind", f"drift has no operation {str(op.get('kind') if isinstance(op, Mapping) else op)[:40]!r}")
    validate(OBSERVE_SCHEMA, op, _dims(meta))


def new_reference(size: int, meta: Mapping[str, Any], epoch: int = 0) -> dict[str, Any]:
    """An empty reference that will freeze after `size` observations."""
    labels = meta.get("labels") or []
    return {
        "meta": dict(meta), "size": int(size), "epoch": int(epoch), "count": 0, "labelled": 0,
        "embedding_sum": torch.zeros(int(meta["embed_dim"]), dtype=torch.float64),
        "class_counts": torch.zeros(len(labels), dtype=torch.float64),
        "entropy_sum": 0.0, "confidence_sum": 0.0,
    }


def frozen(state: Mapping[str, Any]) -> bool:
    return int(state["count"]) >= int(state["size"])


def observe_op(embedding: torch.Tensor, cls: int | None, entropy: float | None,
               confidence: float | None) -> dict[str, Any]:
    """The operation one answered image contributes (unit embedding; class stats only for default labels)."""
    return {"kind": "observe", "embedding": embedding, "cls": cls, "entropy": entropy, "confidence": confidence}


def apply(state: Mapping[str, Any], op: Mapping[str, Any]) -> dict[str, Any]:
    """The reference after `op`; never mutates `state` (a frozen reference comes back unchanged).

    ``{"kind": "observe", "embedding", "cls", "entropy", "confidence"}`` adds one image while capturing;
    ``{"kind": "reset", "size"?}`` starts a new capture (epoch + 1);
    ``{"kind": "load", "state"}`` replaces the reference (import), checked against this deployment.
    """
    kind = op.get("kind")
    if kind == "observe":
        validate_op(state["meta"], op)
        if frozen(state):
            return dict(state)
        embedding = op["embedding"].detach().to(torch.float64).reshape(-1)
        new = dict(state, count=int(state["count"]) + 1, embedding_sum=state["embedding_sum"] + embedding)
        cls = op.get("cls")
        if cls is not None:
            counts = state["class_counts"].clone()
            counts[int(cls)] += 1
            new.update(class_counts=counts, labelled=int(state["labelled"]) + 1,
                       entropy_sum=float(state["entropy_sum"]) + float(op["entropy"]),
                       confidence_sum=float(state["confidence_sum"]) + float(op["confidence"]))
        return new
    if kind == "reset":
        return new_reference(int(op.get("size") or state["size"]), state["meta"], int(state["epoch"]) + 1)
    if kind == "load":
        loaded = op["state"]
        if not isinstance(loaded, Mapping):
            raise StateRejected("state", "must be an object exported by 'drift'")
        check_meta(loaded, state["meta"])
        validate(STATE_SCHEMA, loaded, _dims(state["meta"]))
        new = {k: loaded[k] for k in STATE_SCHEMA.fields if k != "meta"}
        new["meta"] = dict(state["meta"])
        new["embedding_sum"] = loaded["embedding_sum"].clone()
        new["class_counts"] = loaded["class_counts"].clone()
        new["entropy_sum"], new["confidence_sum"] = float(loaded["entropy_sum"]), float(loaded["confidence_sum"])
        return new
    raise StateRejected("kind", f"unknown drift operation {str(kind)[:40]!r}")


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
def js_divergence_bits(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence of two histograms (normalised here), base 2: 0 = same, 1 = disjoint."""
    p = p.double() / p.sum()
    q = q.double() / q.sum()
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> float:
        keep = a > 0
        return float((a[keep] * (a[keep] / m[keep]).log2()).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def expected_js_bits(classes: int, window: int, reference: int) -> float:
    """First-order JS between two samples of one distribution: (C-1)/(8 ln 2) * (1/W + 1/N)."""
    if classes < 2 or window < 1 or reference < 1:
        return 0.0
    return (classes - 1) / (8.0 * math.log(2.0)) * (1.0 / window + 1.0 / reference)


def expected_cosine_distance(resultant: float, window: int, reference: int) -> float:
    """First-order cosine distance between two sample means of unit vectors with mean length R.

    The means differ by noise of total variance (1 - R^2)(1/W + 1/N); its part orthogonal to the
    common mean, over 2 R^2, is the expected 1 - cos.
    """
    if resultant <= 1e-6:
        return 1.0
    return (1.0 - resultant**2) / (2.0 * resultant**2) * (1.0 / window + 1.0 / reference)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    return 1.0 - float(a @ b) / denominator if denominator > 0 else 1.0


@dataclass
class DriftSignals:
    """What one answered image leaves on the gauges; None = not measurable yet."""

    reference_ready: bool
    reference_samples: int
    window_samples: int
    sample_distance: float | None = None  # this image to the reference mean
    embedding_shift: float | None = None
    embedding_shift_expected: float | None = None
    class_divergence: float | None = None
    class_divergence_expected: float | None = None
    entropy_shift: float | None = None
    confidence_shift: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class DriftWindow:
    """The last `size` observations of this worker, with running sums (float64)."""

    def __init__(self, size: int, embed_dim: int, classes: int) -> None:
        self.size = size
        self._items: deque[tuple[torch.Tensor, int | None, float, float]] = deque()
        self.embedding_sum = torch.zeros(embed_dim, dtype=torch.float64)
        self.class_counts = torch.zeros(classes, dtype=torch.float64)
        self.labelled = 0
        self.entropy_sum = 0.0
        self.confidence_sum = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, embedding: torch.Tensor, cls: int | None, entropy: float | None, confidence: float | None) -> None:
        self._items.append((embedding, cls, entropy or 0.0, confidence or 0.0))
        self._update(embedding, cls, entropy or 0.0, confidence or 0.0, +1)
        if len(self._items) > self.size:
            self._update(*self._items.popleft(), -1)

    def _update(self, embedding: torch.Tensor, cls: int | None, entropy: float, confidence: float, sign: int) -> None:
        self.embedding_sum += sign * embedding
        if cls is not None:
            self.class_counts[cls] += sign
            self.labelled += sign
            self.entropy_sum += sign * entropy
            self.confidence_sum += sign * confidence

    def signals(self, reference: Mapping[str, Any]) -> DriftSignals:
        out = DriftSignals(reference_ready=frozen(reference), reference_samples=int(reference["count"]),
                           window_samples=len(self))
        if not out.reference_ready or len(self) < self.size:
            return out
        n = int(reference["count"])
        ref_sum = reference["embedding_sum"]
        out.embedding_shift = cosine_distance(self.embedding_sum, ref_sum)
        out.embedding_shift_expected = expected_cosine_distance(float(ref_sum.norm()) / n, len(self), n)
        labelled_ref = int(reference["labelled"])
        if labelled_ref > 0 and self.labelled > 0:
            counts = reference["class_counts"]
            out.class_divergence = js_divergence_bits(self.class_counts.clamp_min(0), counts)
            out.class_divergence_expected = expected_js_bits(int((counts > 0).sum()), self.labelled, labelled_ref)
            out.entropy_shift = self.entropy_sum / self.labelled - float(reference["entropy_sum"]) / labelled_ref
            out.confidence_shift = float(reference["confidence_sum"]) / labelled_ref - self.confidence_sum / self.labelled
        return out


# --------------------------------------------------------------------------------------------
# The state owner
# --------------------------------------------------------------------------------------------
class DriftMonitor:
    """The deployment's drift reference (shared state owner ``drift``) plus this worker's window.

    A state owner in the operation sense (`apply(op)`, `snapshot()`, `restore(state)`): every
    change is an operation applied by the pure `apply`, in the order the state host gives. It also
    speaks the stream-method state interface (`reset`, `state_dict`, `load_state_dict`,
    `state_summary`, `scope`), so the state actions work on ``"method": "drift"``.

    Only capturing writes: once the reference is frozen a request commits nothing and looks for a
    re-capture by another worker at most every `DriftConfig.sync_s` seconds.
    """

    name = OWNER
    scope = "stream"

    def __init__(self, labels: Sequence[str], model: str, embed_dim: int, config: DriftConfig | None = None) -> None:
        self.config = config or DriftConfig()
        self.meta = {"method": OWNER, "state_version": STATE_VERSION, "model": str(model),
                     "embed_dim": int(embed_dim), "labels": list(labels)}
        self._reference = new_reference(self.config.reference_size, self.meta)
        self.window = DriftWindow(self.config.window, int(embed_dim), len(labels))
        self._lock = threading.RLock()
        self._unavailable_logged = False
        self._synced_at = -math.inf
        self.host = open_host(OWNER, self)
        self.host.start()

    # --- owner protocol: the host calls these, in operation order ---
    def validate_op(self, op: Mapping[str, Any]) -> None:
        """The host checks a request's own operation before it enters the log."""
        validate_op(self.meta, op)

    def apply(self, op: Mapping[str, Any]) -> None:
        self._reference = apply(self._reference, op)

    def snapshot(self) -> dict[str, Any]:
        return dict(self._reference)

    def restore(self, state: Mapping[str, Any] | None) -> None:
        """None = start a new capture (a reset); otherwise load `state` (ValueError when it does not fit)."""
        if state is None:
            self._reference = apply(self._reference, {"kind": "reset", "size": self.config.reference_size})
        else:
            self._reference = apply(self._reference, {"kind": "load", "state": state})

    # --- the host (tta.state.open_host: in-process, file snapshots or the Redis operation log) ---
    def _commit(self, op: dict[str, Any] | None) -> dict[str, Any]:
        """Append `op` to the state log (None: just catch up) and apply everything up to it; the reference.

        When the backend is away the reference is the last known one (the op is queued by the host).
        """
        if op is None:
            self.host.sync()
        else:
            self.host.commit(op)
        self._synced_at = time.monotonic()
        return self._reference

    # --- per request ---
    def observe(self, image_features: torch.Tensor | None, zeroshot_probs: torch.Tensor | None,
                default_labels: bool) -> DriftSignals | None:
        """Add one answered image; the signals after it (None when this worker cannot see the reference)."""
        if image_features is None:
            return None
        embedding = image_features.detach().to(torch.float64).reshape(-1).cpu()
        if embedding.numel() != self.meta["embed_dim"] or not torch.isfinite(embedding).all():
            return None
        embedding = embedding / embedding.norm().clamp_min(1e-12)
        cls = entropy = confidence = None
        if default_labels and zeroshot_probs is not None and zeroshot_probs.numel() == len(self.meta["labels"]):
            p = zeroshot_probs.detach().double().reshape(-1).cpu().clamp_min(1e-12)
            p = p / p.sum()
            cls = int(p.argmax())
            entropy = float(-(p * p.log()).sum() / math.log(p.numel())) if p.numel() > 1 else 0.0
            confidence = float(p.max())
        with self._lock:
            try:
                if not frozen(self._reference):
                    reference = self._commit(observe_op(embedding, cls, entropy, confidence))
                elif time.monotonic() - self._synced_at >= self.config.sync_s:
                    reference = self._commit(None)
                else:
                    reference = self._reference
            except Unavailable as exc:
                if not self._unavailable_logged:
                    log.warning("drift reference not reachable from this worker (%s); drift signals come from "
                                "the worker that owns it", exc)
                    self._unavailable_logged = True
                return None
            self.window.add(embedding, cls, entropy, confidence)
            signals = self.window.signals(reference)
            if signals.reference_ready:
                signals.sample_distance = max(0.0, cosine_distance(embedding, reference["embedding_sum"]))
            return signals

    # --- state actions ---
    def reset(self) -> None:
        """Re-capture the reference from the next `reference_size` answered images (all workers)."""
        with self._lock:
            self.host.reset()  # every replica: restore(None), a new capture

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            self._commit(None)
            self.host.flush()
            return self.snapshot()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise BadRequest("state must be a JSON object exported by 'drift'", code="bad_state")
        with self._lock:
            try:
                apply(self._reference, {"kind": "load", "state": state})  # validate first: a bad import changes nothing
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
                rejected = exc if isinstance(exc, StateRejected) else StateRejected("state", str(exc))
                self.host.reject("import", rejected)
                raise BadRequest(f"cannot import drift state: {rejected}", code="bad_state") from exc
            self.host.load(state)

    def state_summary(self) -> dict[str, Any]:
        with self._lock:
            reference = self._commit(None)
            return {
                "reference": {"samples": int(reference["count"]), "size": int(reference["size"]),
                              "ready": frozen(reference), "epoch": int(reference["epoch"]),
                              "labelled": int(reference["labelled"])},
                "window": {"size": self.window.size, "samples": len(self.window)},
                "signals": self.window.signals(reference).to_dict(),
                "total": int(reference["count"]),
                "persistence": self.host.describe(),
            }
