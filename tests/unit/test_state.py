"""tta.state: bounded class queues, atomic snapshots, corrupt-file handling, operations, the process/file hosts."""

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

from tta.state import ClassQueues, StateConfig, StateStore, dumps, loads, mask_url, open_host
from tta.state import ops as state_ops


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
        # Wait on conditions, not on a wall-clock guess of this machine's speed: a 60 s deadline
        # failed under load (the writer's torch import alone took most of it). A writer that stops
        # making progress is caught by the suite's per-test timeout (pytest-timeout).
        while (store.read_generation() or 0) < 3:
            assert proc.poll() is None, "writer died"
            time.sleep(0.02)
        # wait until a temp file exists, i.e. a write is in flight, then kill
        while not list(tmp_path.glob(".dep.tda.*.tmp")):
            assert proc.poll() is None, "writer died"
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


class Counter:
    """A minimal state owner: a list of ints; operations ``{"kind": "add", "value": n}``."""

    def __init__(self, config: StateConfig, name: str = "counter") -> None:
        self.items: list[int] = []
        self.host = open_host(name, self, config)
        self.host.start()

    def apply(self, op: dict) -> None:
        self.items.append(int(op["value"]))

    def snapshot(self) -> dict:
        return {"items": list(self.items)}

    def restore(self, state: dict | None) -> None:
        self.items = [] if state is None else list(state["items"])

    def add(self, value: int) -> bool:
        return self.host.commit({"kind": "add", "value": value})


def test_operation_wire_form_is_exact() -> None:
    op = {"kind": "update", "cls": 3, "loss": 0.1 + 0.2, "flag": True, "names": ["a"], "none": None,
          "feature": torch.randn(512), "probs": torch.rand(2, 3, dtype=torch.float64), "empty": torch.empty(0, 4),
          "blob": b"\x00\x01", "ids": torch.arange(4)}
    back = state_ops.decode(state_ops.encode(op))
    assert back.keys() == op.keys()
    for key, value in op.items():
        if isinstance(value, torch.Tensor):
            assert back[key].dtype == value.dtype and torch.equal(back[key], value)
        else:
            assert back[key] == value
    with pytest.raises(ValueError):
        state_ops.decode(b"\x10\x00\x00\x00{not json")


def test_file_host_snapshots_every_n_and_restores(tmp_path: Path) -> None:
    config = StateConfig(directory=tmp_path, deployment="m", every=3)
    owner = Counter(config)
    try:
        assert "REFUSED" in _other_worker(tmp_path, "m")
        for i in range(5):
            owner.add(i)
        assert owner.host.stats.snapshots == 1  # after 3 operations, not yet after 5
        owner.host.flush()
        loaded, _ = StateStore(tmp_path, "m.counter").load()
        assert loaded["items"] == list(range(5))
        owner.host.reset()  # reset/import are written at once
        assert StateStore(tmp_path, "m.counter").load()[0]["items"] == []
        owner.add(7)
        owner.host.flush()
        restarted = Counter(config)  # same process: shares the ownership, restores the snapshot
        assert restarted.items == [7] and restarted.host.stats.restored
    finally:
        owner.host.close()


OTHER_WORKER = """
import sys
from pathlib import Path
from tta.errors import Unavailable
from tta.state import StateConfig, open_host
directory = None if sys.argv[1] == "-" else Path(sys.argv[1])
class Owner:
    def apply(self, op): pass
    def snapshot(self): return {}
    def restore(self, state): pass
host = open_host("counter", Owner(), StateConfig(directory=directory, deployment=sys.argv[2]))
try:
    host.sync()
except Unavailable as exc:
    print("REFUSED", exc)
else:
    print("SERVED")
"""  # a separate process: ownership is per process


def _other_worker(directory: Path | None, deployment: str) -> str:
    """A second worker process trying to serve the same deployment's stream state."""
    out = subprocess.run([sys.executable, "-c", OTHER_WORKER, str(directory) if directory else "-", deployment],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    return out.stdout


def test_no_directory_means_process_state_only(tmp_path: Path) -> None:
    counter = Counter(StateConfig(directory=None))
    counter.add(1)
    assert counter.host.mode == "process" and counter.items == [1] and counter.host.stats.snapshots == 0
    assert not any(tmp_path.iterdir())


def test_served_model_without_directory_has_one_owner_process(tmp_path: Path) -> None:
    deployment = f"test-owner-{os.getpid()}-{time.monotonic_ns()}"
    config = StateConfig(directory=None, deployment=deployment)
    first, same_process = Counter(config), Counter(config)
    try:
        first.add(1)
        same_process.add(1)  # ownership is per process
        assert first.host.describe()["owner"]
        assert "REFUSED" in _other_worker(None, deployment)
    finally:
        first.host.close()


def test_urls_are_masked() -> None:
    assert mask_url("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert mask_url("rediss://user:s3cret@db/1") == "rediss://user:***@db/1"
    assert mask_url("redis://db:6379/0") == "redis://db:6379/0"


def test_archive_refuses_a_state_url_with_a_password_and_other_schemes() -> None:
    import argparse

    from tta.commands.archive import _validate, add_arguments
    from tta.errors import TTAError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert _validate(parser.parse_args(["--state-url", "redis://redis:6379/0"])) == {}
    for url, message in (("redis://:s3cret@redis:6379/0", "TTA_STATE_PASSWORD"), ("http://redis", "redis://")):
        with pytest.raises(TTAError, match=message) as err:
            _validate(parser.parse_args(["--state-url", url]))
        assert "s3cret" not in str(err.value)
