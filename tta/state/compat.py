"""`StreamState`: the pre-operation-log transaction API, kept for owners not yet ported to `open_host`.

It wraps the process or file backend only (a transaction cannot be replayed by other replicas):
with a Redis URL configured, such an owner keeps its state in one worker process and says so in
the log. Port an owner by giving it `apply(op)`, `snapshot()`, `restore(state)` and using
`open_host` (see `tta.state.host`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from tta.state.config import StateConfig, current_config
from tta.state.file import FileHost
from tta.state.host import StateHost, open_host

log = logging.getLogger(__name__)


class _Callbacks:
    def __init__(self, export: Callable[[], dict[str, Any]], restore: Callable[[Mapping[str, Any]], None]) -> None:
        self.snapshot, self._restore = export, restore

    def apply(self, op: Mapping[str, Any]) -> None:
        raise ValueError("a transaction-API owner has no operations")

    def restore(self, state: Mapping[str, Any] | None) -> None:
        if state is not None:
            self._restore(state)


class StreamState:
    """Deprecated: `with host.transaction(): ...; host.changed()` on the process/file backend."""

    def __init__(self, method: str, export: Callable[[], dict[str, Any]],
                 restore: Callable[[Mapping[str, Any]], None], config: StateConfig | None = None) -> None:
        config = config if config is not None else current_config()
        if config.url:
            log.warning("state owner %s uses the transaction API: its state stays in one worker process "
                        "(not in Redis) until it is ported to tta.state.open_host", method)
            config = replace(config, url=None)
        self.method = method
        self.host: StateHost = open_host(method, _Callbacks(export, restore), config)
        self.stats = self.host.stats
        self._dirty = False

    @property
    def mode(self) -> str:
        return self.host.mode

    def restore_on_start(self) -> bool:
        self.host.start()
        return self.host.stats.restored

    def changed(self) -> None:
        self._dirty = True

    @contextlib.contextmanager
    def transaction(self, force_save: bool = False) -> Iterator[None]:
        with self.host._lock:
            self.host.sync()  # a worker that does not own the state raises Unavailable here
            yield
            if isinstance(self.host, FileHost) and (self._dirty or force_save):
                self.host._since_save += 1
                if force_save or self.host._since_save >= self.host.config.snapshot_every():
                    self.host._save()
            self._dirty = False

    def flush(self) -> None:
        self.host.flush()

    def describe(self) -> dict[str, Any]:
        return self.host.describe()

    def close(self) -> None:
        self.host.close()
