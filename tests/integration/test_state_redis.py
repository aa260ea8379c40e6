"""Two TorchServe instances (two pods) on one real Redis serve one stream state.

Both run the same `tta archive --state-url redis://...` of tiny-random CLIP, with separate
frontends, ports and worker processes. Concurrent clients send interleaved `tda` and `gda`
requests (predictions and labelled feedback) to both; afterwards `export` from either instance is
bit-identical, and equal to what one in-process engine reaches from the operations of the Redis
log, in log order. Then Redis is killed mid-stream: every request is still answered (flagged
``"fallback": "state_unavailable"``, counted in the metrics), none hangs; Redis comes back empty
and the instances re-seed it and converge again.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import requests
import torch

from tests.integration.conftest import jpeg_bytes
from tests.integration.torchserve import TorchServe, build_archive
from tta.testing.redis_server import RedisServer, redis_server_binary

pytestmark = pytest.mark.skipif(redis_server_binary() is None,
                                reason="redis-server not installed (apt-get install redis-server)")

MODEL = "redistest"
LABELS = ("cat", "dog", "astronaut", "coffee cup", "rocket", "camera")
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera")
FEEDBACK = {"chelsea": "cat", "astronaut": "astronaut", "coffee": "coffee cup", "rocket": "rocket",
            "camera": "camera"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, list[TorchServe]]]:
    root = tmp_path_factory.mktemp("state_redis")
    store = root / "model_store"
    store.mkdir()
    labels = root / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    server = RedisServer(root / "redis").start()
    servers = [TorchServe(root / f"ts{i}", MODEL) for i in range(2)]
    try:
        build_archive(store, MODEL, "--labels-file", str(labels), "--workers", "1", "--batch-size", "1",
                      "--state-url", server.url, "--no-warmup", "--metrics-port", "0")
        with ThreadPoolExecutor(max_workers=2) as pool:  # two cold starts at once: ~half the wall time
            for future in [pool.submit(ts.start, store, f"{MODEL}.mar", 300) for ts in servers]:
                future.result()
        yield server, servers
    finally:
        for ts in servers:
            ts.stop()
        server.stop()


def _post(ts: TorchServe, body: dict, timeout: float = 60) -> requests.Response:
    headers = ts.admin if body.get("action") not in (None, "state") else ts.auth  # privileged actions
    return requests.post(ts.predict_url, json=body, headers=headers, timeout=timeout)


def _photos() -> dict[str, str]:
    return {name: base64.b64encode(jpeg_bytes(name)).decode() for name in PHOTOS}


def _export(ts: TorchServe, method: str) -> dict:
    reply = _post(ts, {"action": "export", "method": method})
    assert reply.status_code == 200, reply.text
    return reply.json()["state"]


def _encode(value: Any) -> Any:
    """The export's JSON form of a state (tensors as dtype, shape and base64 bytes)."""
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().contiguous().numpy()
        return {"__tensor__": str(array.dtype), "shape": list(array.shape),
                "b64": base64.b64encode(array.tobytes()).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decoded_tensor(value: dict) -> torch.Tensor:
    import numpy as np

    array = np.frombuffer(base64.b64decode(value["b64"]), dtype=np.dtype(value["__tensor__"]))
    return torch.from_numpy(array.reshape(value["shape"]).copy())


def _replayed(url: str, method: str, exported: dict) -> dict:
    """The state one in-process engine reaches from the Redis log's operations, in log order.

    GDA refits against the deployment's text classifier: the engine here uses the servers' (from
    their export), since a worker's text encoder may differ from this process's in the last bits.
    """
    from tta.engine import Engine
    from tta.models import load_model
    from tta.state import StateConfig, configure
    from tta.state.ops import decode
    from tta.state.redis_log import key_prefix
    from tta.text import LabelSet

    previous = configure(StateConfig())
    try:
        engine = Engine(load_model("tiny-random"), LabelSet.create(list(LABELS)))
        if exported.get("text") is not None:
            text = _decoded_tensor(exported["text"])
            engine.method(method).bind_deployment(LABELS, lambda: text)
        entries = redis.Redis.from_url(url).xrange(f"{key_prefix(MODEL, method)}:log")
        for _, fields in entries:
            engine.method(method).host.commit(decode(fields[b"o"]))
        return _encode(engine.export_state(method))
    finally:
        configure(previous)


def test_two_instances_serve_one_state(cluster: tuple[RedisServer, list[TorchServe]]) -> None:
    server, (first, second) = cluster
    photos = _photos()
    for method in ("tda", "gda"):
        assert _post(first, {"action": "reset", "method": method}).status_code == 200

    def client(args: tuple[TorchServe, int]) -> None:
        ts, offset = args
        for i in range(3):
            name = PHOTOS[(i + offset) % len(PHOTOS)]
            for body in ({"image": photos[name], "method": "tda"},
                         {"action": "feedback", "method": "gda", "image": photos[name], "label": FEEDBACK[name]},
                         {"image": photos[name], "method": "gda"}):
                reply = _post(ts, body)
                assert reply.status_code == 200, reply.text
                assert reply.json().get("fallback") != "state_unavailable"

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(client, [(first, 0), (second, 1), (first, 2), (second, 3)]))

    for method in ("tda", "gda"):
        exported = _export(first, method)
        assert exported == _export(second, method), f"{method}: the instances disagree"
        assert exported == _replayed(server.url, method, exported), f"{method}: differs from one engine replaying the log"
    summary = _post(second, {"action": "state", "method": "gda"}).json()["state"]
    assert summary["feedback_total"] == 12 and summary["persistence"]["mode"] == "redis"
    assert "@" not in summary["persistence"]["url"] or "***" in summary["persistence"]["url"]


