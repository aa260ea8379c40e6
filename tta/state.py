"""Stream state that outlives a request: bounded per-class caches and durable, shared snapshots.

Three pieces, used by the stream methods (TDA, TFUP, GDA) and nothing else:

- `ClassQueues`: per-class queues of feature vectors with a per-class capacity *and* a total cap,
  both enforced on every insert (TDA's lowest-entropy priority queues, or newest-first FIFO).
- `StateStore`: one snapshot file per (deployment, method), written atomically (temp file +
  fsync + rename + directory fsync) with a magic, a format version, a generation counter and a
  SHA-256 checksum. A missing, corrupt or incompatible file reads as "no state" with a logged
  warning; it never raises into a worker.
- `StreamState`: ties a method to its store according to the process-wide `StateConfig`:
  restore on start, then either ``shared`` sync (every state change happens under an exclusive
  file lock, after reloading any newer generation another worker wrote, and is written back at
  once: all TorchServe workers of a deployment see one state) or ``interval`` sync (one worker
  owns the state, holds the lock for its lifetime and snapshots every N updates; a second worker
  refuses stream requests with `Unavailable` instead of silently diverging).

Configuration: `configure(...)` (the handler calls it with the archive's config) or the
environment: ``TTA_STATE_DIR`` (no directory: state lives in the process only),
``TTA_STATE_SYNC`` (``shared`` | ``interval``), ``TTA_STATE_EVERY`` (interval snapshots),
``TTA_STATE_DEPLOYMENT`` (namespaces the files, e.g. the TorchServe model name).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import re
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from tta.errors import Unavailable

log = logging.getLogger(__name__)

MAGIC = b"TTASTATE"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQQ32s")  # magic, format version, generation, payload length, sha256
Policy = Literal["lowest", "fifo"]
SyncMode = Literal["shared", "interval"]


# --------------------------------------------------------------------------------------------
# Bounded per-class queues
# --------------------------------------------------------------------------------------------
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
        if device is not None and keys.numel():
            keys = keys.to(device)
            classes = classes.to(device)
            values = values.to(device) if values is not None else None
        return keys, classes, values

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

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore entries, re-applying this instance's caps (a snapshot from a larger config shrinks)."""
        self.clear()
        keys, classes = state["keys"], state["classes"]
        values, scores, seqs = state.get("values"), state["scores"], state["seqs"]
        order = sorted(range(len(classes)), key=lambda i: int(seqs[i]))
        for i in order:  # replay in insertion order with the original sequence numbers
            self._seq = int(seqs[i])
            self.offer(int(classes[i]), keys[i], float(scores[i]), None if values is None else values[i])
        self._seq = max(self._seq, int(state.get("next_seq", self._seq)))


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateConfig:
    """Where and how stream state is persisted; one per worker process."""

    directory: Path | None = None
    deployment: str = "default"
    sync: SyncMode = "shared"
    every: int = 50

    @classmethod
    def from_env(cls) -> StateConfig:
        directory = os.environ.get("TTA_STATE_DIR") or None
        sync = os.environ.get("TTA_STATE_SYNC", "shared")
        if sync not in ("shared", "interval"):
            log.warning("TTA_STATE_SYNC=%r is not 'shared' or 'interval'; using 'shared'", sync)
            sync = "shared"
        try:
            every = max(1, int(os.environ.get("TTA_STATE_EVERY", "50")))
        except ValueError:
            every = 50
        return cls(directory=Path(directory) if directory else None,
                   deployment=os.environ.get("TTA_STATE_DEPLOYMENT", "default"), sync=sync, every=every)  # type: ignore[arg-type]


_config: StateConfig | None = None
_config_lock = threading.Lock()


def configure(config: StateConfig | None = None, **changes: Any) -> StateConfig:
    """Set the process-wide state config (methods created afterwards use it); returns the previous one.

    `configure(directory=..., deployment=model_name)` from the handler; `configure(None)` returns
    to the environment's settings.
    """
    global _config
    with _config_lock:
        previous = current_config() if _config is None else _config
        if config is None and not changes:
            _config = None
        else:
            base = config if config is not None else previous
            if changes.get("directory") not in (None, ""):
                changes["directory"] = Path(changes["directory"])
            elif "directory" in changes:
                changes["directory"] = None
            if "every" in changes:
                changes["every"] = max(1, int(changes["every"]))
            if "sync" in changes and changes["sync"] not in ("shared", "interval"):
                raise ValueError(f"state sync must be 'shared' or 'interval', not {changes['sync']!r}")
            _config = replace(base, **changes)
        return previous


def current_config() -> StateConfig:
    return _config if _config is not None else StateConfig.from_env()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:120] or "default"


