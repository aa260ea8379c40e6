"""A full TorchServe queue: 503 at once, never a hang (slow: starts its own server).

TorchServe 0.12's frontend answers requests over `job_queue_size` itself (503
ServiceUnavailableException) before any worker sees them, so the handler cannot add a
Retry-After header there; this test pins that behaviour down so docs/reliability.md stays true.
Our own 503s (overload bound of the shared serving layer, unavailable models) carry Retry-After:
tests/unit/test_serving_guard.py.
"""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import jpeg_bytes
from tests.integration.torchserve import TorchServe, build_archive

pytestmark = [pytest.mark.server, pytest.mark.slow]


class SmallQueue(TorchServe):
    def env(self) -> dict[str, str]:
        return {**super().env(), "TS_JOB_QUEUE_SIZE": "2"}  # enable_envvars_config=true in config.properties


def test_full_queue_answers_503_at_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    build_archive(store, "queue", "--batch-size", "1", "--max-batch-delay", "1", "--workers", "1")
    image = base64.b64encode(jpeg_bytes("astronaut")).decode()
    body = {"image": image, "method": "tpt", "options": {"n_views": 64, "steps": 4}}
    with SmallQueue(tmp_path / "ts", "queue").running(store, "queue.mar") as server:
        def send(_: int) -> tuple[int, float, dict, str]:
            start = time.perf_counter()
            reply = requests.post(server.predict_url, json=body, headers=server.auth, timeout=300)
            return reply.status_code, time.perf_counter() - start, dict(reply.headers), reply.text

        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(send, range(12)))
    statuses = [r[0] for r in replies]
    assert set(statuses) <= {200, 503}, statuses
    refused = [r for r in replies if r[0] == 503]
    assert refused, "a queue of 2 took 12 concurrent slow requests"
    assert all(seconds < 10 for _, seconds, _, _ in refused), [r[1] for r in refused]
    assert all("message" in r[3] for r in refused)
    assert not any("Retry-After" in headers for _, _, headers, _ in refused)  # TorchServe 0.12: none
