"""TorchServe batches that batch: a mixed batch through the session server (batchSize 4, 200 ms)
answers like the same requests sent one by one, and the worker shows it shared an encoder pass."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.torchserve import TorchServe
from tta.metrics import sample_values

pytestmark = [pytest.mark.server, pytest.mark.extended]  # .ci/run: after the README command (~70 s of setup)

AUTO = {"tiers": "zeroshot,zero:4", "threshold": 1.0}


def _bodies(photos: dict[str, bytes]) -> list[dict | bytes]:
    b64 = {k: base64.b64encode(v).decode("ascii") for k, v in photos.items()}
    return [
        {"image": b64["chelsea"], "method": "zeroshot", "seed": 1, "top_k": 3},
        {"image": b64["coffee"], "method": "zero", "options": {"n_views": 4}, "seed": 2, "top_k": 3},
        {"image": b64["astronaut"], "method": "auto", "labels": ["an astronaut", "a cat", "a rocket"],
         "options": AUTO, "seed": 3, "top_k": 3},
        b"this is not an image",
    ]


def _post(server: TorchServe, body: dict | bytes) -> requests.Response:
    if isinstance(body, bytes):
        return requests.post(server.predict_url, data=body, headers=server.auth, timeout=120)
    return requests.post(server.predict_url, json=body, headers=server.auth, timeout=120)


def _together(server: TorchServe, bodies: list) -> list[requests.Response]:
    barrier = threading.Barrier(len(bodies))

    def send(body):
        barrier.wait(timeout=30)  # all reach the 200 ms batch window together
        return _post(server, body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def _batch_count(server: TorchServe) -> float:
    return _metric(server, "tta_batch_shared_encoding_requests_total")


def _metric(server: TorchServe, name: str, labels: dict[str, str] | None = None) -> float:
    reply = requests.get(f"http://127.0.0.1:{server.tta_metrics_port}/metrics", timeout=10)
    return sum(sample_values(reply.text, name, labels))


def test_mixed_batch_equals_one_by_one(server: TorchServe, photos: dict[str, bytes]) -> None:
    bodies = _bodies(photos)
    shared_before = _batch_count(server)
    tier = {"method": "auto", "tier": "zero:4", "escalated": "true"}
    tier_before = _metric(server, "tta_tier_answers_total", tier)
    for _attempt in range(5):  # TorchServe decides the batches: retry until these four shared one
        batched = _together(server, bodies)
        if any("batch" in r.json() for r in batched if r.status_code == 200):
            break
    else:
        pytest.fail("the four concurrent requests never landed in one batch")
    single = [_post(server, body) for body in bodies]
    assert [r.status_code for r in batched] == [r.status_code for r in single] == [200, 200, 200, 400]
    assert batched[3].json()["code"] == single[3].json()["code"] == "not_an_image"
    for got, want in zip(batched[:3], single[:3], strict=True):
        got, want = got.json(), want.json()
        assert got["method"] == want["method"] and got["label"] == want["label"]
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        for a, b in zip(got["top_k"], want["top_k"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert got["timings_ms"]["total"] >= got["timings_ms"]["encode"] > 0
    auto = batched[2].json()
    assert auto["tier"] == "zero:4" and auto["escalated"] is True and auto["tier"] == single[2].json()["tier"]
    # zeroshot and auto's first tier are single-view: they shared one encoder pass
    assert batched[0].json()["batch"]["requests"] >= 2 and "batch" in auto
    assert "batch" not in single[0].json()
    deadline = time.monotonic() + 15
    while _batch_count(server) < shared_before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # poll: the exporter reads the workers' metric files
    assert _batch_count(server) >= shared_before + 2
    assert _metric(server, "tta_tier_answers_total", tier) >= tier_before + 2  # batched + one-by-one auto
    log = server.workdir / "logs" / "model_log.log"
    assert "shared encoder pass" in log.read_text(errors="replace")
