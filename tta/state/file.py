"""File snapshots for a single-replica deployment: state in one worker, a snapshot every N ops.

The worker process that takes the snapshot's owner lock restores the snapshot on start, applies
operations in memory and writes an atomic snapshot every `every` operations, on every reset or
import, and on export. A snapshot that is corrupt or fails validation is refused: copied aside as
`<name>.state.rejected` for inspection, counted, and the worker starts empty (and says so). Other worker processes refuse stream requests (503): to serve one state
from several workers or pods, use the Redis backend.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tta.state.host import as_rejection
from tta.state.ops import HOST_KINDS, Op
from tta.state.process import ProcessHost
from tta.state.snapshot import StateStore

log = logging.getLogger(__name__)
EMPTY = "starting empty (the file backend has no log to replay)"


class FileHost(ProcessHost):
    mode = "file"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert self.config.directory is not None
        self.store = StateStore(self.config.directory, f"{self.config.deployment}.{self.name}")
        self.generation = 0
        self._since_save = 0

    def _start(self) -> None:
        self._needs_owner = True
        self._take_ownership(self.store)
        if self._owner_fd is None:
            return
        where = str(self.store.path)
        try:
            loaded = self.store.load_checked()
        except ValueError as exc:  # corrupt: checksum, truncation, not a snapshot
            self.refuse_snapshot(as_rejection(exc), where, lambda _: self.store.keep_rejected(), EMPTY)
            return
        if loaded is None:
            return
        state, generation = loaded
        self.stats.restored = self._restore(state, where, lambda _: self.store.keep_rejected(), EMPTY)
        if self.stats.restored:
            self.generation = generation
        if self.stats.restored:
            log.info("%s: restored stream state generation %d from %s", self.name, self.generation, self.store.path)

    def _after_apply(self, op: Op) -> None:
        self._since_save += 1
        if op.get("kind") in HOST_KINDS or self._since_save >= self.config.snapshot_every():
            self._save()

    def flush(self) -> None:
        with self._lock:
            self.start()
            if self._owner_fd is not None:
                self._save()

    def _save(self) -> None:
        start = time.perf_counter()
        try:
            size = self.store.save(self.owner.snapshot(), self.generation + 1)
        except OSError as exc:  # a full or read-only volume must not take the worker down
            self._warn(f"snapshot write to {self.store.path} failed: {exc}")
            return
        self.generation += 1
        self._since_save = 0
        self.stats.snapshots += 1
        self.stats.last_snapshot_ms = (time.perf_counter() - start) * 1000.0
        self.stats.last_snapshot_bytes = size

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(path=str(self.store.path), generation=self.generation, every=self.config.snapshot_every())
        return out
