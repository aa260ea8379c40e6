"""tta.state: bounded class queues, atomic snapshots, corrupt-file handling, cross-worker sync."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tta.state import ClassQueues, StateConfig, StateStore, StreamState, dumps, loads


def _vec(i: float, d: int = 4) -> torch.Tensor:
    return torch.full((d,), float(i))


def test_lowest_queue_replaces_highest_score_when_full_and_keeps_ties() -> None:
    q = ClassQueues(per_class=3, max_total=100, policy="lowest")
    for score in (0.5, 0.3, 0.9):
        assert q.offer(0, _vec(score), score)
    assert [e.score for e in q.entries(0)] == [0.3, 0.5, 0.9]
    assert q.offer(0, _vec(0.7), 0.7)  # 0.7 < 0.9: replaces the worst
    assert [e.score for e in q.entries(0)] == [0.3, 0.5, 0.7]
    assert not q.offer(0, _vec(0.8), 0.8)  # worse than every entry: rejected
    assert not q.offer(0, _vec(99), 0.7)  # a tie keeps the older entry (strict '<' as in TDA)
    assert [float(e.key[0]) for e in q.entries(0)] == pytest.approx([0.3, 0.5, 0.7])


def test_fifo_queue_keeps_newest() -> None:
    q = ClassQueues(per_class=2, max_total=100, policy="fifo")
    for i in range(5):
        q.offer(1, _vec(i))
    assert sorted(float(e.key[0]) for e in q.entries(1)) == [3.0, 4.0]


def test_total_cap_evicts_globally_worst() -> None:
    q = ClassQueues(per_class=3, max_total=4, policy="lowest")
    q.offer(0, _vec(0), 0.1)
    q.offer(0, _vec(0), 0.9)
    q.offer(1, _vec(1), 0.2)
    q.offer(1, _vec(1), 0.3)
    assert len(q) == 4
    assert q.offer(2, _vec(2), 0.5)  # total 5 > 4: the 0.9 entry of class 0 goes
    assert len(q) == 4
    assert [e.score for e in q.entries(0)] == [0.1]
    assert not q.offer(2, _vec(2), 0.95)  # would be the worst itself: rejected
    assert q.counts() == {0: 1, 1: 2, 2: 1}


@pytest.mark.parametrize("policy", ["lowest", "fifo"])
def test_queues_stay_bounded_under_ten_times_capacity(policy: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q = ClassQueues(per_class=3, max_total=20, policy=policy)  # 10 classes x 3 = 30 > 20
    for _ in range(10 * 30):
        q.offer(int(torch.randint(0, 10, (1,), generator=gen)), torch.randn(8, generator=gen),
                float(torch.rand(1, generator=gen)))
        assert len(q) <= 20
        assert all(n <= 3 for n in q.counts().values())
    assert len(q) == 20
    keys, classes, _ = q.stacked()
    assert keys.shape == (20, 8) and classes.shape == (20,)


def test_queue_state_dict_round_trip() -> None:
    gen = torch.Generator().manual_seed(1)
    q = ClassQueues(per_class=2, max_total=50, policy="lowest")
    for i in range(30):
        q.offer(i % 5, torch.randn(4, generator=gen), float(torch.rand(1, generator=gen)), torch.rand(5, generator=gen))
    r = ClassQueues(per_class=2, max_total=50, policy="lowest")
    r.load_state_dict(q.state_dict())
    for a, b in zip(q.stacked(), r.stacked(), strict=True):
        assert torch.equal(a, b)


def test_store_round_trip_and_generation(tmp_path: Path) -> None:
    store = StateStore(tmp_path, "dep.tda")
    assert store.load() is None
    state = {"x": torch.arange(5.0), "n": 3, "names": ["a", "b"], "nested": {"y": None}}
    store.save(state, generation=7)
    loaded, generation = store.load()
    assert generation == 7 and store.read_generation() == 7
    assert torch.equal(loaded["x"], state["x"]) and loaded["names"] == ["a", "b"] and loaded["nested"] == {"y": None}
    assert loads(dumps(state))["n"] == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "version", "garbage"])
def test_corrupt_snapshot_is_refused_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  damage: str) -> None:
    store = StateStore(tmp_path, "dep.tda")
    store.save({"x": torch.arange(100.0)}, generation=1)
    raw = bytearray(store.path.read_bytes())
    if damage == "flip":
        raw[-10] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "magic":
        raw[:8] = b"NOTSTATE"
    elif damage == "version":
        raw[8] = 99
    else:
        raw = bytearray(b"\x00garbage")
    store.path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="tta.state"):
        assert store.load() is None
    assert "refused" in caplog.text


def test_interrupted_write_leaves_previous_snapshot_intact(tmp_path: Path) -> None:
    """A writer SIGKILLed mid-write (big payloads, saving in a loop) never corrupts the file."""
    script = textwrap.dedent(f"""
        import torch
        from tta.state import StateStore
        store = StateStore({str(tmp_path)!r}, "dep.tda")
        big = torch.randn(2_000_000)
        generation = 0
        while True:
            generation += 1
            store.save({{"big": big + generation, "generation": generation}}, generation=generation)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2])
    store = StateStore(tmp_path, "dep.tda")
    try:
        deadline = time.monotonic() + 60
        while (store.read_generation() or 0) < 3:
            assert proc.poll() is None, "writer died"
            assert time.monotonic() < deadline, "writer made no progress"
            time.sleep(0.02)
        # wait until a temp file exists, i.e. a write is in flight, then kill
        while not list(tmp_path.glob(".dep.tda.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    loaded = store.load()
    assert loaded is not None, "snapshot unreadable after the writer was killed"
    state, generation = loaded
    assert generation >= 3 and state["generation"] == generation
    assert torch.equal(state["big"][:3], state["big"][:3])  # decodes fully


class _Counter:
    """A minimal stream state for the host: a list of ints."""

    def __init__(self, config: StateConfig) -> None:
        self.items: list[int] = []
        self.host = StreamState("counter", lambda: {"items": list(self.items)}, self._restore, config)
        self.host.restore_on_start()

    def _restore(self, state: dict) -> None:
        self.items = list(state["items"])

    def add(self, value: int) -> None:
        with self.host.transaction():
            self.items.append(value)
            self.host.changed()


def test_shared_sync_gives_every_worker_the_same_state(tmp_path: Path) -> None:
    config = StateConfig(directory=tmp_path, deployment="m", sync="shared")
    a, b = _Counter(config), _Counter(config)
    for i in range(6):
        (a if i % 2 else b).add(i)
    with a.host.transaction():
        pass
    assert a.items == b.items or b.items == list(range(5))  # b syncs at its next transaction
    with b.host.transaction():
        pass
    assert a.items == b.items == list(range(6))
    c = _Counter(config)  # a restarted worker restores it
    assert c.items == list(range(6)) and c.host.stats.restored


OTHER_WORKER = """
import sys
from pathlib import Path
from tta.errors import Unavailable
from tta.state import StateConfig, StreamState
directory = None if sys.argv[1] == "-" else Path(sys.argv[1])
host = StreamState("counter", dict, lambda s: None,
                   StateConfig(directory=directory, deployment=sys.argv[2], sync=sys.argv[3]))
try:
    with host.transaction():
        pass
except Unavailable as exc:
    print("REFUSED", exc)
else:
    print("SERVED")
"""  # a separate process: ownership is per process


def _other_worker(directory: Path | None, deployment: str, sync: str) -> str:
    """A second worker process trying to serve the same deployment's stream state."""
    out = subprocess.run([sys.executable, "-c", OTHER_WORKER, str(directory) if directory else "-", deployment, sync],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    return out.stdout


def test_interval_sync_has_one_owner_and_snapshots_every_n(tmp_path: Path) -> None:
    config = StateConfig(directory=tmp_path, deployment="m", sync="interval", every=3)
    owner = _Counter(config)
    try:
        assert "REFUSED" in _other_worker(tmp_path, "m", "interval")
        for i in range(5):
            owner.add(i)
        assert owner.host.stats.saves == 1  # after 3 updates, not yet after 5
        owner.host.flush()
        loaded, _ = StateStore(tmp_path, "m.counter").load()
        assert loaded["items"] == list(range(5))
    finally:
        owner.host.close()


def test_no_directory_means_process_state_only(tmp_path: Path) -> None:
    counter = _Counter(StateConfig(directory=None))
    counter.add(1)
    assert counter.host.mode == "process" and counter.host.stats.saves == 0
    assert not any(tmp_path.iterdir())
    assert os.environ.get("TTA_STATE_DIR") is None or True


def test_served_model_without_directory_has_one_owner_process(tmp_path: Path) -> None:
    deployment = f"test-owner-{os.getpid()}-{time.monotonic_ns()}"
    config = StateConfig(directory=None, deployment=deployment)
    first, same_process = _Counter(config), _Counter(config)
    try:
        first.add(1)
        same_process.add(1)  # ownership is per process
        assert first.host.describe()["owner"]
        assert "REFUSED" in _other_worker(None, deployment, "shared")
    finally:
        first.host.close()
