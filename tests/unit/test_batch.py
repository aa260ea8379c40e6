"""`Engine.predict_batch`: shared encoder passes, answers equal to one-at-a-time, failures isolated,
stream state updated in request order."""

from __future__ import annotations

import pytest
import torch

from tta.engine import Engine, PredictRequest
from tta.errors import BadRequest
from tta.text import LabelSet

LABELS = ["cat", "dog", "car", "rocket", "cup"]
DEFAULTS = {"zero": {"n_views": 4}, "tpt": {"n_views": 4}, "auto": {"tiers": "zeroshot,zero:4"}}


def _engine(clip, **kwargs) -> Engine:
    return Engine(clip, LabelSet.create(LABELS), method_defaults=DEFAULTS, **kwargs)


def _mixed(images: dict[str, torch.Tensor]) -> list[PredictRequest]:
    chelsea, coffee, rocket, astronaut = (images[k] for k in ("chelsea", "coffee", "rocket", "astronaut"))
    return [
        PredictRequest(chelsea, "zeroshot", seed=1),
        PredictRequest(coffee, "tda", seed=2),
        PredictRequest(rocket, "zero", seed=3),
        PredictRequest(astronaut, "zeroshot", labels=["a person", "a cat"], top_k=2),
        PredictRequest(torch.zeros(3, 8, dtype=torch.uint8), "zeroshot"),  # not an image
        PredictRequest(coffee, "tpt", seed=4),
        PredictRequest(chelsea, "tda", seed=5),
        PredictRequest(rocket, "zeroshot", options={"nope": 1}),  # bad option
        PredictRequest(astronaut, "auto", options={"threshold": 1.0}, seed=6),
        PredictRequest(rocket, "rlcf", options={"n_views": 4, "reward_model": "tiny-random"}, seed=7),  # not shared
    ]


def test_batch_equals_one_at_a_time(tiny_clip, sample_images):
    requests = _mixed(sample_images)
    batched = _engine(tiny_clip).predict_batch(requests)
    single = _engine(tiny_clip)
    assert len(batched) == len(requests)
    for request, got in zip(requests, batched, strict=True):
        try:
            want = single.predict(request.image, request.method, request.options, request.labels,
                                  request.top_k, request.seed)
        except BadRequest as exc:
            assert isinstance(got, BadRequest) and got.code == exc.code
            continue
        assert not isinstance(got, Exception), got
        assert got.label == want.label and got.method == want.method
        assert torch.allclose(got.probs, want.probs, atol=1e-4), request.method
        assert torch.allclose(got.zeroshot_probs, want.zeroshot_probs, atol=1e-4)
        assert got.timings_ms["total"] > 0 and got.timings_ms["encode"] > 0
    # the stream method's state went through the same updates in the same order
    assert _same_state(batched_state := _engine_state(requests, tiny_clip), single.export_state("tda")), batched_state


def _engine_state(requests, clip):
    engine = _engine(clip)
    engine.predict_batch(requests)
    return engine.export_state("tda")


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-5)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_shared_passes_are_reported_and_counted(tiny_clip, sample_images, monkeypatch):
    engine = _engine(tiny_clip, max_batch_images=8)
    calls: list[int] = []
    model = tiny_clip.model
    original = model.encode_image

    def counting(x, *args, **kwargs):
        calls.append(int(x.shape[0]))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(model, "encode_image", counting)
    monkeypatch.setattr(tiny_clip, "image_encoder", None)
    images = list(sample_images.values())
    requests = [PredictRequest(img, "zeroshot") for img in images] + [
        PredictRequest(img, "zero", seed=i) for i, img in enumerate(images)]
    answers = engine.predict_batch(requests)
    # 4 single-view requests in one pass; 4 x 4 views packed 8 per pass: 3 forwards instead of 8
    assert sorted(calls) == [4, 8, 8]
    assert all(a.extra["batch"]["requests"] == (4 if a.method == "zeroshot" else 2) for a in answers)
    assert {a.extra["batch"]["images"] for a in answers} == {4, 8}


def test_a_failing_method_fails_only_its_request(tiny_clip, sample_images, monkeypatch):
    engine = _engine(tiny_clip)
    zero = engine.method("zero")

    def broken(request):
        raise RuntimeError("boom")

    monkeypatch.setattr(zero, "predict", broken)
    out = engine.predict_batch([PredictRequest(sample_images["chelsea"], "zeroshot"),
                                PredictRequest(sample_images["coffee"], "zero"),
                                PredictRequest(sample_images["rocket"], "zeroshot")])
    assert isinstance(out[1], RuntimeError)
    assert out[0].method == "zeroshot" and out[2].method == "zeroshot"


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(tiny_clip, sample_images, n):
    requests = [PredictRequest(sample_images["chelsea"], "zeroshot")][:n]
    out = _engine(tiny_clip).predict_batch(requests)
    assert len(out) == n and all("batch" not in p.extra for p in out)
