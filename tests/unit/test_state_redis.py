"""The Redis operation log against a real redis-server on a free loopback port.

Replicas are hosts in this process with their own connection state (each has its own replica id,
offset and queue: exactly what separate pods hold); the two-TorchServe test runs them as separate
servers. Covered: in-order apply and convergence, snapshot + tail for a late replica, trimming,
bounds, Redis killed / hung / restarted empty.
"""

from __future__ import annotations

import itertools
import time

import pytest
import redis
import torch

from tests.unit.test_state import Counter
from tta.state import ClassQueues, StateConfig, check_meta, configure, current_config, dumps, open_host
from tta.state.ops import decode, encode
from tta.state.redis_log import key_prefix, memory_bound
from tta.testing.redis_server import RedisServer, redis_server_binary

pytestmark = pytest.mark.skipif(redis_server_binary() is None,
                                reason="redis-server not installed (apt-get install redis-server)")
_names = itertools.count()


@pytest.fixture(scope="module")
def server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture()
def own_server():
    """A server a test may kill, pause and restart."""
    with RedisServer() as srv:
        yield srv


def _config(url: str, **kw) -> StateConfig:
    return StateConfig(url=url, deployment=f"dep{next(_names)}-{time.monotonic_ns()}", **kw)


class Queues:
    """An owner with bounded state: per-class queues of vectors (TDA's rule), ops `offer`."""

    def __init__(self, config: StateConfig, per_class: int = 2, max_total: int = 6) -> None:
        self.queues = ClassQueues(per_class, max_total, "lowest")
        self.host = open_host("queues", self, config)
        self.host.start()

    def apply(self, op: dict) -> None:
        self.queues.offer(op["cls"], op["key"], op["score"])

    def snapshot(self) -> dict:
        return {"meta": {"method": "queues"}, "q": self.queues.state_dict()}

    def restore(self, state: dict | None) -> None:
        if state is None:
            self.queues.clear()
        else:
            check_meta(state, {"method": "queues"})
            self.queues.load_state_dict(state["q"])

    def offer(self, cls: int, key: torch.Tensor, score: float) -> bool:
        return self.host.commit({"kind": "offer", "cls": cls, "key": key, "score": score})


def _same(a: Queues, b: Queues) -> bool:
    x, y = a.queues.state_dict(), b.queues.state_dict()
    return all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x)


def test_replicas_apply_one_log_in_order(server: RedisServer) -> None:
    config = _config(server.url)
    a, b = Counter(config), Counter(config)
    for i in range(20):
        assert (a if i % 3 else b).add(i)
    assert a.host.sync() and b.host.sync()
    assert a.items == b.items == list(range(20))
    a.host.reset()
    b.add(5)
    assert a.host.sync() and a.items == b.items == [5]
    a.host.load({"items": [1, 2]})
    assert b.host.sync() and b.items == [1, 2]
    assert a.host.describe()["mode"] == "redis" and "6379" not in a.host.describe()["url"]


def test_late_replica_starts_from_snapshot_plus_tail_and_stream_is_trimmed(server: RedisServer) -> None:
    config = _config(server.url, every=10)
    a = Counter(config)
    for i in range(25):
        a.add(i)
    # A snapshot due while the previous one is still being written is taken at the next operation
    # after that write ends (on a loaded machine the write begun at op 10 can outlast op 25). So:
    # wait for the writer, then one more operation, which takes any snapshot still due; then the
    # log holds at most `every` + 1 entries whatever the machine's speed.
    a.host.wait_snapshot()
    a.add(25)
    a.host.wait_snapshot()
    log_key = f"{key_prefix(config.deployment, 'counter')}:log"
    length = redis.Redis.from_url(server.url).xlen(log_key)
    assert 1 <= length <= 10 + 1, length  # trimmed behind the snapshot
    late = Counter(config)
    assert late.host.sync() and late.items == list(range(26))
    assert late.host.stats.restored and late.host.stats.applied < 25  # snapshot + tail, not the whole history


