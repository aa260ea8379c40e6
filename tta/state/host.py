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
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from tta.state.config import StateConfig, current_config
from tta.state.ops import IMPORT, RESET, Op
from tta.state.snapshot import dumps, loads

log = logging.getLogger(__name__)


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
        """Append `op` to the log and apply it (after every earlier op); False = queued, not applied yet."""
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

    def _apply(self, op: Mapping[str, Any]) -> None:
        """One operation, in log order. Never raises for a bad import: all replicas fail it alike."""
        kind = op.get("kind")
        if kind == RESET:
            self.owner.restore(None)
        elif kind == IMPORT:
            try:
                self.owner.restore(loads(op["state"]))
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
                self._warn(f"imported state refused ({exc}); state is now empty")
                self.owner.restore(None)
        else:
            self.owner.apply(op)
        self.stats.applied += 1

    def _restore(self, state: Mapping[str, Any] | None, where: str) -> bool:
        """Restore a snapshot; one that does not fit leaves the owner empty (logged), never raises."""
        try:
            self.owner.restore(state)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            self._warn(f"snapshot {where} does not fit this deployment ({exc}); starting empty")
            self.owner.restore(None)
            return False
        return True

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
