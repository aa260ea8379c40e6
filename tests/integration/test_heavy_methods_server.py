"""DiffTPT and RLCF through a real TorchServe, tiny models offline.

The deployment bakes the generator ("tiny-random" diffusers pipeline) and the reward model
("tiny-random" CLIP) into the archive's method defaults, as a real deployment would bake
"lambdalabs/sd-image-variations-diffusers" and "ViT-L-14:openai"; requests choose the method
and may only lower the cost knobs. Its own server: the session server's archive has no
generator or reward model configured.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import LABELS
from tests.integration.torchserve import TorchServe, build_archive

pytestmark = [pytest.mark.server, pytest.mark.extended]  # .ci/run: after the README command

MODEL = "heavytest"
HEAVY_DEFAULTS = {
    "difftpt": {"generator": "tiny-random", "n_generated": 3, "diffusion_steps": 2, "generation_batch": 4,
                "n_views": 8, "steps": 1, "time_budget_ms": 60000},
    "rlcf": {"reward_model": "tiny-random", "n_views": 8},
}


@pytest.fixture(scope="module")
def heavy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    store = tmp_path_factory.mktemp("heavy_store")
    labels = store.parent / "heavy_labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    build_archive(store, MODEL, "--labels-file", str(labels), "--batch-size", "1", "--workers", "1",
                  "--method-defaults", json.dumps(HEAVY_DEFAULTS))
    with TorchServe(tmp_path_factory.mktemp("heavy_torchserve"), MODEL).running(store, f"{MODEL}.mar") as ts:
        yield ts


def _ask(server: TorchServe, photo: bytes, method: str, **body) -> requests.Response:
    payload = {"image": base64.b64encode(photo).decode("ascii"), "method": method, "seed": 1, **body}
    return requests.post(server.predict_url, json=payload, headers=server.auth, timeout=180)


def _scrape(server: TorchServe) -> dict[tuple[str, frozenset], float]:
    reply = requests.get(f"http://127.0.0.1:{server.tta_metrics_port}/metrics", timeout=30)
    assert reply.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(reply.text) for s in family.samples}


def _total(samples: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= lbls)


def test_difftpt_generates_views_and_reports_budget_fallback(heavy_server: TorchServe,
                                                              photos: dict[str, bytes]) -> None:
    before = _scrape(heavy_server)
    reply = _ask(heavy_server, photos["chelsea"], "difftpt")
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["method"] == "difftpt" and answer["label"] in LABELS
    assert answer["generated_views"] == 3 and "fallback" not in answer
    assert answer["timings_ms"]["generate"] > 0

    starved = _ask(heavy_server, photos["coffee"], "difftpt", options={"time_budget_ms": 0.001})
    assert starved.status_code == 200, starved.text
    assert starved.json()["fallback"] == "over_budget" and starved.json()["generated_views"] == 0

    refused = _ask(heavy_server, photos["coffee"], "difftpt", options={"generator": "lambdalabs/other"})
    assert refused.status_code == 400, refused.text

    after = _scrape(heavy_server)
    outcome = {"model": MODEL, "method": "difftpt"}
    assert _total(after, "tta_requests_total", outcome="fallback", **outcome) - \
        _total(before, "tta_requests_total", outcome="fallback", **outcome) == 1
    assert _total(after, "tta_requests_total", outcome="ok", **outcome) - \
        _total(before, "tta_requests_total", outcome="ok", **outcome) == 1
    generate = {"model": MODEL, "method": "difftpt", "stage": "generate"}
    assert _total(after, "tta_stage_duration_seconds_count", **generate) - \
        _total(before, "tta_stage_duration_seconds_count", **generate) == 2


@pytest.mark.parametrize("variant", ["prompt", "image"])
def test_rlcf_answers_with_a_reward_stage(heavy_server: TorchServe, photos: dict[str, bytes], variant: str) -> None:
    before = _scrape(heavy_server)
    reply = _ask(heavy_server, photos["rocket"], "rlcf", options={"variant": variant}, top_k=3)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["method"] == "rlcf" and answer["label"] in LABELS and len(answer["top_k"]) == 3
    assert answer["timings_ms"]["reward"] > 0 and answer["timings_ms"]["adapt"] > 0
    again = _ask(heavy_server, photos["rocket"], "rlcf", options={"variant": variant}, top_k=3).json()
    assert again["top_k"] == answer["top_k"]  # episodic: the policy was reset between the two
    reward = {"model": MODEL, "method": "rlcf", "stage": "reward"}
    assert _total(_scrape(heavy_server), "tta_stage_duration_seconds_count", **reward) - \
        _total(before, "tta_stage_duration_seconds_count", **reward) == 2
    swap = _ask(heavy_server, photos["rocket"], "rlcf", options={"reward_model": "ViT-L-14:openai"})
    assert swap.status_code == 400 and "reward_model" in swap.text
