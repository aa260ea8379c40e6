"""The seam between state owners and state backends.

An *owner* is anything with stream state (TDA, TFUP, GDA, the drift reference): it changes its
state only by applying *operations* (`tta.state.ops`) and can snapshot and restore itself. A
*host* binds one owner to one backend; the owner never knows which:

    host = open_host("tda", owner)      # backend from the process's StateConfig
    ok = host.commit(op)                # append op; apply every op up to and including it, in order
    ok = host.sync()                    # catch up with operations from other replicas
    host.reset(); host.load(state)      # the two operations every owner understands

`commit`/`sync` return False when the backend is unreachable: the owner then holds its last known
state and the caller answers from it (flagged ``"fallback": "state_unavailable"``); the
operation is kept and sent when the backend returns. Backends: `ProcessHost` (state in this
process), `FileHost` (snapshot files), `RedisHost` (an operation log shared by replicas).

Nothing unchecked enters the state (`tta.state.schema`): an owner's `apply`/`restore` validate
before they change anything. A request's own operation that fails is not appended (source
``request``); a log entry that fails to decode, validate or apply is skipped by every replica
alike (``log``); a snapshot that fails at start is refused, kept aside for inspection, and the
replica starts from the log or empty (``snapshot``); a refused import answers 400 (``import``).
Each is logged with what was refused and why, and reported to the `on_rejected` listeners (the
serving edge counts them in ``tta_state_rejected_total{model,method,source}``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from tta.state.config import StateConfig, current_config
from tta.state.ops import HOST_KINDS, IMPORT, RESET, Op
from tta.state.schema import StateRejected
from tta.state.snapshot import dumps, loads

log = logging.getLogger(__name__)

REJECTION_SOURCES = ("request", "log", "snapshot", "import")
_NOT_FITTING = (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError)


@dataclass(frozen=True)
class Rejection:
    """Something refused at the door of the state: by whom, from where, which field and rule."""

    deployment: str
    owner: str
    source: str  # one of REJECTION_SOURCES
    field: str
    rule: str
    entry: str | None = None  # log entry id, snapshot path or key


_listeners: list[Callable[[Rejection], None]] = []
_listeners_lock = threading.Lock()


def on_rejected(listener: Callable[[Rejection], None]) -> Callable[[], None]:
    """Call `listener` for every rejection in this process (metrics); returns the unsubscribe function."""
    with _listeners_lock:
        _listeners.append(listener)

    def remove() -> None:
        with _listeners_lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return remove


def as_rejection(exc: BaseException) -> StateRejected:
    """Any failure to take a value in, as a `StateRejected` (owners without a schema raise others)."""
    if isinstance(exc, StateRejected):
        return exc
    return StateRejected("state", f"{type(exc).__name__}: {str(exc)[:300]}")


class StateOwner(Protocol):
    """What a host needs from an owner. `apply` must be deterministic: same ops, same state."""

    def apply(self, op: Mapping[str, Any]) -> None:
        """Apply one operation of the owner's own kinds (never ``reset``/``import``)."""

    def snapshot(self) -> dict[str, Any]:
        """The whole state as tensors and plain values (what `restore` takes back)."""

    def restore(self, state: Mapping[str, Any] | None) -> None:
        """Replace the state; None = empty. Raise ValueError when `state` does not fit this owner."""


@dataclass
class HostStats:
    """What `describe` reports about a host (per worker process)."""

    applied: int = 0
    snapshots: int = 0
    restored: bool = False
    unavailable: int = 0  # calls answered from the last known state
    rejected: dict[str, int] = field(default_factory=dict)  # by source: operations, entries, snapshots refused
    dropped: int = 0  # operations dropped because too many were queued while the backend was away
    last_snapshot_ms: float = 0.0
    last_snapshot_bytes: int = 0
    warnings: list[str] = field(default_factory=list)


