"""Dynamic batching for asyncio servers: requests arriving within a short window run together.

TorchServe batches in its Java frontend (batchSize / maxBatchDelay); KServe's Python model
server has no in-process batcher (its batcher sidecar only understands the v1 "instances"
protocol), so the KServe adapter uses this one with the same two knobs. The batch function runs
in a worker thread, off the event loop, and must return one result per item: a failing request
is one failed result, never an exception for the whole batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Collect up to `max_size` items for at most `max_delay_s` after the first, run them at once."""

    def __init__(self, run_batch: Callable[[Sequence[T]], list[R]], max_size: int = 4,
                 max_delay_s: float = 0.05) -> None:
        if max_size < 1 or max_delay_s < 0:
            raise ValueError("max_size must be >= 1 and max_delay_s >= 0")
        self.run_batch = run_batch
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """The result for `item`, once the batch it joined has run."""
        loop = asyncio.get_running_loop()
        if self.max_size == 1:
            return (await loop.run_in_executor(None, self.run_batch, [item]))[0]
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._collect())
        future: asyncio.Future[R] = loop.create_future()
        await self._queue.put((item, future))
        return await future

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_delay_s
            while len(batch) < self.max_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            if len(batch) > 1:
                log.info("batch of %d requests", len(batch))
            try:
                results = await loop.run_in_executor(None, self.run_batch, [item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - run_batch broke its contract: fail these, keep serving
                log.exception("batch failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
