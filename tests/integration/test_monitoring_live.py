"""Drift monitoring on live data: a real TorchServe serving the tiny digits CLIP, a real Prometheus
scraping both metrics endpoints every second and evaluating monitoring/'s rules.

Clean digits first (the drift reference is captured from them), then a stream the test shifts
itself (rotated a quarter turn, Gaussian noise). Checked: every dashboard and recording-rule
expression evaluates and returns series; the drift signals stay inside their thresholds on clean
traffic and cross them after the shift; the drift alerts are inactive before and reach `firing`
in Prometheus's own /api/v1/alerts after; re-capturing the reference clears them.

Documented overrides, no expression edited: the server's drift sizes are small
(`tta archive --drift-reference-size 128 --drift-window 128`) and every alert's `for:` is 2 s
(`monitoring.rules.render_rules(for_override=...)`).

With TTA_DRIFT_PICTURE=path (``make drift-dashboard``) the dashboard picture of this run is
written there (docs/img/drift-dashboard.png on docs/monitoring/index.md).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
import yaml
from torchvision.transforms.v2 import functional as TF

from monitoring import plot, rules
from tests.integration.torchserve import TorchServe, build_archive
from tests.prometheus import Prometheus, binary

pytestmark = [pytest.mark.server, pytest.mark.extended]  # .ci/run: after the README command

MODEL = "digits"
REFERENCE, WINDOW = 128, 128
FOR = "2s"
DRIFT_ALERTS = {a.name for a in rules.ALERTS if a.drift}
DRIFT_SIGNALS = {  # recording rule -> its alert threshold
    "tta:drift_embedding_shift:excess": rules.T["embedding_excess"],
    "tta:drift_class_divergence:excess": rules.T["class_excess"],
    "tta:drift_entropy_shift:max_abs": rules.T["entropy_abs"],
}


def png(image: torch.Tensor) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def shift(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The test's own shift: a quarter turn plus Gaussian noise (sd 60 grey levels)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.stack([TF.rotate(img.float(), 90.0) for img in images])
    return (out + torch.randn(out.shape, generator=gen) * 60).clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def digits_server(tmp_path_factory: pytest.TempPathFactory, digits_clip) -> TorchServe:
    """TorchServe with a tiny-digits archive (the fixture trained/cached the weights first)."""
    binary("prometheus")  # skip before the expensive start when Prometheus is missing
    from tta.testing.digits import DIGIT_CLASSNAMES

    store = tmp_path_factory.mktemp("digits_store")
    labels = store.parent / "digit-labels.txt"
    labels.write_text("\n".join(DIGIT_CLASSNAMES) + "\n", encoding="utf-8")
    build_archive(store, MODEL, "--model", "tiny-digits", "--labels-file", str(labels), "--batch-size", "1",
                  "--drift-reference-size", str(REFERENCE), "--drift-window", str(WINDOW))
    with TorchServe(tmp_path_factory.mktemp("digits_ts"), MODEL).running(store, f"{MODEL}.mar") as server:
        yield server


def send(server: TorchServe, images: torch.Tensor, tda_every: int = 4) -> None:
    """Every image once (2 clients); every `tda_every`-th through TDA so a stream cache fills too."""
    def one(i: int) -> None:
        body = png(images[i])
        if i % tda_every == 0:
            reply = requests.post(server.predict_url, headers=server.auth, timeout=60,
                                  json={"image": base64.b64encode(body).decode(), "method": "tda"})
        else:
            reply = requests.post(server.predict_url, data=body, headers={**server.auth, "Content-Type": "image/png"},
                                  timeout=60)
        assert reply.status_code == 200, reply.text

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(len(images))))


def values(prom: Prometheus, expr: str) -> list[float]:
    return [float(s["value"][1]) for s in prom.query(expr)]


def test_drift_alerts_fire_on_live_shifted_traffic(digits_server: TorchServe, digits_data, tmp_path: Path) -> None:
    *_, images, _ = digits_data
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(yaml.safe_dump(rules.render_rules(for_override=FOR), sort_keys=False))
    targets = [f"127.0.0.1:{digits_server.metrics_port}", f"127.0.0.1:{digits_server.tta_metrics_port}"]
    with Prometheus(tmp_path / "prometheus", targets, rule_files=[rule_file]).running() as prom:
        prom.wait(prom.targets_up, 60, "both targets up")
        start = time.time()
        # privileged actions (reset/export/import): the admin credential is TorchServe's management key
        admin = {**digits_server.auth, "X-TTA-Admin-Token": digits_server.keys["management"]}

        # --- clean traffic: reference, then one full window, then some more -----------------------
        clean = images[: REFERENCE + WINDOW + 32]
        send(digits_server, clean)
        state = requests.post(digits_server.predict_url, json={"action": "state", "method": "drift"},
                              headers=digits_server.auth, timeout=30).json()["state"]
        assert state["reference"]["ready"] and state["window"]["samples"] == WINDOW
        prom.wait(lambda: values(prom, "tta_drift_window_samples") == [WINDOW] and
                  values(prom, "tta_drift_reference_ready") == [1.0], 30, "full window scraped")
        clean_seen = time.time()
        seen_alerts: set[str] = set()
        while time.time() < clean_seen + 6:  # evaluations well past `for: 2s`: nothing may even be pending
            seen_alerts |= set(prom.alerts()) & DRIFT_ALERTS
            time.sleep(0.5)
        assert not seen_alerts, f"drift alerts on clean traffic: {seen_alerts}"
        before = {name: values(prom, name) for name in DRIFT_SIGNALS}
        for name, threshold in DRIFT_SIGNALS.items():
            assert len(before[name]) == 1 and before[name][0] < threshold, (name, before[name])

        # --- every dashboard and recording-rule expression evaluates to series -------------------
        # one fallback (TDA keeps its cache for the deployment's labels; other labels: zero-shot)
        odd = requests.post(digits_server.predict_url, headers=digits_server.auth, timeout=60, json={
            "image": base64.b64encode(png(images[0])).decode(), "method": "tda", "labels": ["zero", "one"]})
        assert odd.status_code == 200 and odd.json()["fallback"]
        prom.wait(lambda: prom.query("tta_fallbacks_total"), 10, "fallback scraped")
        dashboard = [t["expr"] for p in rules.render_dashboard()["panels"] for t in p["targets"]]
        empty = [expr for expr in [*dashboard, *rules.RECORDING] if not prom.query(expr)]
        assert not empty, f"no series for: {empty}"
        for alert in rules.ALERTS:  # alert expressions evaluate (empty = not firing, checked below)
            prom.query(alert.expr)

        # the reference travels through export/import (admin actions) unchanged
        post = lambda body: requests.post(digits_server.predict_url, json=body, headers=admin, timeout=60)  # noqa: E731
        exported = post({"action": "export", "method": "drift"})
        assert exported.status_code == 200, exported.text
        imported = post({"action": "import", "method": "drift", "state": exported.json()["state"]})
        assert imported.status_code == 200 and imported.json()["state"]["reference"] == state["reference"]

        # --- shifted traffic until every drift alert fires ----------------------------------------
        shift_at = time.time()
        clean_max = {}  # over every evaluation of the clean phase, not one instant
        for name, threshold in DRIFT_SIGNALS.items():
            series = prom.query_range(name, start, shift_at, 1.0)
            clean_max[name] = max(float(v) for s in series for _, v in s["values"] if v != "NaN")
            assert clean_max[name] < threshold, (name, clean_max[name])
        shifted = shift(images[: 4 * WINDOW])
        sent_shifted = 0

        def crossed() -> bool:
            return all((v := values(prom, name)) and v[0] > limit for name, limit in DRIFT_SIGNALS.items())

        while sent_shifted < len(shifted) and not crossed():  # send until Prometheus sees every signal cross
            send(digits_server, shifted[sent_shifted: sent_shifted + 16])
            sent_shifted += 16
        prom.wait(lambda: DRIFT_ALERTS <= {n for n, s in prom.alerts().items() if s == "firing"}, 30,
                  "drift alerts firing")
        firing = {n for n, s in prom.alerts().items() if s == "firing"}
        assert DRIFT_ALERTS <= firing, f"firing after the shift: {firing}"
        after = {name: values(prom, name) for name in DRIFT_SIGNALS}
        for name, threshold in DRIFT_SIGNALS.items():
            assert after[name][0] > threshold and after[name][0] > before[name][0], (name, before[name], after[name])
        assert values(prom, "max(tta_drift_confidence_shift)")[0] > 0.05  # less sure after the shift
        assert not {"TTAServerErrors", "TTAStreamStateUnavailable", "TTANoTraffic"} & set(prom.alerts())

        # --- re-capture: the next answers build a new reference, the alerts resolve ---------------
        reset = post({"action": "reset", "method": "drift"})
        assert reset.status_code == 200 and reset.json()["state"]["reference"]["samples"] == 0
        recapture_at = time.time()
        send(digits_server, shifted[:4])
        prom.wait(lambda: not set(prom.alerts()) & DRIFT_ALERTS, 20, "drift alerts resolved after reset")
        end = time.time() + 1

        picture = plot.draw(prom.url, start, end, tmp_path / "drift-dashboard.png",
                            marks=[(shift_at, "shifted stream"), (recapture_at, "reference reset")])
        assert picture.stat().st_size > 10_000
        if os.environ.get("TTA_DRIFT_PICTURE"):
            target = Path(os.environ["TTA_DRIFT_PICTURE"])
            shutil.copyfile(picture, target)
            readings = {"clean_max": clean_max, "before_shift": before, "after_shift": after,
                        "thresholds": DRIFT_SIGNALS, "reference_size": REFERENCE, "window": WINDOW,
                        "shifted_images_until_all_crossed": sent_shifted}
            target.with_suffix(".json").write_text(json.dumps(readings, indent=2) + "\n")