def test_bounds_hold_on_every_replica_and_redis_memory_is_bounded(server: RedisServer) -> None:
    config = _config(server.url, every=8)
    a, b = Queues(config), Queues(config)
    gen = torch.Generator().manual_seed(0)
    capacity = 6
    for i in range(10 * capacity):
        (a if i % 2 else b).offer(int(torch.randint(0, 5, (1,), generator=gen)), torch.randn(64, generator=gen),
                                  float(torch.rand(1, generator=gen)))
    assert a.host.sync() and b.host.sync()
    assert len(a.queues) == len(b.queues) == capacity and _same(a, b)
    a.host.wait_snapshot()
    b.host.wait_snapshot()
    client = redis.Redis.from_url(server.url)
    prefix = key_prefix(config.deployment, "queues")
    used = sum(client.memory_usage(f"{prefix}:{k}", samples=0) or 0 for k in ("log", "snap", "epoch"))
    op_bytes = len(encode({"kind": "offer", "cls": 4, "key": torch.randn(64), "score": 0.123456789}))
    bound = memory_bound(len(dumps(a.snapshot())), op_bytes, every=8)  # the caches are full: the largest snapshot
    assert used <= bound, (used, bound)


def test_redis_killed_answers_from_last_state_then_reseeds_and_converges(own_server: RedisServer) -> None:
    config = _config(own_server.url, timeout_ms=200)
    a, b = Counter(config), Counter(config)
    for i in range(4):
        a.add(i)
    assert b.host.sync() and b.items == [0, 1, 2, 3]
    own_server.kill()
    start = time.monotonic()
    assert not a.add(10) and not b.add(11) and not b.add(12)
    assert time.monotonic() - start < 2.0, "a down Redis must not stall requests"
    assert a.items == b.items == [0, 1, 2, 3]  # last known state; the ops are queued
    assert a.host.stats.unavailable >= 1 and len(b.host.pending) == 2
    own_server.start()  # back, and empty
    deadline = time.monotonic() + 10
    while not (a.host.sync() and b.host.sync()):
        assert time.monotonic() < deadline, "replicas did not reconnect"
        time.sleep(0.05)  # waits out the back-off
    a.host.sync()
    assert a.items == b.items
    assert a.items[:4] == [0, 1, 2, 3] and sorted(a.items[4:]) == [10, 11, 12]  # re-seeded, nothing wiped


def test_redis_hung_times_out_quickly(own_server: RedisServer) -> None:
    config = _config(own_server.url, timeout_ms=150)
    a = Counter(config)
    a.add(1)
    own_server.pause()
    try:
        start = time.monotonic()
        assert not a.add(2)
        assert time.monotonic() - start < 1.0
        assert not a.host.sync()  # in back-off: no new wait at all
    finally:
        own_server.resume()
    deadline = time.monotonic() + 10
    while not a.host.sync():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert a.items == [1, 2]


# --- the stream methods on the log (tiny CLIP) -----------------------------------------------
LABELS = ["cat", "dog", "car", "cup"]


def _images(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 48, 48, generator=gen) * 255).to(torch.uint8) for _ in range(n)]


@pytest.fixture()
def redis_config(server: RedisServer):
    config = _config(server.url, every=100_000)  # no trimming: the test replays the whole log
    previous = configure(config)
    yield config
    configure(previous)


def _log_ops(url: str, deployment: str, method: str) -> list[dict]:
    entries = redis.Redis.from_url(url).xrange(f"{key_prefix(deployment, method)}:log")
    return [decode(fields[b"o"]) for _, fields in entries]


