"""One contract, checked for every registered method: registering a method is what gets it tested.

Each method runs on the tiny random CLIP with light options (few views, tiny generator / reward
model) so the whole registry is covered in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from tta.engine import Engine
from tta.methods.base import get_method_class, list_methods
from tta.text import LabelSet

LABELS = ["cat", "dog", "car", "rocket", "cup"]
# Options that keep each method offline and fast; only fields a method declares are used.
LIGHT_OPTIONS = {
    "n_views": 8,
    "generator": "tiny-random",
    "n_generated": 2,
    "diffusion_steps": 2,
    "reward_model": "tiny-random",
}


def _light(name: str) -> dict:
    fields = get_method_class(name).Options.__dataclass_fields__
    return {k: v for k, v in LIGHT_OPTIONS.items() if k in fields}


def _engine(tiny_clip, name: str) -> Engine:
    return Engine(tiny_clip, LabelSet.create(LABELS), default_method=name, method_defaults={name: _light(name)})


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_registry_lists_the_issue_methods():
    assert {"zeroshot", "tpt", "zero"} <= set(list_methods())
    for name in list_methods():
        cls = get_method_class(name)
        assert cls.scope in ("episodic", "stream") and cls.name == name
        cls.Options().validate()  # the paper defaults are valid


@pytest.mark.parametrize("name", list_methods())
def test_prediction_is_a_distribution_over_the_labels(tiny_clip, sample_images, name):
    prediction = _engine(tiny_clip, name).predict(sample_images["chelsea"], top_k=3)
    assert prediction.probs.shape == (len(LABELS),)
    assert torch.all(prediction.probs >= 0) and abs(float(prediction.probs.sum()) - 1.0) < 1e-4
    assert prediction.label in LABELS and len(prediction.top_k) == 3
    assert prediction.top_k[0]["label"] == prediction.label
    assert prediction.changed_by_adaptation == (prediction.label != prediction.zeroshot_label)
    assert prediction.timings_ms["total"] > 0
    body = prediction.to_dict()
    assert {"label", "score", "top_k", "method", "changed_by_adaptation", "timings_ms"} <= body.keys()


@pytest.mark.parametrize("name", list_methods())
def test_same_seed_same_answer_on_fresh_workers(tiny_clip, sample_images, name):
    first = _engine(tiny_clip, name).predict(sample_images["coffee"], seed=5)
    second = _engine(tiny_clip, name).predict(sample_images["coffee"], seed=5)
    assert torch.equal(first.probs, second.probs)


@pytest.mark.parametrize("name", list_methods())
def test_reset_restores_the_initial_state(tiny_clip, sample_images, name):
    engine = _engine(tiny_clip, name)
    initial = engine.export_state(name)
    for image in sample_images.values():
        engine.predict(image)
    engine.reset_state(name)
    after = engine.export_state(name)
    # `meta` records which label set the state is bound to (fixed by the first request), not learned state
    assert _same({k: v for k, v in after.items() if k != "meta"}, {k: v for k, v in initial.items() if k != "meta"})


@pytest.mark.parametrize("name", [n for n in list_methods() if get_method_class(n).scope == "episodic"])
def test_episodic_methods_do_not_leak_between_requests(tiny_clip, sample_images, name):
    engine = _engine(tiny_clip, name)
    before = engine.predict(sample_images["rocket"], seed=1)
    for other in ("chelsea", "astronaut", "coffee"):
        engine.predict(sample_images[other], seed=2)
    after = engine.predict(sample_images["rocket"], seed=1)
    assert torch.equal(before.probs, after.probs)


@pytest.mark.parametrize("name", list_methods())
def test_unknown_and_bad_options_are_client_errors(tiny_clip, sample_images, name):
    from tta.errors import BadRequest

    engine = _engine(tiny_clip, name)
    with pytest.raises(BadRequest, match="unknown option"):
        engine.predict(sample_images["chelsea"], options={"no_such_option": 1})
    fields = get_method_class(name).Options.__dataclass_fields__
    if "n_views" in fields:
        with pytest.raises(BadRequest):
            engine.predict(sample_images["chelsea"], options={"n_views": "many"})


@pytest.mark.parametrize("name", [n for n in list_methods() if get_method_class(n).feature_options])
def test_feature_options_let_a_pixel_method_answer_from_an_embedding(name):
    """`feature_options` are the options an embedding-only evaluation runs under: the defaults need
    pixels, the options do not, and the class says what running that way leaves out."""
    from tta import offline

    cls = get_method_class(name)
    assert cls.feature_options_note, f"{name}: feature_options without a note of what they omit"
    assert offline.feature_reason(name) is not None, f"{name}: its defaults already run on embeddings"
    assert offline.feature_reason(name, cls.feature_options) is None
    cls.Options.from_dict(dict(cls.feature_options)).validate()