# --------------------------------------------------------------------------------------------
# Atomic snapshot file
# --------------------------------------------------------------------------------------------
class StateStore:
    """One snapshot file `<dir>/<name>.state` (+ `<name>.lock`): atomic writes, verified reads."""

    def __init__(self, directory: str | Path, name: str) -> None:
        self.directory = Path(directory)
        self.name = _safe_name(name)
        self.path = self.directory / f"{self.name}.state"
        self.lock_path = self.directory / f"{self.name}.lock"

    def save(self, state: Mapping[str, Any], generation: int = 0) -> int:
        """Write atomically; returns bytes written. Readers see the old file or the new one, never half."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data = dumps(state, generation)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.directory)
        return len(data)

    def read_generation(self) -> int | None:
        """The generation in the header (cheap: no checksum); None when there is no readable file."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(_HEADER.size)
        except OSError:
            return None
        if len(raw) < _HEADER.size:
            return None
        magic, _version, generation, _length, _digest = _HEADER.unpack(raw)
        return int(generation) if magic == MAGIC else None

    def load(self) -> tuple[dict[str, Any], int] | None:
        """(state, generation), or None with a logged warning when missing/corrupt/incompatible."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("state snapshot %s unreadable (%s); starting empty", self.path, exc)
            return None
        try:
            return loads_with_generation(raw)
        except ValueError as exc:
            log.warning("state snapshot %s refused: %s; starting empty", self.path, exc)
            return None

    @contextlib.contextmanager
    def locked(self, blocking: bool = True) -> Iterator[bool]:
        """Exclusive advisory lock on `<name>.lock` (flock); yields False when non-blocking and busy."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def acquire_owner(self) -> int | None:
        """Hold the lock for the process lifetime; the fd, or None if another *process* holds it.

        Ownership is per process: instances in the owning process share its fd (released at exit).
        """
        key = str(self.lock_path.resolve())
        with _owner_lock:
            if key in _owned:
                return _owned[key]
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            _owned[key] = fd
            return fd


_owned: dict[str, int] = {}
_owner_lock = threading.Lock()