def test_redis_killed_mid_stream_every_request_answered_then_converges(
        cluster: tuple[RedisServer, list[TorchServe]]) -> None:
    server, servers = cluster
    photos = _photos()
    answers: list[dict] = []

    def client(args: tuple[int, TorchServe]) -> None:
        index, ts = args
        for i in range(6):
            if index == 0 and i == 2:
                server.kill()  # mid-stream, while the other clients are sending
            start = time.monotonic()
            reply = _post(ts, {"image": photos[PHOTOS[(i + index) % len(PHOTOS)]], "method": "tda"}, timeout=30)
            assert reply.status_code == 200, reply.text
            assert time.monotonic() - start < 15, "a request waited on the dead Redis"
            answers.append({**reply.json(), "server": index % 2})

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(client, [(0, servers[0]), (1, servers[1]), (2, servers[0]), (3, servers[1])]))
    assert len(answers) == 24
    assert any(a.get("fallback") == "state_unavailable" for a in answers)
    for index, ts in enumerate(servers):
        flagged = sum(a.get("fallback") == "state_unavailable" and a["server"] == index for a in answers)
        metrics = requests.get(f"http://127.0.0.1:{ts.tta_metrics_port}/metrics", timeout=10).text
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("tta_state_unavailable_total{") and 'method="tda"' in line)
        assert counted >= flagged, (index, flagged, [x for x in metrics.splitlines() if "unavailable" in x])

    server.start()  # back on the same port, empty: the instances re-seed it
    deadline = time.monotonic() + 60
    while True:
        summaries = [_post(ts, {"action": "state", "method": "tda"}).json()["state"] for ts in servers]
        if all(s.get("fallback") is None and s["persistence"]["pending"] == 0 for s in summaries):
            break
        assert time.monotonic() < deadline, summaries
        time.sleep(0.2)  # the instances retry after their back-off
    assert _export(servers[0], "tda") == _export(servers[1], "tda")
    assert summaries[0]["updates"] >= 1
    entries = redis.Redis.from_url(server.url).xlen(f"tta:{{{MODEL}.tda}}:log")
    assert entries >= 1  # the operations queued during the outage reached the new log