class StateHost:
    """Base of every backend: operation dispatch, reset/import, stats. Thread-safe."""

    mode: ClassVar[str] = "process"

    def __init__(self, name: str, owner: StateOwner, config: StateConfig | None = None) -> None:
        self.name = name
        self.owner = owner
        self.config = config if config is not None else current_config()
        self.stats = HostStats()
        self.available = True  # did the last commit/sync reach the backend?
        self._lock = threading.RLock()
        self._started = False

    # --- public API -----------------------------------------------------------------------
    def start(self) -> None:
        """Restore from the backend (idempotent; also done by the first commit/sync)."""
        with self._lock:
            if not self._started:
                self._started = True
                self._start()

    def sync(self) -> bool:
        """Catch up with operations other replicas made; False = backend unreachable (last known state)."""
        with self._lock:
            self.start()
            self.available = self._sync()
            return self.available

    def commit(self, op: Op) -> bool:
        """Append `op` to the log and apply it (after every earlier op); False = queued, not applied yet.

        An operation the owner refuses is not applied (in-process backends validate it as they
        apply it) and never appended to a shared log (`admit`): counted (source ``request``), logged.
        """
        with self._lock:
            self.start()
            self.available = self._commit(op)
            return self.available

    def reset(self) -> bool:
        return self.commit({"kind": RESET})

    def load(self, state: Mapping[str, Any]) -> bool:
        """Replace the state everywhere (the caller has validated `state`)."""
        return self.commit({"kind": IMPORT, "state": dumps(state)})

    def flush(self) -> None:
        """Persist a snapshot now where the backend keeps snapshots (export, shutdown)."""

    def close(self) -> None:
        """Release what the host holds (tests; a worker keeps it until it exits)."""

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "worker_pid": os.getpid(), "applied": self.stats.applied,
                               "restored": self.stats.restored, "available": self.available}
        if self.stats.snapshots:
            out.update(snapshots=self.stats.snapshots, last_snapshot_ms=round(self.stats.last_snapshot_ms, 3),
                       last_snapshot_bytes=self.stats.last_snapshot_bytes)
        if self.stats.unavailable or self.stats.dropped:
            out.update(unavailable=self.stats.unavailable, dropped=self.stats.dropped)
        if self.stats.rejected:
            out["rejected"] = dict(self.stats.rejected)
        if self.stats.warnings:
            out["warnings"] = list(self.stats.warnings[-3:])
        return out

    # --- for backends ---------------------------------------------------------------------
    def _start(self) -> None:
        pass

    def _sync(self) -> bool:
        return True

    def _commit(self, op: Op) -> bool:
        self._apply(op)
        return True

    def _apply(self, op: Mapping[str, Any], source: str = "request", entry: str | None = None) -> bool:
        """One operation, in log order; False when refused (the state is unchanged, the refusal
        counted). Never raises for bad content: every replica refuses the same operation alike."""
        kind = op.get("kind")
        try:
            if kind == RESET:
                self.owner.restore(None)
            elif kind == IMPORT:
                try:
                    state = loads(op["state"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise StateRejected("state", f"snapshot bytes do not decode ({exc})") from exc
                try:
                    self.owner.restore(state)
                except _NOT_FITTING as exc:
                    raise as_rejection(exc) from exc
            else:
                self.owner.apply(op)
        except StateRejected as exc:
            self.reject(source, exc, entry, "skipped; the state is unchanged")
            return False
        self.stats.applied += 1
        return True

    def admit(self, op: Mapping[str, Any]) -> bool:
        """Before an operation goes to a shared log: False (refusal counted) when the owner refuses it."""
        validate = getattr(self.owner, "validate_op", None)
        if validate is None or op.get("kind") in HOST_KINDS:
            return True
        try:
            validate(op)
        except StateRejected as exc:
            self.reject("request", exc, outcome="not appended to the log")
            return False
        return True

    def _restore(self, state: Mapping[str, Any] | None, where: str, keep: Callable[[StateRejected], str | None] | None = None,
                 fallback: str = "starting empty") -> bool:
        """Restore a snapshot; one that does not fit is refused (kept aside by `keep`, for inspection),
        counted, and the owner starts empty; never raises."""
        try:
            self.owner.restore(state)
        except _NOT_FITTING as exc:
            self.refuse_snapshot(as_rejection(exc), where, keep, fallback)
            self.owner.restore(None)
            return False
        return True

    def refuse_snapshot(self, exc: StateRejected, where: str, keep: Callable[[StateRejected], str | None] | None,
                        fallback: str) -> None:
        kept = None
        if keep is not None:
            try:
                kept = keep(exc)
            except Exception as err:  # noqa: BLE001 - keeping a copy is best effort; refusing is not
                log.warning("%s: could not keep the refused snapshot %s aside: %s", self.name, where, err)
        note = f"kept for inspection as {kept}; {fallback}" if kept else fallback
        self.reject("snapshot", exc, where, note)

    def reject(self, source: str, exc: StateRejected, entry: str | None = None, outcome: str = "") -> None:
        """Count, log and report one refusal (see `on_rejected`)."""
        what = {"request": "operation of this replica", "log": "log entry", "snapshot": "snapshot",
                "import": "import"}.get(source, source)
        where = f" {entry}" if entry else ""
        self._warn(f"{what}{where} refused: {exc.field}: {exc.rule}" + (f"; {outcome}" if outcome else ""))
        self.stats.rejected[source] = self.stats.rejected.get(source, 0) + 1
        event = Rejection(self.config.deployment, self.name, source, exc.field, exc.rule, entry)
        with _listeners_lock:
            listeners = list(_listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a metrics failure must not change what the state does
                log.exception("state rejection listener failed")

    def _warn(self, message: str) -> None:
        log.warning("%s: %s", self.name, message)
        self.stats.warnings.append(message)
        del self.stats.warnings[:-10]


def open_host(name: str, owner: StateOwner, config: StateConfig | None = None) -> StateHost:
    """The host for `owner` under the process's (or the given) config."""
    config = config if config is not None else current_config()
    if config.backend == "redis":
        from tta.state.redis_log import RedisHost

        return RedisHost(name, owner, config)
    if config.backend == "file":
        from tta.state.file import FileHost

        return FileHost(name, owner, config)
    from tta.state.process import ProcessHost

    return ProcessHost(name, owner, config)
