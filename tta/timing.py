"""Stage timing for one request: the core records, the edge (handler, CLI) reports.

Methods call `timer.stage("encode")`; the serving layer turns the recorded milliseconds into
Prometheus histograms. The math code never imports a metrics library.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class StageTimer:
    """Wall-clock milliseconds per named stage; synchronises CUDA so GPU work is counted."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.timings_ms: dict[str, float] = {}

    def sync(self) -> None:
        """Wait for queued GPU work, so a wall-clock reading counts it (no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(name, (time.perf_counter() - start) * 1000.0)

    def add(self, name: str, ms: float) -> None:
        self.timings_ms[name] = self.timings_ms.get(name, 0.0) + ms
