"""Requests that carry an original-view embedding instead of pixels (`Engine.predict_features`).

The contract: the very same method objects answer, with the same state updates, as for the image
whose original view encodes to that embedding; a method that would need the pixels refuses with
`needs_pixels` before touching any state; malformed embeddings are 4xx.
"""

from __future__ import annotations

import pytest
import torch

from tta.engine import Engine
from tta.errors import BadRequest, PixelsRequired
from tta.features import encode_images, original_view
from tta.methods.base import list_methods
from tta.models import embedding_model
from tta.text import LabelSet

LABELS = ["cat", "dog", "car", "cup"]
FEATURE_METHODS = ("zeroshot", "tda", "tfup", "tfup-t", "gda")


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 72, 72, generator=gen) * 255).to(torch.uint8) for _ in range(n)]


def _embedding(clip, image: torch.Tensor) -> torch.Tensor:
    return encode_images(clip, original_view(clip, image))[0]


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_embedding_requests_answer_as_image_requests_do(tiny_clip, method: str) -> None:
    """Two fresh engines, one fed images and one their embeddings, in the same stream order: the
    same answers and the same stream state. The embeddings are the image path's own float32
    encoder outputs, so the two compute identical tensors (up to the re-normalisation of a unit
    vector: |1 - norm| ~ d * 2^-24, far below the 1e-5 allowed on probabilities)."""
    by_image = Engine(tiny_clip, LabelSet.create(LABELS))
    by_embedding = Engine(tiny_clip, LabelSet.create(LABELS))
    images = _images(12)
    for image in images:
        a = by_image.predict(image, method=method)
        b = by_embedding.predict_features(_embedding(tiny_clip, image), method=method)
        assert a.label == b.label
        torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.zeroshot_probs, b.zeroshot_probs, atol=1e-5, rtol=0)
    _assert_same_state(by_image.export_state(method), by_embedding.export_state(method))


def _assert_same_state(a, b) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            if key not in ("created", "saved_at", "time"):
                _assert_same_state(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-5)
    else:
        assert a == b


@pytest.mark.parametrize("method", ["tpt", "zero", "difftpt", "rlcf"])
def test_methods_that_need_pixels_refuse_embeddings(tiny_clip, method: str) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    with pytest.raises(PixelsRequired) as info:
        engine.predict_features(_embedding(tiny_clip, _images(1)[0]), method=method)
    assert info.value.code == "needs_pixels"
    assert method in str(info.value)


def test_multi_view_options_refuse_before_touching_state(tiny_clip) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    feature = _embedding(tiny_clip, _images(1)[0])
    engine.predict_features(feature, method="tda")
    before = engine.export_state("tda")
    with pytest.raises(PixelsRequired):
        engine.predict_features(feature, method="tda", options={"n_views": 8})
    after = engine.export_state("tda")
    assert before["updates"] == after["updates"]


def test_auto_runs_its_single_view_tiers_on_embeddings(tiny_clip) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    feature = _embedding(tiny_clip, _images(1)[0])
    answer = engine.predict_features(feature, method="auto", options={"tiers": "zeroshot,tda", "threshold": 1.0})
    assert answer.extra["tier"] == "tda"
    with pytest.raises(PixelsRequired):
        engine.predict_features(feature, method="auto")  # default tiers escalate to ZERO/TPT views


@pytest.mark.parametrize("bad, message", [
    (torch.ones(7), "shape"),
    (torch.full((64,), float("nan")), "finite"),
    (torch.ones(64), "normalised"),
    (torch.ones(2, 64) / 8.0, "shape"),
    (torch.ones(64, dtype=torch.int64), "float"),
])
def test_malformed_embeddings_are_bad_requests(tiny_clip, bad: torch.Tensor, message: str) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    with pytest.raises(BadRequest, match=message):
        engine.predict_features(bad, method="zeroshot")


def test_every_method_says_whether_it_can_run_on_embeddings(tiny_clip) -> None:
    """The fact lives on the class: no method is left undecided, and a refusal carries a reason."""
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    for name in list_methods():
        impl = engine.method(name)
        reason = impl.feature_input_reason(impl.defaults)
        assert reason is None or (isinstance(reason, str) and name in reason)


def test_embedding_model_classifies_with_given_text_features() -> None:
    """A stand-in CLIP with no encoders plus a stored classifier: zero-shot is argmax(f . T)."""
    gen = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(5, 16, generator=gen), dim=-1)
    feats = torch.nn.functional.normalize(torch.randn(20, 16, generator=gen), dim=-1)
    clip = embedding_model(16, logit_scale=100.0)
    labels = LabelSet.create([f"class {i}" for i in range(5)])
    engine = Engine(clip, labels)
    engine.text_cache.put(clip, labels, text)
    for f in feats:
        answer = engine.predict_features(f, method="zeroshot")
        assert labels.names.index(answer.label) == int((f @ text.t()).argmax())
        expected = (100.0 * f @ text.t()).softmax(-1)
        torch.testing.assert_close(answer.probs, expected, atol=1e-6, rtol=0)
    with pytest.raises(PixelsRequired):
        engine.predict_features(feats[0], method="tpt")
