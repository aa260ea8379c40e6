"""Bounded per-class queues: the data structure behind TDA's caches, GDA's support set and TFUP's buffer.

Both caps (per class and in total) are enforced on every insert, so a replica's memory is bounded
whatever the traffic, and inserts are deterministic: the same inserts in the same order give
bit-identical queues on every replica (the operation log relies on it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tta.state.schema import (
    AnyOf,
    Bound,
    Int,
    Maybe,
    Record,
    Spec,
    StateRejected,
    Str,
    Tensor,
    class_index,
    unit_rows,
)

Policy = Literal["lowest", "fifo"]


@dataclass
class Entry:
    """One cached item: a feature vector, its score (entropy; lower is better) and an optional value."""

    key: torch.Tensor
    score: float
    seq: int
    value: torch.Tensor | None = None


class ClassQueues:
    """Per-class bounded queues with a total cap.

    ``lowest``: each class keeps its `per_class` lowest-score entries (TDA's rule: append while
    there is room, otherwise replace the highest-score entry only if the new score is strictly
    lower; ties keep the older entry). ``fifo``: each class keeps its newest `per_class` entries.
    When the total exceeds `max_total`, the globally worst entry (highest score, or oldest) is
    evicted, so memory is bounded by min(C * per_class, max_total) vectors.
    """

    def __init__(self, per_class: int, max_total: int, policy: Policy = "lowest") -> None:
        if per_class < 1 or max_total < 1:
            raise ValueError("per_class and max_total must be >= 1")
        self.per_class = per_class
        self.max_total = max_total
        self.policy = policy
        self._queues: dict[int, list[Entry]] = {}
        self._seq = 0
        self._total = 0
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._on_device: tuple[Any, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None

    def __len__(self) -> int:
        return self._total

    def _rank(self, entry: Entry) -> tuple[float, int]:
        """Sort key: smaller is kept longer."""
        return (entry.score, entry.seq) if self.policy == "lowest" else (0.0, -entry.seq)

    def offer(self, cls: int, key: torch.Tensor, score: float = 0.0, value: torch.Tensor | None = None) -> bool:
        """Insert if the rules allow; True when the queues changed."""
        entry = Entry(key.detach().float().reshape(-1).clone(), float(score), self._seq, None
                      if value is None else value.detach().float().reshape(-1).clone())
        self._seq += 1
        queue = self._queues.setdefault(int(cls), [])
        if len(queue) < self.per_class:
            queue.append(entry)
            self._total += 1
        elif self._rank(entry) < self._rank(queue[-1]):
            queue[-1] = entry
        else:
            if not queue:
                del self._queues[int(cls)]
            return False
        queue.sort(key=self._rank)
        self._stacked = None
        if self._total > self.max_total:
            return self._evict_worst() is not entry
        return True

    def _evict_worst(self) -> Entry:
        worst_cls = max(self._queues, key=lambda c: self._rank(self._queues[c][-1]))
        evicted = self._queues[worst_cls].pop()
        if not self._queues[worst_cls]:
            del self._queues[worst_cls]
        self._total -= 1
        return evicted

    def clear(self) -> None:
        self._queues.clear()
        self._total = 0
        self._seq = 0
        self._stacked = None

    def entries(self, cls: int) -> list[Entry]:
        return list(self._queues.get(int(cls), []))

    def counts(self) -> dict[int, int]:
        return {c: len(q) for c, q in sorted(self._queues.items())}

    def stacked(self, device: torch.device | str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(keys [M, d], classes [M], values [M, k] or None), classes in ascending order; cached."""
        if self._stacked is None:
            items = [(c, e) for c in sorted(self._queues) for e in self._queues[c]]
            if not items:
                empty = torch.empty(0)
                self._stacked = (empty, torch.empty(0, dtype=torch.long), None)
            else:
                keys = torch.stack([e.key for _, e in items])
                classes = torch.tensor([c for c, _ in items], dtype=torch.long)
                values = torch.stack([e.value for _, e in items]) if items[0][1].value is not None else None
                self._stacked = (keys, classes, values)
        keys, classes, values = self._stacked
        if device is None or not keys.numel() or keys.device == torch.device(device):
            return keys, classes, values
        if self._on_device is None or self._on_device[0] is not self._stacked:  # one copy per change
            moved = (keys.to(device), classes.to(device), values.to(device) if values is not None else None)
            self._on_device = (self._stacked, moved)
        return self._on_device[1]

    def summary(self, names: tuple[str, ...] | None = None) -> dict[str, Any]:
        counts = self.counts()
        per_class = {(names[c] if names is not None and c < len(names) else str(c)): n for c, n in counts.items()}
        return {"entries_per_class": per_class, "capacity_per_class": self.per_class,
                "total": self._total, "max_total": self.max_total, "classes": len(counts)}

    def state_dict(self) -> dict[str, Any]:
        keys, classes, values = self.stacked()
        scores = [e.score for c in sorted(self._queues) for e in self._queues[c]]
        seqs = [e.seq for c in sorted(self._queues) for e in self._queues[c]]
        return {"policy": self.policy, "keys": keys.cpu(), "classes": classes.cpu(),
                "values": None if values is None else values.cpu(),
                "scores": torch.tensor(scores, dtype=torch.float64), "seqs": torch.tensor(seqs, dtype=torch.long),
                "next_seq": self._seq}

    def schema(self, key: tuple[int | str, ...] = ("d",), value: Spec | None = None, score_low: Bound = 0.0,
               score_high: Bound = None, unit_keys: bool = True) -> Record:
        """What `state_dict()` may hold for this queue (`tta.state.schema`): keys [n, *key] (CLIP
        features: L2 norm <= 1 unless `unit_keys` is False), classes in [0, C), finite scores in
        [score_low, score_high], unique sequence numbers below `next_seq`, at most `per_class` entries
        per class and `max_total` in all. `value`: the spec of the values [n, ...] (None: no values)."""
        key_spec = unit_rows(("n", *key)) if unit_keys else Tensor(("n", *key))
        empty = Tensor((0,))  # an empty queue exports keys as torch.empty(0)
        return Record(
            policy=Str((self.policy,)), keys=AnyOf((key_spec, empty)), classes=class_index(("n",)),
            values=Maybe(value) if value is not None else _NoneOnly(),
            scores=Tensor(("n",), "float64", low=score_low, high=score_high), seqs=Tensor(("n",), "int64", low=0),
            next_seq=Int(low=0), optional=("values",), checks=(self._check_counts,))

    def _check_counts(self, state: Mapping[str, Any], dims: Mapping[str, int]) -> str | None:
        classes, seqs = state["classes"], state["seqs"]
        if classes.numel() > self.max_total:
            return f"{classes.numel()} entries, this deployment holds at most {self.max_total}"
        if classes.numel() and int(torch.unique(classes, return_counts=True)[1].max()) > self.per_class:
            return f"a class holds more than {self.per_class} entries (this deployment's per-class capacity)"
        if seqs.numel():
            if torch.unique(seqs).numel() != seqs.numel():
                return "seqs must be unique"
            if int(state["next_seq"]) <= int(seqs.max()):
                return "next_seq must be greater than every seq"
        values = state.get("values")
        if values is not None and values.shape[0] != classes.numel():
            return "values must have one row per entry"
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore entries, re-applying this instance's caps (validate with `schema()` first)."""
        self.clear()
        keys, classes = state["keys"], state["classes"]
        values, scores, seqs = state.get("values"), state["scores"], state["seqs"]
        order = sorted(range(len(classes)), key=lambda i: int(seqs[i]))
        for i in order:  # replay in insertion order with the original sequence numbers
            self._seq = int(seqs[i])
            self.offer(int(classes[i]), keys[i], float(scores[i]), None if values is None else values[i])
        self._seq = max(self._seq, int(state.get("next_seq", self._seq)))



class _NoneOnly(Spec):
    """A queue without values exports ``values: None``."""

    def check(self, value: Any, path: str, dims: dict[str, int]) -> None:
        if value is not None:
            raise StateRejected(path, "must be null (this queue holds no values)")
