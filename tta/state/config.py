"""Where stream state lives: one `StateConfig` per worker process.

Backends, chosen by what is configured (the archive's ``tta:`` section, or the environment):

- ``state_url`` / ``TTA_STATE_URL`` (``redis://``, ``rediss://``): the Redis operation log; any
  number of workers and pods serve one state;
- ``state_dir`` / ``TTA_STATE_DIR``: snapshot files, one worker process owns the state;
- neither: the state lives in the worker process only.

``TTA_STATE_DEPLOYMENT`` namespaces files and Redis keys (the handler sets the TorchServe model
name), ``TTA_STATE_EVERY`` sets how many operations lie between snapshots, and
``TTA_STATE_TIMEOUT_MS`` bounds every Redis call on the request path. A password can come from the
URL or ``TTA_STATE_PASSWORD``; URLs are only ever logged masked (`mask_url`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_EVERY = {"file": 50, "redis": 1000}
DEFAULT_TIMEOUT_MS = 250.0


@dataclass(frozen=True)
class StateConfig:
    """Where and how stream state is kept; one per worker process."""

    directory: Path | None = None
    deployment: str = "default"
    url: str | None = None
    every: int | None = None  # operations between snapshots; None = the backend's default
    timeout_ms: float = DEFAULT_TIMEOUT_MS  # per Redis call on the request path
    max_pending: int = 1024  # operations queued while Redis is away (the oldest beyond are dropped, counted)

    @property
    def backend(self) -> str:
        if self.url:
            return "redis"
        return "file" if self.directory is not None else "process"

    def snapshot_every(self) -> int:
        return self.every if self.every is not None else DEFAULT_EVERY.get(self.backend, 50)

    @classmethod
    def from_env(cls) -> StateConfig:
        directory = os.environ.get("TTA_STATE_DIR") or None
        if os.environ.get("TTA_STATE_SYNC") == "shared":
            log.warning("TTA_STATE_SYNC=shared is retired: share state between workers with TTA_STATE_URL (Redis)")
        return cls(directory=Path(directory) if directory else None,
                   deployment=os.environ.get("TTA_STATE_DEPLOYMENT", "default"),
                   url=os.environ.get("TTA_STATE_URL") or None,
                   every=_positive_int(os.environ.get("TTA_STATE_EVERY")),
                   timeout_ms=_positive_float(os.environ.get("TTA_STATE_TIMEOUT_MS")) or DEFAULT_TIMEOUT_MS)


def _positive_int(value: str | None) -> int | None:
    try:
        return max(1, int(value)) if value else None
    except ValueError:
        return None


def _positive_float(value: str | None) -> float | None:
    try:
        return max(1.0, float(value)) if value else None
    except ValueError:
        return None


_config: StateConfig | None = None
_config_lock = threading.Lock()


def configure(config: StateConfig | None = None, **changes: Any) -> StateConfig:
    """Set the process-wide state config (hosts opened afterwards use it); returns the previous one.

    `configure(url=..., deployment=model_name)` from the handler; `configure(None)` returns to the
    environment's settings. Empty values ("" or None) mean "not set".
    """
    global _config
    with _config_lock:
        previous = current_config()
        if config is None and not changes:
            _config = None
            return previous
        base = config if config is not None else previous
        if "sync" in changes:  # archives built before the Redis backend
            if changes.pop("sync") == "shared":
                log.warning("state_sync 'shared' (file lock) is retired; use state_url (Redis) to share state")
        if "directory" in changes:
            changes["directory"] = Path(changes["directory"]) if changes["directory"] not in (None, "") else None
        if "url" in changes:
            changes["url"] = str(changes["url"]) if changes["url"] not in (None, "") else None
            if changes["url"] and not re.match(r"^(redis|rediss|unix)://", changes["url"]):
                raise ValueError(f"state URL must be redis://, rediss:// or unix://, not {mask_url(changes['url'])}")
        if changes.get("every") is not None:
            changes["every"] = max(1, int(changes["every"]))
        if changes.get("timeout_ms") is not None:
            changes["timeout_ms"] = max(1.0, float(changes["timeout_ms"]))
        _config = replace(base, **{k: v for k, v in changes.items() if not (k == "timeout_ms" and v is None)})
        return previous


def current_config() -> StateConfig:
    return _config if _config is not None else StateConfig.from_env()


def mask_url(url: str | None) -> str | None:
    """The URL with any password replaced by ``***`` (the only form that may be logged or returned)."""
    if not url:
        return url
    return re.sub(r"^([a-z]+://)([^@/]*)@", lambda m: m.group(1) + _mask_userinfo(m.group(2)) + "@", url)


def _mask_userinfo(userinfo: str) -> str:
    user, sep, _password = userinfo.partition(":")
    return f"{user}:***" if sep else "***"
