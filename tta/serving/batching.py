"""Dynamic batching for asyncio servers that adds no latency when the worker is idle.

TorchServe batches in its Java frontend (batchSize / maxBatchDelay); KServe's Python model
server has no in-process batcher (its batcher sidecar only understands the v1 "instances"
protocol), so the KServe adapter uses this one with the same two knobs.

The classic micro-batcher (Triton's, TorchServe's, LitServe's) holds the first request of a
batch for up to ``max_delay`` hoping for company, so a lone client pays the whole delay on every
request. Here the worker runs one batch at a time and

- an arrival while no batch runs is dispatched at once (a batch of one: no waiting for nothing);
- arrivals while a batch runs are collected into the next batch, which closes at `max_size`
  items or `max_delay_s` after its first arrival, whichever comes first (later arrivals start
  the batch after it); the next batch starts the moment the running one ends, closed or not
  (the worker never idles while requests wait);
- at most `max_inflight` items are admitted (queued or running); beyond that `submit` raises
  `QueueFull` at once, which servers answer with 503 and Retry-After.

The batch function runs in a worker thread, off the event loop, and must return one result per
item: a failing request is one failed result, never an exception for the whole batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """More than `max_inflight` requests admitted: refuse (503 + Retry-After), do not queue."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} requests queued or running; retry later")
        self.limit = limit


class MicroBatcher(Generic[T, R]):
    """One batch runs at a time; see the module docstring for when a batch starts and closes."""

    def __init__(self, run_batch: Callable[[Sequence[T]], list[R]], max_size: int = 4,
                 max_delay_s: float = 0.05, max_inflight: int = 0) -> None:
        if max_size < 1 or max_delay_s < 0 or max_inflight < 0:
            raise ValueError("max_size must be >= 1, max_delay_s >= 0 and max_inflight >= 0 (0: unbounded)")
        self.run_batch = run_batch
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.max_inflight = max_inflight
        self._open: list[tuple[T, asyncio.Future[R]]] = []  # the next batch, still collecting
        self._closed: deque[list[tuple[T, asyncio.Future[R]]]] = deque()  # full or timed out, waiting
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None
        self._admitted = 0
        self.batch_sizes: list[int] = []  # sizes of the last batches run (bounded; for tests and logs)

    # --- what tests and metrics can read ---------------------------------------------------------
    @property
    def admitted(self) -> int:
        """Items queued or running."""
        return self._admitted

    @property
    def running(self) -> bool:
        return self._running is not None and not self._running.done()

    def waiting(self) -> list[int]:
        """Sizes of the batches waiting for the worker, oldest first (the open one last)."""
        return [len(b) for b in self._closed] + ([len(self._open)] if self._open else [])

    # --- the protocol --------------------------------------------------------------------------------
    async def submit(self, item: T) -> R:
        """The result for `item`, once the batch it joined has run; `QueueFull` when over the bound."""
        if self.max_inflight and self._admitted >= self.max_inflight:
            raise QueueFull(self.max_inflight)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._admitted += 1
        future.add_done_callback(self._release)
        if not self.running and not self._closed and not self._open:
            self._start([(item, future)])  # the worker is idle: no reason to wait
        else:
            self._collect(item, future, loop)
        return await asyncio.shield(future)  # a cancelled client must not cancel its batch peers

    def _release(self, _: asyncio.Future[R]) -> None:
        self._admitted -= 1

    def _collect(self, item: T, future: asyncio.Future[R], loop: asyncio.AbstractEventLoop) -> None:
        self._open.append((item, future))
        if len(self._open) >= self.max_size:
            self._close()
        elif len(self._open) == 1:
            self._timer = loop.call_later(self.max_delay_s, self._close)

    def _close(self) -> None:
        """The open batch takes no more arrivals (full, or its delay passed)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._open:
            self._closed.append(self._open)
            self._open = []

    def _next(self) -> None:
        """The worker is free: start the oldest waiting batch, closing the open one if it is next."""
        if not self._closed:
            self._close()
        if self._closed:
            self._start(self._closed.popleft())

    def _start(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batch_sizes = [*self.batch_sizes[-99:], len(batch)]
        self._running = asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        if len(batch) > 1:
            log.info("batch of %d requests", len(batch))
        try:
            results = await loop.run_in_executor(None, self.run_batch, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001 - run_batch broke its contract: fail these, keep serving
            log.exception("batch failed")
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._running = None
            self._next()