def test_engines_on_one_log_hold_identical_state_equal_to_a_single_engine(tiny_clip, server: RedisServer,
                                                                          redis_config: StateConfig) -> None:
    from tests.unit.test_tda import _same_state
    from tta.engine import Engine
    from tta.text import LabelSet

    defaults = {"tfup": {"min_buffer": 4, "rebuild_every": 3}}
    a = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=defaults)
    b = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=defaults)
    for i, image in enumerate(_images(18, seed=5)):
        engine = (a, b)[i % 2]
        engine.predict(image, method="tda")
        engine.predict(image, method="tfup")
        if i % 3 == 0:
            engine.feedback(image, LABELS[i % 4], "gda")
        assert "fallback" not in engine.predict(image, method="tda").extra
    configure(StateConfig())  # the reference keeps its state in-process
    single = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=defaults)
    for method in ("tda", "tfup", "gda"):
        exported = a.export_state(method)
        assert _same_state(exported, b.export_state(method)), method
        for op in _log_ops(server.url, redis_config.deployment, method):
            single.method(method).host.commit(op)
        assert _same_state(exported, single.export_state(method)), method
    assert a.state_summary("gda")["feedback_total"] == 6


NEW_STREAM = {"dota": {"covariance": "per_class"}, "dpe": {"n_views": 4, "evolve_entropy": 1.0}, "boostadapter": {"n_views": 16},
              "oga": {"shot_capacity": 2}}


@pytest.mark.parametrize("method", sorted(NEW_STREAM))
def test_new_stream_methods_on_one_log_hold_identical_state(tiny_clip, server: RedisServer,
                                                            redis_config: StateConfig, method: str) -> None:
    """dota / dpe / boostadapter / oga: two engines alternating on one log end equal, and equal to a
    third engine that only replays that log (the operations carry everything the state needs)."""
    from tests.unit.test_tda import _same_state
    from tta.engine import Engine
    from tta.text import LabelSet

    defaults = {method: NEW_STREAM[method]}
    a = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=defaults)
    b = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=defaults)
    for i, image in enumerate(_images(12, seed=11)):
        assert "fallback" not in (a, b)[i % 2].predict(image, method=method, seed=i).extra
    exported = a.export_state(method)
    assert _same_state(exported, b.export_state(method))
    configure(StateConfig())
    single = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=defaults)
    ops = _log_ops(server.url, redis_config.deployment, method)
    assert len(ops) >= 12
    for op in ops:
        single.method(method).host.commit(op)
    assert _same_state(exported, single.export_state(method))


def test_tda_redis_memory_bounded_after_ten_times_capacity(tiny_clip, server: RedisServer) -> None:
    from tta.engine import Engine
    from tta.methods.tda import TDA
    from tta.text import LabelSet

    every = 32
    previous = configure(_config(server.url, every=every))
    try:
        engine = Engine(tiny_clip, LabelSet.create(LABELS))
        capacity = (3 + 2) * len(LABELS)
        for image in _images(10 * capacity, seed=7):
            engine.predict(image, method="tda")
        host = engine.method("tda").host
        host.wait_snapshot()
        deployment = current_config().deployment
    finally:
        configure(previous)
    full = TDA(tiny_clip)  # the largest snapshot: every cache at capacity
    full._names = tuple(LABELS)
    d, gen = tiny_clip.embed_dim, torch.Generator().manual_seed(0)
    for c in range(len(LABELS)):
        for j in range(3):
            full.pos.offer(c, torch.randn(d, generator=gen), float(j))
        for j in range(2):
            full.neg.offer(c, torch.randn(d, generator=gen), float(j), torch.rand(len(LABELS), generator=gen))
    largest_op = encode(full.update_op(torch.randn(d), 0, 0.5, torch.rand(len(LABELS)),
                                       full.defaults.__class__(neg_entropy=(0.0, 1.0))))
    bound = memory_bound(len(dumps(full.snapshot())), len(largest_op), every)
    client = redis.Redis.from_url(server.url)
    prefix = key_prefix(deployment, "tda")
    used = sum(client.memory_usage(f"{prefix}:{k}", samples=0) or 0 for k in ("log", "snap", "epoch"))
    assert host.stats.snapshots >= 1 and client.xlen(f"{prefix}:log") <= 2 * every
    assert used <= bound, (used, bound)
