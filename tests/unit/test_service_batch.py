"""`Service.run_batch`: the server-agnostic batch entry point answers like one-by-one runs, keeps
actions in their place, and fails requests alone."""

from __future__ import annotations

import pytest

from tta.engine import Engine
from tta.metrics import ServingMetrics
from tta.serving.admin import AdminAuth
from tta.serving.codec import Action, Failure, ModelInfo, OipInfer, Predict
from tta.serving.service import Service
from tta.text import LabelSet

LABELS = ["cat", "dog", "car", "rocket", "cup"]


def _service(clip) -> Service:
    engine = Engine(clip, LabelSet.create(LABELS), default_method="tda")
    return Service(engine, ServingMetrics(), ModelInfo("m", "1.0", "tiny-random"), admin=AdminAuth(token="t"))


def _requests(images):
    chelsea, coffee, rocket = images["chelsea"], images["coffee"], images["rocket"]
    return [
        Predict(chelsea, seed=1),
        Predict(coffee, method="zeroshot"),
        Action("reset", "tda", headers={"x-tta-admin-token": "t"}),  # must see the first request's update, and clear it for the third
        Predict(rocket, seed=2),
        OipInfer([Predict(coffee, method="zeroshot"), Predict(chelsea, method="zeroshot", top_k=2)]),
        Predict(rocket, method="zeroshot", options={"nope": 1}),
        Failure(400, "not_an_image", "bad"),
        Action("state", "tda"),
    ]


def test_run_batch_equals_one_by_one(tiny_clip, sample_images):
    requests = _requests(sample_images)
    batched = _service(tiny_clip).run_batch(requests)
    sequential_service = _service(tiny_clip)
    sequential = [sequential_service.encode(r, sequential_service.run(r)) for r in requests]
    assert [r.status for r in batched] == [r.status for r in sequential] == [200, 200, 200, 200, 200, 400, 400, 200]
    for got, want in zip(batched, sequential, strict=True):
        if got.kind == "oip":
            g, w = got.body["outputs"], want.body["outputs"]
            assert g[0]["data"] == w[0]["data"]
            assert g[1]["data"] == pytest.approx(w[1]["data"], abs=1e-4)
        elif "label" in got.body:
            assert got.body["label"] == want.body["label"]
            assert [t["score"] for t in got.body["top_k"]] == pytest.approx(
                [t["score"] for t in want.body["top_k"]], abs=1e-4)
        else:
            assert got.body == want.body  # errors and actions, including the state after the batch
    assert batched[-1].body["state"]["updates"] == 1  # the reset happened between the two tda requests
    assert "batch" in batched[0].body  # the two single-view requests before the action shared a pass