def dumps(state: Mapping[str, Any], generation: int = 0) -> bytes:
    """The snapshot format as bytes (also what `export` hands to clients): header + torch payload."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(_checked_fields(FORMAT_VERSION, generation, len(payload)) + payload).digest()
    return _HEADER.pack(MAGIC, FORMAT_VERSION, generation, len(payload), digest) + payload


def loads(raw: bytes) -> dict[str, Any]:
    """Inverse of `dumps`; ValueError saying what is wrong (bad magic, version, checksum, payload)."""
    return loads_with_generation(raw)[0]


def loads_with_generation(raw: bytes) -> tuple[dict[str, Any], int]:
    problem = _verify(raw)
    if problem:
        raise ValueError(problem)
    generation = _HEADER.unpack(raw[: _HEADER.size])[2]
    try:  # weights_only: a snapshot can hold tensors and plain values, never code
        state = torch.load(io.BytesIO(raw[_HEADER.size:]), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"payload does not decode ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(state, dict):
        raise ValueError("payload is not a mapping")
    return state, int(generation)


def _verify(raw: bytes) -> str | None:
    if len(raw) < _HEADER.size:
        return f"truncated ({len(raw)} bytes)"
    magic, version, generation, length, digest = _HEADER.unpack(raw[: _HEADER.size])
    if magic != MAGIC:
        return "not a clip-tta state file (bad magic)"
    if version != FORMAT_VERSION:
        return f"format version {version}, this build reads {FORMAT_VERSION}"
    payload = raw[_HEADER.size:]
    if len(payload) != length:
        return f"payload length {len(payload)} != recorded {length}"
    if hashlib.sha256(_checked_fields(version, generation, length) + payload).digest() != digest:
        return "checksum mismatch"
    return None


def _checked_fields(version: int, generation: int, length: int) -> bytes:
    return struct.pack("<IQQ", version, generation, length)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# A method's link to its store
# --------------------------------------------------------------------------------------------
@dataclass
class SyncStats:
    """What `state_summary` reports about persistence."""

    generation: int = 0
    saves: int = 0
    loads: int = 0
    last_save_ms: float = 0.0
    last_save_bytes: int = 0
    restored: bool = False
    warnings: list[str] = field(default_factory=list)


class StreamState:
    """Persistence and cross-worker sync for one stream method instance.

    The method gives two callables: `export()` -> a dict of tensors/plain values, and
    `restore(state)` which raises `ValueError` when the state does not fit (other labels, other
    feature size). All state changes go through `with host.transaction(): ...; host.changed()`.
    """

    def __init__(self, method: str, export: Callable[[], dict[str, Any]],
                 restore: Callable[[Mapping[str, Any]], None], config: StateConfig | None = None) -> None:
        self.method = method
        self.config = config if config is not None else current_config()
        self._export = export
        self._restore = restore
        self.stats = SyncStats()
        self._updates_since_save = 0
        self._dirty = False
        self._owner_fd: int | None = None
        self._lock = threading.RLock()
        self.store: StateStore | None = None
        self._needs_owner = False
        if self.config.directory is None and self.config.deployment != "default":
            # A served model without a state directory keeps state in this process only: make sure
            # it is the only process serving it, so no client sees two diverging states.
            self._needs_owner = True
            owners = StateStore(Path(tempfile.gettempdir()) / "clip-tta-owners", f"{self.config.deployment}.{method}")
            self._owner_fd = owners.acquire_owner()
            if self._owner_fd is None:
                log.warning("another worker process serves '%s' of deployment %s with per-process state (%s); "
                            "this worker will refuse '%s' requests", method, self.config.deployment,
                            owners.lock_path, method)
        if self.config.directory is not None:
            self.store = StateStore(self.config.directory, f"{self.config.deployment}.{method}")
            if self.config.sync == "interval":
                self._owner_fd = self.store.acquire_owner()
                if self._owner_fd is None:
                    log.warning("stream state of %s is owned by another worker process (%s held); this "
                                "worker will refuse '%s' requests", method, self.store.lock_path, method)

    @property
    def mode(self) -> str:
        if self.store is None:
            return "process"
        return self.config.sync

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "generation": self.stats.generation, "saves": self.stats.saves,
                               "restored": self.stats.restored, "worker_pid": os.getpid()}
        if self.store is not None:
            out.update(path=str(self.store.path), last_save_ms=round(self.stats.last_save_ms, 3),
                       last_save_bytes=self.stats.last_save_bytes)
            if self.mode == "interval":
                out.update(every=self.config.every, owner=self._owner_fd is not None)
        if self._needs_owner:
            out["owner"] = self._owner_fd is not None
        if self.stats.warnings:
            out["warnings"] = list(self.stats.warnings[-3:])
        return out

    def _warn(self, message: str) -> None:
        log.warning("%s: %s", self.method, message)
        self.stats.warnings.append(message)

    def _load_into_method(self) -> bool:
        assert self.store is not None
        loaded = self.store.load()
        if loaded is None:
            if self.store.path.exists():
                self.stats.warnings.append("snapshot refused (corrupt or incompatible); started empty")
            return False
        state, generation = loaded
        try:
            self._restore(state)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
            self._warn(f"snapshot {self.store.path} does not fit this deployment ({exc}); starting empty")
            return False
        self.stats.generation = generation
        self.stats.loads += 1
        return True

    def restore_on_start(self) -> bool:
        """Load the snapshot if there is one; a bad one leaves the method empty (logged)."""
        if self.store is None:
            return False
        with self._lock:
            self.stats.restored = self._load_into_method()
            if self.stats.restored:
                log.info("%s: restored stream state generation %d from %s", self.method,
                         self.stats.generation, self.store.path)
            return self.stats.restored

    def changed(self) -> None:
        """Mark the state as modified inside a transaction."""
        self._dirty = True

    @contextlib.contextmanager
    def transaction(self, force_save: bool = False) -> Iterator[None]:
        """Run a read-modify-write of the state under this mode's rules."""
        with self._lock:
            if self.store is None:
                if self._needs_owner and self._owner_fd is None:
                    raise Unavailable(
                        f"stream method '{self.method}' keeps its state in one worker process and another worker "
                        f"of deployment '{self.config.deployment}' owns it; run one worker for this model "
                        "(minWorkers=maxWorkers=1) or give it a state directory (state_dir, shared sync)")
                yield
                self._dirty = False
                return
            if self.mode == "interval":
                if self._owner_fd is None:
                    raise Unavailable(
                        f"stream method '{self.method}' keeps its state in one worker process and another "
                        f"worker owns it ({self.store.lock_path}); run one worker for this model "
                        "(minWorkers=maxWorkers=1) or use TTA_STATE_SYNC=shared")
                yield
                if self._dirty:
                    self._updates_since_save += 1
                if force_save or (self._dirty and self._updates_since_save >= self.config.every):
                    self._save(self.stats.generation + 1)
                self._dirty = False
                return
            with self.store.locked():
                generation = self.store.read_generation()
                if generation is not None and generation != self.stats.generation:
                    self._load_into_method()
                yield
                if self._dirty or force_save:
                    self._save(max(self.stats.generation, generation or 0) + 1)
                self._dirty = False

    def flush(self) -> None:
        """Write a snapshot now (export, shutdown)."""
        if self.store is None or (self.mode == "interval" and self._owner_fd is None):
            return
        with self.transaction(force_save=True):
            pass

    def _save(self, generation: int) -> None:
        assert self.store is not None
        start = time.perf_counter()
        try:
            size = self.store.save(self._export(), generation)
        except OSError as exc:  # a full or read-only volume must not take the worker down
            self._warn(f"snapshot write to {self.store.path} failed: {exc}")
            return
        self.stats.last_save_ms = (time.perf_counter() - start) * 1000.0
        self.stats.last_save_bytes = size
        self.stats.generation = generation
        self.stats.saves += 1
        self._updates_since_save = 0

    def close(self) -> None:
        """Give up ownership (tests; a worker keeps it until it exits)."""
        if self._owner_fd is not None:
            with _owner_lock:
                for key, fd in list(_owned.items()):
                    if fd == self._owner_fd:
                        del _owned[key]
            with contextlib.suppress(OSError):
                os.close(self._owner_fd)
            self._owner_fd = None


