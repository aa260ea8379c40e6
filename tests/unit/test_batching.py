"""The micro-batcher's dispatch rules, driven step by step: the batch function blocks on an event
the test releases, so which items share a batch is decided by the protocol, never by timing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence

import pytest

from tta.serving.batching import MicroBatcher, QueueFull

HOUR = 3600.0  # a batch delay no test reaches: only the size closes a batch


class Worker:
    """A batch function that records each batch and blocks until the test lets it finish."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Semaphore(0)
        self.gates: list[threading.Event] = []
        self.lock = threading.Lock()

    def __call__(self, items: Sequence[int]) -> list[int]:
        gate = threading.Event()
        with self.lock:
            self.batches.append(list(items))
            self.gates.append(gate)
        self.started.release()
        assert gate.wait(timeout=30), "the test never released this batch"
        return [x * 10 for x in items]

    def release(self, index: int) -> None:
        self.gates[index].set()


async def until(condition: Callable[[], bool], what: str, turns: int = 10_000) -> None:
    """Yield to the event loop until `condition` holds (bounded by turns, not by time)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def started(worker: Worker, n: int) -> None:
    """Wait (off the loop) until the worker thread has begun its n-th batch."""
    loop = asyncio.get_running_loop()
    while len(worker.batches) < n:
        assert await loop.run_in_executor(None, worker.started.acquire, True, 30), f"batch {n} never started"


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=60))


def test_a_lone_request_is_dispatched_at_once_whatever_the_delay() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = MicroBatcher(worker, max_size=8, max_delay_s=HOUR)
        task = asyncio.create_task(batcher.submit(1))
        await started(worker, 1)  # no timer could have fired: the delay is an hour
        assert worker.batches == [[1]] and batcher.running
        worker.release(0)
        assert await task == 10
        await until(lambda: not batcher.running, "worker idle")
        task = asyncio.create_task(batcher.submit(2))  # idle again: again at once
        await started(worker, 2)
        worker.release(1)
        assert await task == 20 and batcher.admitted == 0

    run(scenario)


def test_arrivals_during_a_batch_form_the_next_batch_up_to_max_size() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = MicroBatcher(worker, max_size=3, max_delay_s=HOUR)
        first = asyncio.create_task(batcher.submit(0))
        await started(worker, 1)
        later = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
        await until(lambda: batcher.admitted == 6, "all admitted")
        assert batcher.waiting() == [3, 2]  # full batch closed at 3; the rest opened the next
        worker.release(0)
        await started(worker, 2)
        assert worker.batches[1] == [1, 2, 3]
        worker.release(1)
        await started(worker, 3)  # the open batch starts when the worker frees, though not full
        assert worker.batches[2] == [4, 5]
        worker.release(2)
        assert await first == 0 and [await t for t in later] == [10, 20, 30, 40, 50]
        assert batcher.admitted == 0 and not batcher.running

    run(scenario)


def test_a_batch_closes_after_max_delay_and_later_arrivals_wait_for_the_next() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = MicroBatcher(worker, max_size=8, max_delay_s=0.0)  # closes on the next loop turn
        first = asyncio.create_task(batcher.submit(0))
        await started(worker, 1)
        second = asyncio.create_task(batcher.submit(1))
        await until(lambda: batcher.waiting() == [1] and batcher._open == [], "the delay closed batch 2")
        third = asyncio.create_task(batcher.submit(2))
        await until(lambda: batcher.waiting() == [1, 1], "batch 3 opened")
        worker.release(0)
        await started(worker, 2)
        worker.release(1)
        await started(worker, 3)
        worker.release(2)
        assert worker.batches == [[0], [1], [2]]
        assert [await t for t in (first, second, third)] == [0, 10, 20]

    run(scenario)


def test_beyond_max_inflight_submit_refuses_at_once_and_admits_again_after() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = MicroBatcher(worker, max_size=2, max_delay_s=HOUR, max_inflight=3)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        await started(worker, 1)
        await until(lambda: batcher.admitted == 3, "three admitted")
        with pytest.raises(QueueFull, match="more than 3"):
            await batcher.submit(99)
        assert batcher.admitted == 3  # the refused one took no place
        worker.release(0)
        await started(worker, 2)
        assert worker.batches == [[0], [1, 2]]
        await until(lambda: batcher.admitted == 2, "batch 1 answered")
        extra = asyncio.create_task(batcher.submit(3))  # room again
        worker.release(1)
        await started(worker, 3)
        worker.release(2)
        assert [await t for t in (*tasks, extra)] == [0, 10, 20, 30]

    run(scenario)


def test_a_broken_batch_fails_its_items_and_the_next_batch_still_runs() -> None:
    async def scenario() -> None:
        calls: list[list[int]] = []

        def flaky(items: Sequence[int]) -> list[int]:
            calls.append(list(items))
            if 13 in items:
                raise RuntimeError("boom")
            return list(items)

        batcher = MicroBatcher(flaky, max_size=4, max_delay_s=HOUR)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(13)
        assert await batcher.submit(7) == 7 and calls == [[13], [7]] and batcher.admitted == 0

    run(scenario)


def test_invalid_knobs_are_refused() -> None:
    for kwargs in ({"max_size": 0}, {"max_delay_s": -1.0}, {"max_inflight": -1}):
        with pytest.raises(ValueError):
            MicroBatcher(lambda items: list(items), **kwargs)
