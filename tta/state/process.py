"""In-process state: operations apply at once, nothing leaves the worker.

A served model (deployment other than ``default``) without a state URL or directory keeps its
state in exactly one worker process: the first to take an owner lock in the temp directory. Any
other worker process of the same deployment refuses stream requests with `Unavailable` (503)
instead of silently serving a second, diverging state.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from tta.errors import Unavailable
from tta.state.host import StateHost
from tta.state.ops import Op
from tta.state.snapshot import StateStore, release_owner

log = logging.getLogger(__name__)


class ProcessHost(StateHost):
    mode = "process"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner_fd: int | None = None
        self._needs_owner = False
        self._owner_path: Path | None = None

    def _start(self) -> None:
        if self.config.deployment == "default":
            return
        self._needs_owner = True
        owners = StateStore(Path(tempfile.gettempdir()) / "clip-tta-owners", f"{self.config.deployment}.{self.name}")
        self._take_ownership(owners)

    def _take_ownership(self, store: StateStore) -> None:
        self._owner_path = store.lock_path
        self._owner_fd = store.acquire_owner()
        if self._owner_fd is None:
            log.warning("another worker process serves '%s' of deployment %s (%s held); this worker will refuse "
                        "'%s' requests", self.name, self.config.deployment, store.lock_path, self.name)

    def _check_owner(self) -> None:
        if self._needs_owner and self._owner_fd is None:
            raise Unavailable(
                f"stream method '{self.name}' keeps its state in one worker process and another worker of "
                f"deployment '{self.config.deployment}' owns it ({self._owner_path}); run one worker for this model "
                "(minWorkers=maxWorkers=1) or give the deployment a state URL (Redis) to share the state")

    def _sync(self) -> bool:
        self._check_owner()
        return True

    def _commit(self, op: Op) -> bool:
        self._check_owner()
        self._apply(op)
        self._after_apply(op)
        return True

    def _after_apply(self, op: Op) -> None:
        """Hook: the file backend counts operations towards its next snapshot."""

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self._needs_owner:
            out["owner"] = self._owner_fd is not None
        return out

    def close(self) -> None:
        if self._owner_fd is not None:
            release_owner(self._owner_fd)
            self._owner_fd = None