def check_meta(state: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first mismatch between a state's `meta` and what this method expects."""
    meta = state.get("meta")
    if not isinstance(meta, Mapping):
        raise ValueError("state has no 'meta' section")
    for key, value in expected.items():
        if value is None:
            continue
        got = meta.get(key)
        if isinstance(value, tuple | list):
            got = tuple(got) if isinstance(got, list | tuple) else got
            value = tuple(value)
        if got != value:
            raise ValueError(f"state {key} is {got!r}, expected {value!r}")


# --------------------------------------------------------------------------------------------
# Plumbing shared by the stream methods (TDA, TFUP, GDA)
# --------------------------------------------------------------------------------------------
class StreamStateMixin:
    """Inspect/reset/export/import and persistence for a `Method` with stream state.

    Mixed in before `Method`; the method implements `_export_state`, `_import_state`,
    `_clear_state` and `_summary`. State belongs to the deployment's label set: a snapshot or
    import is checked against the method name, state version, feature size, model and labels.
    """

    state_version: int = 1
    name: str
    clip: Any

    def _init_stream(self) -> None:
        self._names: tuple[str, ...] | None = None
        self.host = StreamState(self.name, self._export_with_meta, self._import_checked)
        self.host.restore_on_start()

    # --- to implement ---
    def _export_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _import_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _clear_state(self) -> None:
        raise NotImplementedError

    def _summary(self) -> dict[str, Any]:
        raise NotImplementedError

    # --- plumbing ---
    def _meta(self) -> dict[str, Any]:
        return {"method": self.name, "state_version": self.state_version, "embed_dim": int(self.clip.embed_dim),
                "model": str(self.clip.name), "labels": list(self._names) if self._names is not None else None}

    def _export_with_meta(self) -> dict[str, Any]:
        return {"meta": self._meta(), **self._export_state()}

    def _import_checked(self, state: Mapping[str, Any]) -> None:
        expected = {"method": self.name, "state_version": self.state_version,
                    "embed_dim": int(self.clip.embed_dim), "model": str(self.clip.name),
                    "labels": self._names}
        check_meta(state, expected)
        labels = state["meta"].get("labels")
        self._clear_state()
        self._import_state(state)
        self._names = tuple(labels) if labels else self._names

    def _bind_labels(self, names: tuple[str, ...]) -> None:
        """First request fixes the label set; a restored state for other labels is dropped (logged)."""
        if self._names is None:
            self._names = tuple(names)
        elif self._names != tuple(names):
            self.host._warn(f"stream state was built for labels {list(self._names)[:5]}..., the deployment "
                            f"serves {list(names)[:5]}...; starting empty")
            self._clear_state()
            self._names = tuple(names)
            self.host.changed()

    def reset(self) -> None:
        with self.host.transaction(force_save=True):
            self._clear_state()
            self.host.changed()

    def state_dict(self) -> dict[str, Any]:
        """The current state (after syncing with other workers); also snapshots it (export)."""
        with self.host.transaction(force_save=self.host.mode == "interval"):
            return self._export_with_meta()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from tta.errors import BadRequest

        if not isinstance(state, Mapping):
            raise BadRequest("state must be a JSON object exported by the same method", code="bad_state")
        with self.host.transaction():
            try:
                self._import_checked(state)
            except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
                raise BadRequest(f"cannot import {self.name} state: {exc}", code="bad_state") from exc
            self.host.changed()

    def state_summary(self) -> dict[str, Any]:
        with self.host.transaction():
            out = self._summary()
        out["persistence"] = self.host.describe()
        return out
