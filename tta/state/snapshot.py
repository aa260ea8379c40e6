"""The snapshot format and the atomic snapshot file.

A snapshot is a header (magic, format version, generation, payload length, SHA-256) followed by
a `torch.save` payload of tensors and plain values, read back with ``weights_only=True`` (a
snapshot can never carry code). The same bytes are what the file backend writes, what the Redis
backend stores next to its operation log, and what an ``import`` operation carries.
`StateStore` writes one file per (deployment, owner) atomically (temp file + fsync + rename +
directory fsync): a reader sees the old snapshot or the new one, never half of one.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tta.state.schema import check_meta  # noqa: F401 - re-exported (older imports)

log = logging.getLogger(__name__)

MAGIC = b"TTASTATE"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQQ32s")  # magic, format version, generation, payload length, sha256


def safe_name(name: str) -> str:
    """A file-name/key-safe form of a deployment or owner name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:120] or "default"


class StateStore:
    """One snapshot file `<dir>/<name>.state` (+ `<name>.lock`): atomic writes, verified reads."""

    def __init__(self, directory: str | Path, name: str) -> None:
        self.directory = Path(directory)
        self.name = safe_name(name)
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
            return self.load_checked()
        except ValueError as exc:
            log.warning("state snapshot %s refused: %s; starting empty", self.path, exc)
            return None

    def load_checked(self) -> tuple[dict[str, Any], int] | None:
        """(state, generation); None when there is no file; ValueError saying what is wrong with one."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ValueError(f"unreadable ({exc})") from exc
        return loads_with_generation(raw)

    def keep_rejected(self) -> str | None:
        """Copy the snapshot aside as `<name>.state.rejected` (replacing an older one), so the next
        save may overwrite the original while the refused one stays for inspection; its path."""
        if not self.path.exists():
            return None
        target = self.path.with_name(self.path.name + ".rejected")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".rejected.tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(self.path.read_bytes())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return str(target)

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


def release_owner(fd: int) -> None:
    """Give up an ownership taken with `StateStore.acquire_owner` (tests; workers keep it until exit)."""
    with _owner_lock:
        for key, owned in list(_owned.items()):
            if owned == fd:
                del _owned[key]
    with contextlib.suppress(OSError):
        os.close(fd)


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
