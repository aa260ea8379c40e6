"""Stream state with two TorchServe workers: one shared state, whichever worker answers.

A real TorchServe runs the `tta archive` of tiny-random CLIP with minWorkers = maxWorkers = 2 and
a state directory (shared sync, the documented multi-worker setup). Two clients send `tda`
requests concurrently; afterwards every `state` answer, from either worker, reports the same
caches, and their update count equals what the requests produced.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import jpeg_bytes
from tests.integration.torchserve import TorchServe, build_archive

MODEL = "cachetest"
LABELS = ("cat", "dog", "astronaut", "coffee cup", "rocket", "camera")
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera")


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TorchServe, Path]]:
    root = tmp_path_factory.mktemp("cache_workers")
    store, state_dir = root / "model_store", root / "state"
    store.mkdir()
    labels = root / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    build_archive(store, MODEL, "--labels-file", str(labels), "--workers", "2", "--batch-size", "1",
                  "--state-dir", str(state_dir), "--state-sync", "shared", "--no-warmup", "--metrics-port", "0")
    with TorchServe(root / "ts", MODEL).running(store, f"{MODEL}.mar", timeout_s=300) as server:
        yield server, state_dir


def _post(server: TorchServe, body: dict) -> requests.Response:
    headers = server.admin if body.get("action") not in (None, "state") else server.auth
    return requests.post(server.predict_url, json=body, headers=headers, timeout=120)


def _stable(summary: dict) -> dict:
    """The state itself, without this worker's own persistence counters."""
    return {k: v for k, v in summary.items() if k != "persistence"}


def test_two_workers_share_one_stream_state(two_workers: tuple[TorchServe, Path]) -> None:
    server, state_dir = two_workers
    photos = {name: base64.b64encode(jpeg_bytes(name)).decode() for name in PHOTOS}
    assert _post(server, {"action": "reset", "method": "tda"}).status_code == 200

    def client(offset: int) -> list[int]:
        pids = []
        for i in range(8):
            reply = _post(server, {"image": photos[PHOTOS[(i + offset) % len(PHOTOS)]], "method": "tda"})
            assert reply.status_code == 200, reply.text
            state = _post(server, {"action": "state", "method": "tda"})
            assert state.status_code == 200, state.text
            pids.append(state.json()["state"]["persistence"]["worker_pid"])
        return pids

    with ThreadPoolExecutor(max_workers=2) as pool:
        pids = [pid for result in pool.map(client, (0, 2)) for pid in result]

    # Both workers answered (TorchServe spreads concurrent requests), and both report one state.
    summaries: dict[int, dict] = {}
    deadline = time.monotonic() + 60
    while len(summaries) < 2 and time.monotonic() < deadline:
        with ThreadPoolExecutor(max_workers=2) as pool:
            replies = list(pool.map(lambda _: _post(server, {"action": "state", "method": "tda"}), range(2)))
        for reply in replies:
            state = reply.json()["state"]
            summaries[state["persistence"]["worker_pid"]] = state
    assert len(set(pids) | set(summaries)) == 2, "only one worker ever answered"
    assert len(summaries) == 2, "could not reach both workers"
    first, second = (_stable(s) for s in summaries.values())
    assert first == second
    assert 1 <= first["positive"]["total"] <= 3 * len(LABELS)  # bounded: capacity 3 per class
    assert first["updates"] >= 1
    assert all(s["persistence"]["mode"] == "shared" for s in summaries.values())
    assert (state_dir / f"{MODEL}.tda.state").is_file()
