"""Poisoned state on real backends: two replicas on a real redis-server, and snapshot files.

- One replica appends poisoned operations to the shared log (an out-of-range class, NaN features,
  an import whose classes are negative, bytes that do not decode): both replicas skip exactly
  those entries, count them (``tta_state_rejected_total{source="log"}``) with their entry ids, and
  hold bit-identical state, equal to the state before; the next prediction answers as before.
- A poisoned Redis snapshot is refused by a replica starting later: it is copied to ``:rejected``
  and left where it is, the replica starts empty, replays the log after it, and says so.
- A snapshot file that fails validation, or does not decode, is refused at start, copied aside
  as ``<file>.rejected`` (the original stays), and the worker starts empty and says so.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from tests.unit.test_state_validation import LABELS, same
from tta.engine import Engine
from tta.metrics import ServingMetrics, sample_values
from tta.serving.service import watch_state_rejections
from tta.state import StateConfig, StateStore, configure, dumps, on_rejected
from tta.state.ops import encode
from tta.state.redis_log import key_prefix
from tta.testing.redis_server import RedisServer, redis_server_binary
from tta.text import LabelSet

_names = itertools.count()
DEFAULTS = {"tda": {"neg_entropy": [0.0, 1.0]}}


def _images(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=gen) for _ in range(n)]


@pytest.fixture()
def events() -> Iterator[list]:
    seen: list = []
    remove = on_rejected(seen.append)
    yield seen
    remove()


def _poisoned(exported: dict) -> dict:
    state = {**exported, "positive": {**exported["positive"], "classes": torch.full_like(exported["positive"]["classes"], -5)}}
    return state


@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server not installed (apt-get install redis-server)")
def test_two_replicas_skip_a_poisoned_log_alike_and_refuse_a_poisoned_snapshot(tiny_clip, events: list,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    with RedisServer() as server:
        deployment = f"poison{next(_names)}-{time.monotonic_ns()}"
        previous = configure(StateConfig(url=server.url, deployment=deployment))
        metrics = ServingMetrics(CollectorRegistry())
        unwatch = watch_state_rejections(metrics, "m")
        try:
            a, b = (Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=DEFAULTS) for _ in range(2))
            for image in _images(4, seed=1):
                a.predict(image, method="tda")
            before = a.export_state("tda")
            assert same(b.export_state("tda"), before) and len(before["positive"]["classes"]) > 0
            probe = _images(1, seed=2)[0]
            answer = a.predict(probe, method="tda")
            a.import_state("tda", before)  # back to `before` on every replica (the import is an operation)

            impl = a.method("tda")
            good = impl.update_op(torch.nn.functional.normalize(torch.randn(tiny_clip.embed_dim), dim=0), 1, 1.0,
                                  torch.softmax(torch.randn(len(LABELS)), 0), impl.defaults)
            poison = [encode({**good, "cls": 1_000_000}), encode({**good, "feature": torch.full_like(good["feature"], math.nan)}),
                      encode({"kind": "import", "state": dumps(_poisoned(before))}), b"\x05\x00garbage"]
            client = redis.Redis.from_url(server.url)
            log_key = f"{key_prefix(deployment, 'tda')}:log"
            ids = [client.xadd(log_key, {"u": f"evil-{i}", "o": payload}).decode() for i, payload in enumerate(poison)]

            assert a.method("tda").host.sync() and b.method("tda").host.sync()
            for engine in (a, b):
                assert same(engine.export_state("tda"), before), "a poisoned entry changed a replica's state"
                assert engine.method("tda").host.stats.rejected == {"log": 4}
            skipped = [e for e in events if e.source == "log"]
            assert sorted(e.entry for e in skipped) == sorted(ids * 2)  # every entry, on both replicas, by id
            assert {e.field for e in skipped} >= {"cls", "feature", "positive.classes", "entry"}
            text = metrics.render().decode()
            assert sum(sample_values(text, "tta_state_rejected_total", {"method": "tda", "source": "log"})) == 8
            assert f"log entry {ids[0]} refused: cls" in caplog.text
            length = client.xlen(log_key)  # this replica's own invalid operation never reaches the log
            assert a.method("tda").host.commit({**good, "feature": torch.full_like(good["feature"], math.inf)})
            assert client.xlen(log_key) == length and a.method("tda").host.stats.rejected == {"log": 4, "request": 1}
            again = b.predict(probe, method="tda")  # the next prediction, on the other replica: as before
            assert again.label == answer.label and torch.equal(again.probs, answer.probs)
            a.import_state("tda", before)

            # a poisoned snapshot in Redis, at the replicas' offset: a replica starting now refuses it (one
            # behind the snapshot would have to adopt it too, and would start empty the same way)
            assert b.method("tda").host.sync()
            snap_key = f"{key_prefix(deployment, 'tda')}:snap"
            last = a.method("tda").host.last_id
            bad = dumps({"meta": before["meta"], **_poisoned(before)})
            client.hset(snap_key, mapping={"data": bad, "offset": last})
            late = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=DEFAULTS)
            summary = late.state_summary("tda")
            assert summary["total"] == 0 and summary["persistence"]["rejected"] == {"snapshot": 1}
            assert any("starting empty and replaying the log after" in w for w in summary["persistence"]["warnings"])
            kept = client.hgetall(f"{key_prefix(deployment, 'tda')}:rejected")
            assert kept[b"data"] == bad and b"positive.classes" in kept[b"reason"]
            assert client.hget(snap_key, "data") == bad  # left where it is, for inspection
            assert same(a.export_state("tda"), before) and same(b.export_state("tda"), before)
            text = metrics.render().decode()
            assert sum(sample_values(text, "tta_state_rejected_total", {"method": "tda", "source": "snapshot"})) == 1
        finally:
            unwatch()
            configure(previous)


@pytest.mark.parametrize("damage", ["invalid", "corrupt"])
def test_a_bad_snapshot_file_is_refused_kept_aside_and_the_worker_starts_empty(
        tiny_clip, tmp_path: Path, events: list, damage: str) -> None:
    deployment = f"file{next(_names)}"
    previous = configure(StateConfig(directory=tmp_path, deployment=deployment))
    try:
        source = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=DEFAULTS)
        for image in _images(3, seed=3):
            source.predict(image, method="tda")
        exported = source.export_state("tda")
        source.method("tda").host.close()  # the next worker takes the owner lock
        store = StateStore(tmp_path, f"{deployment}.tda")
        if damage == "invalid":
            store.save({**exported, "positive": {**exported["positive"],
                                                 "keys": exported["positive"]["keys"] * math.nan}})
        else:
            store.path.write_bytes(store.path.read_bytes()[:-10])
        original = store.path.read_bytes()
        worker = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=DEFAULTS)
        summary = worker.state_summary("tda")
        assert summary["total"] == 0 and summary["persistence"]["rejected"] == {"snapshot": 1}
        warning = summary["persistence"]["warnings"][-1]
        assert "refused" in warning and "kept for inspection" in warning and "starting empty" in warning
        assert Path(f"{store.path}.rejected").read_bytes() == original and store.path.read_bytes() == original
        assert events[-1].source == "snapshot" and events[-1].entry == str(store.path)
        assert events[-1].field == ("positive.keys" if damage == "invalid" else "state")
        worker.method("tda").host.close()
    finally:
        configure(previous)
