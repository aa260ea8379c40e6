"""Answers remembered for labels that arrive later: is adaptation helping in this deployment?

Every served prediction gets an ``id``. A client that later learns the true class sends it
back (``{"action": "feedback", "id": ..., "label": ...}``, an admin action) and the worker
compares it with what zero-shot and the served method answered, counting the pair in
``tta_labelled_answers_total``. For that a worker remembers, per answer, only what the
comparison needs: the method, the zero-shot and served class indices, which label set they index
(None: the deployment's; else a key into a shared, reference-counted table of request label
sets), the time, whether it was labelled already, and, for methods that learn from labelled
answers (GDA's support set), the original-view image feature as float32 bytes.

Bounds: at most `max_entries` answers (the oldest goes first: an answer is used once, when its
label arrives, so least recently used is least recently answered) and none older than `ttl_s`;
at most `max_label_sets` distinct request label sets (a new one beyond that evicts the oldest
answers until one is free). Memory per entry is measured in tests/unit/test_answers.py.

An id names the worker that answered (a random tag drawn when the worker starts) and the
answer's time, so an id this worker does not hold gets the precise 4xx: older than the TTL
(410 ``answer_expired``), evicted by the bound (410 ``answer_evicted``), answered by another
worker process or an earlier run of this one (404 ``answer_elsewhere``), or never issued
(404 ``answer_unknown``). Workers share nothing: TorchServe hands a request to any worker of the
model, so with several workers a label reaches the answering one with probability 1/workers;
see docs/monitoring/labelled-answers.md for what a client does about it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tta.errors import BadRequest

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_MAX_LABEL_SETS = 64
MAX_ID_CHARS = 64
_ID = re.compile(r"^([0-9a-f]{8})-([0-9a-f]{1,13})-([0-9a-f]{16})$")  # worker - ms since epoch - random
CLOCK_SKEW_S = 60.0  # an id from further in the future than this was never issued


class AnswerNotFound(BadRequest):
    """404: an id this worker never issued, or one another worker holds."""


class AnswerGone(BadRequest):
    """410: an id this worker issued but no longer remembers (expired or evicted)."""


class AlreadyLabelled(BadRequest):
    """409: a second label for the same answer (it would count the answer twice)."""


class Answer:
    """What one remembered answer costs: see `AnswerMemory` for the bound per entry."""

    __slots__ = ("method", "zeroshot", "served", "label_set", "created", "feature", "labelled")

    def __init__(self, method: str, zeroshot: int, served: int, label_set: str | None, created: float,
                 feature: bytes | None = None) -> None:
        self.method = method
        self.zeroshot = zeroshot
        self.served = served
        self.label_set = label_set  # None: the deployment's label set
        self.created = created
        self.feature = feature  # float32 bytes of the original-view feature, methods that learn from answers only
        self.labelled = False


class AnswerMemory:
    """One worker's remembered answers: bounded by count, age and distinct request label sets."""

    def __init__(self, deployment_labels: Sequence[str], max_entries: int = DEFAULT_MAX_ENTRIES,
                 ttl_s: float = DEFAULT_TTL_S, max_label_sets: int = DEFAULT_MAX_LABEL_SETS,
                 clock: Callable[[], float] = time.time, worker: str | None = None) -> None:
        if max_entries < 0 or ttl_s <= 0 or max_label_sets < 1:
            raise ValueError("answer memory needs max_entries >= 0, ttl_s > 0 and max_label_sets >= 1")
        self.max_entries = int(max_entries)
        self.ttl_s = float(ttl_s)
        self.max_label_sets = int(max_label_sets)
        self.clock = clock
        self.worker = worker or secrets.token_hex(4)
        self._deployment = {name: i for i, name in enumerate(deployment_labels)}
        self._entries: OrderedDict[str, Answer] = OrderedDict()  # oldest first
        self._label_sets: dict[str, list[Any]] = {}  # key -> [names tuple, {name: index}, references]
        self._lock = threading.Lock()
        self.evicted = 0  # answers dropped by the count or label-set bound (not by age)
        self.expired = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any], deployment_labels: Sequence[str]) -> AnswerMemory:
        """The `answers_max_entries`, `answers_ttl_s` and `answers_max_label_sets` keys of a deployment."""
        return cls(deployment_labels, max_entries=int(config.get("answers_max_entries", DEFAULT_MAX_ENTRIES)),
                   ttl_s=float(config.get("answers_ttl_s", DEFAULT_TTL_S)),
                   max_label_sets=int(config.get("answers_max_label_sets", DEFAULT_MAX_LABEL_SETS)))

    def __len__(self) -> int:
        return len(self._entries)

    # --- remembering ---------------------------------------------------------------------------
    def remember(self, method: str, zeroshot_label: str, served_label: str, labels: Sequence[str] | None = None,
                 feature: bytes | None = None) -> str:
        """The id of a new answer; `labels` None = the deployment's label set (which both labels are of)."""
        now = self.clock()
        answer_id = f"{self.worker}-{int(now * 1000):x}-{secrets.token_hex(8)}"
        if self.max_entries == 0:
            return answer_id  # remembering is off: the id still names the answer (label -> 410 evicted)
        with self._lock:
            self._expire(now)
            key = None
            index = self._deployment
            if labels is not None:
                key = self._label_set_key(labels)
                if key not in self._label_sets:
                    while len(self._label_sets) >= self.max_label_sets and self._entries:
                        self._drop(next(iter(self._entries)), evicted=True)
                    names = tuple(labels)
                    self._label_sets[key] = [names, {n: i for i, n in enumerate(names)}, 0]
                self._label_sets[key][2] += 1
                index = self._label_sets[key][1]
            while len(self._entries) >= self.max_entries:
                self._drop(next(iter(self._entries)), evicted=True)
            self._entries[answer_id] = Answer(sys.intern(method), index[zeroshot_label], index[served_label], key, now,
                                              feature)
        return answer_id

    @staticmethod
    def _label_set_key(labels: Sequence[str]) -> str:
        return hashlib.blake2b("\x00".join(labels).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()

    def _drop(self, answer_id: str, evicted: bool) -> None:
        answer = self._entries.pop(answer_id)
        if evicted:
            self.evicted += 1
        else:
            self.expired += 1
        if answer.label_set is not None:
            entry = self._label_sets[answer.label_set]
            entry[2] -= 1
            if entry[2] == 0:
                del self._label_sets[answer.label_set]

    def _expire(self, now: float) -> None:
        """Drop answers older than the TTL (insertion order is age order: stop at the first young one)."""
        while self._entries:
            oldest_id, oldest = next(iter(self._entries.items()))
            if now - oldest.created <= self.ttl_s:
                return
            self._drop(oldest_id, evicted=False)

    # --- labelling -----------------------------------------------------------------------------
    def peek_method(self, answer_id: Any) -> str | None:
        """The method of a remembered answer (for metrics labels and audit), else None; changes nothing."""
        with self._lock:
            answer = self._entries.get(answer_id) if isinstance(answer_id, str) else None
            return answer.method if answer is not None else None

    def label(self, answer_id: str, label: str) -> tuple[Answer, int, Sequence[str]]:
        """Mark an answer labelled: (the answer, the label's class index, its label set's names); 4xx
        for every refusal.

        Refusals change nothing, so a client may resend a label that reached the wrong worker.
        """
        now = self.clock()
        with self._lock:
            self._expire(now)
            answer = self._entries.get(answer_id)
            if answer is None:
                raise self._missing(answer_id, now)
            names, index = self.label_set(answer)
            label = label.strip()
            if label not in index:
                shown = ", ".join(repr(n) for n in names[:10]) + (", ..." if len(names) > 10 else "")
                which = "the deployment's label set" if answer.label_set is None else "the request's label set"
                raise BadRequest(f"label {label[:80]!r} is not in {which} of answer {answer_id} ({shown})",
                                 code="unknown_label")
            if answer.labelled:
                raise AlreadyLabelled(f"answer {answer_id} is labelled already: each answer counts once",
                                      code="already_labelled")
            answer.labelled = True
            return answer, index[label], names

    def label_set(self, answer: Answer) -> tuple[Sequence[str], Mapping[str, int]]:
        """(names, name -> index) of the label set an answer's class indices refer to."""
        if answer.label_set is None:
            return tuple(self._deployment), self._deployment
        names, index, _ = self._label_sets[answer.label_set]
        return names, index

    def _missing(self, answer_id: str, now: float) -> BadRequest:
        """Why an id is not here, as precisely as the id itself tells (it carries worker and time)."""
        match = _ID.match(answer_id)
        if match is None:
            return AnswerNotFound(f"unknown answer id {answer_id[:MAX_ID_CHARS]!r}: not an id this server issues",
                                  code="answer_unknown")
        worker, created = match.group(1), int(match.group(2), 16) / 1000.0
        if created > now + CLOCK_SKEW_S:
            return AnswerNotFound(f"unknown answer id {answer_id!r}: it was never issued", code="answer_unknown")
        if now - created > self.ttl_s:
            return AnswerGone(f"answer {answer_id} is older than the {self.ttl_s:g} s this server remembers "
                              f"answers for; label answers sooner", code="answer_expired")
        if worker != self.worker:
            return AnswerNotFound(
                f"answer {answer_id} was given by another worker process (or an earlier run of this one); "
                f"each worker remembers only its own answers and this one is {self.worker}: send the label "
                f"again (the server picks a worker per request) or see docs/monitoring/labelled-answers.md",
                code="answer_elsewhere")
        return AnswerGone(f"answer {answer_id} was evicted: this worker remembers at most {self.max_entries} answers "
                          f"(and {self.max_label_sets} request label sets); label answers sooner or raise "
                          f"answers_max_entries", code="answer_evicted")

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"worker": self.worker, "remembered": len(self._entries), "max_entries": self.max_entries,
                    "ttl_s": self.ttl_s, "label_sets": len(self._label_sets), "max_label_sets": self.max_label_sets,
                    "evicted": self.evicted, "expired": self.expired}

