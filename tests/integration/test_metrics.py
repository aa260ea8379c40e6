"""Metrics scraped from a real TorchServe: the tta exporter and TorchServe's own :metrics port.

Counts are compared as differences between two scrapes around the requests this test sends, so
the shared session server can have served other tests before.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import LABELS, MODEL
from tests.integration.torchserve import REPO, TorchServe
from tta.metrics import CUSTOM_LABELS

pytestmark = pytest.mark.server

HANDLER_METRICS = (
    "tta_stage_duration_seconds", "tta_requests", "tta_prediction_entropy_ratio", "tta_prediction_confidence",
    "tta_predictions", "tta_adaptation_changed", "tta_embedding_shift_cosine_distance",
)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    reply = requests.get(url, timeout=30)
    assert reply.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= lbls)


def families(url: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(requests.get(url, timeout=30).text)}


def test_metrics_count_the_requests_sent(server: TorchServe, photos: dict[str, bytes]) -> None:
    tta_url = f"http://127.0.0.1:{server.tta_metrics_port}/metrics"
    ts_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    drift_state = {"action": "state", "method": "drift"}
    reference = requests.post(server.predict_url, json=drift_state, headers=server.auth, timeout=60).json()["state"]
    before, ts_before = scrape(tta_url), scrape(ts_url)

    ok = ["chelsea", "coffee", "rocket", "astronaut"]
    for name in ok:
        body = {"image": base64.b64encode(photos[name]).decode(), "method": "zero", "options": {"n_views": 8}}
        assert requests.post(server.predict_url, json=body, headers=server.auth, timeout=60).status_code == 200
    bad = requests.post(server.predict_url, json={"image": "AAAA", "method": "zero"}, headers=server.auth, timeout=60)
    assert bad.status_code == 400
    after, ts_after = scrape(tta_url), scrape(ts_url)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    zero = {"model": MODEL, "method": "zero"}
    assert delta("tta_requests_total", outcome="ok", **zero) == len(ok)
    assert delta("tta_requests_total", outcome="client_error", **zero) == 1
    assert delta("tta_requests_total", outcome="server_error", **zero) == 0
    for stage in ("decode", "augment", "encode", "predict", "total"):
        assert delta("tta_stage_duration_seconds_count", stage=stage, **zero) == len(ok), stage
    assert delta("tta_stage_duration_seconds_sum", stage="total", **zero) > 0
    assert delta("tta_stage_duration_seconds_bucket", stage="total", le="+Inf", **zero) == len(ok)
    for kind in ("zeroshot", "adapted"):
        assert delta("tta_prediction_entropy_ratio_count", kind=kind, **zero) == len(ok)
        assert delta("tta_prediction_confidence_count", kind=kind, **zero) == len(ok)
    assert delta("tta_predictions_total", **zero) == len(ok)
    # other tests may send their own label sets: those are pooled under one marker, never spelled out
    assert {dict(lbls)["label"] for (n, lbls) in after if n == "tta_predictions_total"} <= {*LABELS, CUSTOM_LABELS}
    changed = delta("tta_adaptation_changed_total", **zero)
    assert 0 <= changed <= len(ok)
    # drift: each answer joins the shared reference until it is full; later ones are measured against it
    captured, size = reference["reference"]["samples"], reference["reference"]["size"]
    now = requests.post(server.predict_url, json=drift_state, headers=server.auth, timeout=60).json()["state"]
    assert now["reference"]["samples"] == min(size, captured + len(ok))
    measured = max(0, min(len(ok), captured + len(ok) - size + 1))
    assert delta("tta_embedding_shift_cosine_distance_count", model=MODEL) == measured
    assert total(after, "tta_drift_reference_samples", model=MODEL) == now["reference"]["samples"]

    # TorchServe's own frontend metrics, same requests
    assert ts_after and total(ts_after, "ts_inference_requests_total", model_name=MODEL) - total(
        ts_before, "ts_inference_requests_total", model_name=MODEL) == len(ok) + 1
    assert total(ts_after, "Requests4XX_total") - total(ts_before, "Requests4XX_total") == 1
    assert total(ts_after, "Requests2XX_total") - total(ts_before, "Requests2XX_total") >= len(ok)


def test_every_handler_metric_is_exported_with_help(server: TorchServe, photos: dict[str, bytes]) -> None:
    # a labelled family is written only once a request has produced a sample of it: send one here
    # rather than rely on another test having run first (the CI portability job shuffles the order)
    body = {"image": base64.b64encode(photos["coffee"]).decode(), "method": "zero", "options": {"n_views": 8}}
    assert requests.post(server.predict_url, json=body, headers=server.auth, timeout=60).status_code == 200
    names = families(f"http://127.0.0.1:{server.tta_metrics_port}/metrics")
    assert set(HANDLER_METRICS) <= names
    assert "ts_inference_requests" in families(f"http://127.0.0.1:{server.metrics_port}/metrics") | {
        n.removesuffix("_total") for n in families(f"http://127.0.0.1:{server.metrics_port}/metrics")}


def test_multiprocess_exporter_merges_workers(tmp_path) -> None:
    """Two processes (as two TorchServe workers) write; one exporter serves the sum."""
    worker = textwrap.dedent("""
        import importlib.util, sys
        # tta.metrics alone (the tta package would import torch, which costs seconds per process)
        spec = importlib.util.spec_from_file_location("tta_metrics", sys.argv[3])
        metrics = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(metrics)
        m = metrics.ServingMetrics()
        for _ in range(int(sys.argv[1])):
            m.observe_outcome("clip", "zero", "ok")
            m.observe_stages("clip", "zero", {"total": 12.0})
        if sys.argv[2] != "0":
            exporter = metrics.Exporter(int(sys.argv[2]), registry=m.registry).start()
            assert exporter.serving.is_set()
            import requests
            print(requests.get(f"http://127.0.0.1:{sys.argv[2]}/metrics", timeout=30).text)
        assert "torch" not in sys.modules
    """)
    from tests.integration.torchserve import free_port

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    source = str(REPO / "tta" / "metrics.py")
    subprocess.run([sys.executable, "-c", worker, "3", "0", source], env=env, check=True, timeout=120)
    port = free_port()
    out = subprocess.run([sys.executable, "-c", worker, "2", str(port), source], env=env, check=True, timeout=120,
                         capture_output=True, text=True).stdout
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(out) for s in f.samples}
    assert total(samples, "tta_requests_total", outcome="ok") == 5
    assert total(samples, "tta_stage_duration_seconds_count", stage="total") == 5
    assert total(samples, "tta_stage_duration_seconds_bucket", stage="total", le="0.01") == 0
    assert total(samples, "tta_stage_duration_seconds_bucket", stage="total", le="0.025") == 5


def test_stream_state_size_is_exported(server: TorchServe, photos: dict[str, bytes]) -> None:
    tta_url = f"http://127.0.0.1:{server.tta_metrics_port}/metrics"
    post = lambda body: requests.post(server.predict_url, json=body, headers=server.admin, timeout=60)  # noqa: E731
    assert post({"action": "reset", "method": "tda"}).status_code == 200
    assert total(scrape(tta_url), "tta_stream_state_entries", model=MODEL, method="tda") == 0
    for name in ("chelsea", "coffee", "rocket"):
        assert post({"image": base64.b64encode(photos[name]).decode(), "method": "tda"}).status_code == 200
    state = post({"action": "state", "method": "tda"}).json()["state"]
    assert state["total"] > 0
    assert total(scrape(tta_url), "tta_stream_state_entries", model=MODEL, method="tda") == state["total"]
    assert post({"action": "reset", "method": "tda"}).status_code == 200
