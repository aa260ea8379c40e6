"""Admission (cost budget, deadlines) and the zero-shot fallbacks (deadline, numerical, out of memory).

Faults are injected through the real code path: the engine runs the real method, whose view
encoding goes through `ClipModel.image_encoder` (the hook tta.onnx_encoder uses); the tests put
a slow / NaN-producing / out-of-memory-raising wrapper of the real encoder there. No GPU is
used: the out-of-memory handling is tested with the exception CUDA raises (torch.OutOfMemoryError).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
import torch

from tta.admission import DEFAULT_DEADLINE_MS, Budget, Cost, estimate, parse_deadline_ms
from tta.engine import Engine
from tta.errors import BadRequest, Unavailable
from tta.faults import DEADLINE, NUMERICAL, OOM, ZeroShotFallback, check_step
from tta.methods.base import get_method_class, list_methods
from tta.methods.tpt import TPTOptions, tune_prompt
from tta.prompts import PromptLearner
from tta.text import LabelSet

REPO = Path(__file__).resolve().parents[2]
LABELS = ["cat", "dog", "car", "rocket", "cup"]
LIGHT = {
    "tpt": {"n_views": 8, "steps": 2},
    "zero": {"n_views": 8},
    "difftpt": {"n_views": 8, "generation": False, "steps": 2},
    "rlcf": {"n_views": 8, "reward_model": "policy", "steps": 2},
}


def _engine(clip, budget: Budget | None = None) -> Engine:
    return Engine(clip, LabelSet.create(LABELS), method_defaults=LIGHT, budget=budget)


def _with_encoder(clip, wrap):
    """The same frozen CLIP whose frozen view encoding goes through `wrap(real_encoder)`."""
    real = clip.image_encoder or clip.model.encode_image
    return dataclasses.replace(clip, image_encoder=wrap(real))


def _finite_json(prediction) -> dict:
    return json.loads(json.dumps(prediction.to_dict(), allow_nan=False))


# --- budget ------------------------------------------------------------------------------------
def test_budget_reads_config_and_the_environment_wins() -> None:
    budget = Budget.from_config({"max_request_cost": 100, "deadline_ms": "2000"}, environ={"TTA_DEADLINE_MS": "500"})
    assert (budget.max_request_cost, budget.deadline_ms) == (100.0, 500.0)
    for bad in ("0", "-3", "nan", "inf", "soon"):
        with pytest.raises(ValueError, match="deadline_ms"):
            Budget.from_config({}, environ={"TTA_DEADLINE_MS": bad})


def test_the_issue_request_is_refused_naming_the_limit(tiny_clip, sample_images) -> None:
    """n_views 512 x steps 16 over 1,000 new labels took 11 s on the tiny model and minutes on
    ViT-B/16: refused before any work, and the labels were never encoded."""
    engine = _engine(tiny_clip, Budget())
    labels = [f"class {i}" for i in range(1000)]
    cached = len(engine.text_cache)
    start = time.perf_counter()
    with pytest.raises(BadRequest, match="max_request_cost") as info:
        engine.predict(sample_images["chelsea"], method="tpt", labels=labels, options={"n_views": 512, "steps": 16})
    assert info.value.code == "over_budget"
    assert time.perf_counter() - start < 2.0
    assert len(engine.text_cache) == cached


@pytest.mark.parametrize("name", list_methods())
def test_every_method_default_is_admitted_over_1000_classes(name: str) -> None:
    options = get_method_class(name).Options()
    Budget().admit(estimate(options, 1000, new_text_prompts=0))


def test_cost_grows_with_views_steps_and_new_labels() -> None:
    base = estimate(TPTOptions(n_views=8, steps=1), 10)
    assert estimate(TPTOptions(n_views=64, steps=1), 10).image_passes > base.image_passes
    assert estimate(TPTOptions(n_views=8, steps=4), 10).text_passes > base.text_passes
    assert estimate(TPTOptions(n_views=8, steps=1), 10, new_text_prompts=800).text_passes == base.text_passes + 800
    assert Cost(image_passes=10, text_passes=40).units(Budget(text_weight=0.25)) == 20.0


def test_new_label_set_with_many_templates_is_priced(tiny_clip, sample_images) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS), budget=Budget(max_request_cost=50))
    engine.predict(sample_images["chelsea"], labels=[f"c{i}" for i in range(100)])  # 100 x 0.25 + 1 = 26 units
    with pytest.raises(BadRequest, match="max_request_cost 50"):
        engine.predict(sample_images["chelsea"], labels=[f"d{i}" for i in range(300)])  # 76 units


# --- deadlines ---------------------------------------------------------------------------------
def test_deadline_is_capped_by_the_deployment_and_validated() -> None:
    budget = Budget(deadline_ms=1000)
    now = time.monotonic()
    assert budget.deadline(None, start=now) == pytest.approx(now + 1.0)
    assert budget.deadline(250, start=now) == pytest.approx(now + 0.25)
    assert budget.deadline("5000", start=now) == pytest.approx(now + 1.0)  # lower only, never raise
    for bad in (0, -1, float("nan"), float("inf"), "1e999", True, "soon", [], {}):
        with pytest.raises(BadRequest) as info:
            parse_deadline_ms(bad)
        assert info.value.code == "bad_deadline"


def test_deadline_must_stay_below_the_worker_timeout() -> None:
    Budget(deadline_ms=90_000).check_timeout(120)
    with pytest.raises(ValueError, match="responseTimeout"):
        Budget(deadline_ms=100_000).check_timeout(120)


def test_an_unset_deadline_fits_a_short_worker_timeout_and_a_set_one_must() -> None:
    assert Budget.for_worker({}, 30, environ={}).deadline_ms == 15_000
    assert Budget.for_worker({}, None, environ={}).deadline_ms == DEFAULT_DEADLINE_MS
    assert Budget.for_worker({"deadline_ms": 20_000}, 30, environ={}).deadline_ms == 20_000
    with pytest.raises(ValueError, match="responseTimeout"):
        Budget.for_worker({}, 30, environ={"TTA_DEADLINE_MS": "25000"})


def test_shipped_defaults_keep_the_deadline_below_the_response_timeouts() -> None:
    """config.properties' default_response_timeout and `tta archive`'s responseTimeout default."""
    properties = (REPO / "config.properties").read_text()
    timeout_s = float(re.search(r"^default_response_timeout=(\d+)", properties, re.M).group(1))
    Budget().check_timeout(timeout_s)
    import argparse

    from tta.commands.archive import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    Budget().check_timeout(parser.parse_args([]).response_timeout)
    assert DEFAULT_DEADLINE_MS < 1000 * timeout_s


def _slow(real):
    def encode(views):
        if views.shape[0] > 1:
            time.sleep(0.4)
        return real(views)
    return encode


@pytest.mark.parametrize("name", ["tpt", "difftpt", "rlcf"])
def test_deadline_during_encoding_answers_zero_shot(tiny_clip, sample_images, name: str) -> None:
    """A slow encoder (the deadline passes while the views are encoded): the method stops at its
    next stage boundary, before adapting, and the answer is the zero-shot one, flagged."""
    image = sample_images["chelsea"]
    reference = _engine(tiny_clip).predict(image, method="zeroshot")
    engine = _engine(_with_encoder(tiny_clip, _slow))
    prediction = engine.predict(image, method=name, deadline=time.monotonic() + 0.3)
    assert prediction.extra["fallback"] == DEADLINE
    assert prediction.method == name
    assert torch.allclose(prediction.probs, reference.probs, atol=1e-6)
    _finite_json(prediction)


def test_zero_keeps_its_vote_once_the_views_are_encoded(tiny_clip, sample_images) -> None:
    """ZERO has no adaptation stage: after encoding only the (cheap) vote remains, so it is kept."""
    engine = _engine(_with_encoder(tiny_clip, _slow))
    prediction = engine.predict(sample_images["chelsea"], method="zero", deadline=time.monotonic() + 0.3)
    assert "fallback" not in prediction.extra and "votes" in prediction.extra


def test_deadline_between_steps_stops_tpt_and_restores_the_prompt(tiny_clip, sample_images) -> None:
    learner = PromptLearner(tiny_clip, LABELS)
    initial = learner.ctx.detach().clone()
    feats = torch.nn.functional.normalize(torch.randn(8, tiny_clip.embed_dim), dim=-1)
    with pytest.raises(ZeroShotFallback, match="step 1") as info:
        with learner.episode(), torch.enable_grad():
            tune_prompt(learner, feats, tiny_clip.logit_scale, 0.5, 5e-3, 3, 0.01, deadline=time.monotonic() - 1)
    assert info.value.reason == DEADLINE
    assert torch.equal(learner.ctx.detach(), initial)


def test_zeroshot_ignores_the_deadline_and_no_deadline_means_no_fallback(tiny_clip, sample_images) -> None:
    engine = _engine(tiny_clip)
    assert "fallback" not in engine.predict(sample_images["chelsea"], deadline=time.monotonic() - 1).extra
    assert "fallback" not in engine.predict(sample_images["chelsea"], method="tpt").extra


# --- numerical faults --------------------------------------------------------------------------
def _nan_views(real):
    def encode(views):
        out = real(views)
        if views.shape[0] > 1:  # every multi-view batch is poisoned; the original alone is fine
            out = torch.full_like(out, float("nan"))
        return out
    return encode


@pytest.mark.parametrize("name", ["tpt", "zero", "difftpt", "rlcf"])
def test_nan_during_adaptation_falls_back_to_zero_shot(tiny_clip, sample_images, name: str) -> None:
    image = sample_images["astronaut"]
    reference = _engine(tiny_clip).predict(image, method="zeroshot")
    prediction = _engine(_with_encoder(tiny_clip, _nan_views)).predict(image, method=name)
    assert prediction.extra["fallback"] == NUMERICAL
    assert torch.allclose(prediction.probs, reference.probs, atol=1e-6)
    _finite_json(prediction)


@pytest.mark.parametrize("name", list_methods())
def test_no_method_lets_a_nan_into_the_response(tiny_clip, sample_images, name: str) -> None:
    prediction = _engine(_with_encoder(tiny_clip, _nan_views)).predict(sample_images["coffee"], method=name)
    body = _finite_json(prediction)
    assert all(0.0 <= item["score"] <= 1.0 for item in body["top_k"])


def test_a_model_that_only_produces_nan_is_unavailable_not_a_nan_answer(tiny_clip, sample_images) -> None:
    def all_nan(real):
        return lambda views: torch.full_like(real(views), float("nan"))

    engine = _engine(_with_encoder(tiny_clip, all_nan))
    with pytest.raises(Unavailable, match="non-finite"):
        engine.predict(sample_images["coffee"], method="tpt")


def test_diverging_or_non_finite_steps_are_numerical_faults() -> None:
    params = [torch.zeros(3)]
    first = check_step(torch.tensor(0.5), params, None, 0)
    assert check_step(torch.tensor(0.7), params, first, 1) == 0.5
    with pytest.raises(ZeroShotFallback, match="diverging"):
        check_step(torch.tensor(5e4), params, first, 2)
    with pytest.raises(ZeroShotFallback, match="non-finite loss"):
        check_step(torch.tensor(float("inf")), params, first, 2)
    with pytest.raises(ZeroShotFallback, match="non-finite parameters"):
        check_step(torch.tensor(0.5), [torch.tensor([0.0, float("nan")])], first, 2)


# --- out of memory (CPU-tested: the CUDA exception type, raised from the encoder) ---------------
def _oom_above(limit: int):
    def wrap(real):
        def encode(views):
            if views.shape[0] > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {views.shape[0]} views")
            return real(views)
        return encode
    return wrap


def test_out_of_memory_retries_with_fewer_views(tiny_clip, sample_images) -> None:
    engine = Engine(_with_encoder(tiny_clip, _oom_above(4)), LabelSet.create(LABELS),
                    method_defaults={"tpt": {"n_views": 16}})
    prediction = engine.predict(sample_images["rocket"], method="tpt")
    assert prediction.extra["oom_retries"] == 2 and prediction.extra["n_views"] == 4
    assert "fallback" not in prediction.extra


def test_out_of_memory_then_zero_shot_and_the_worker_stays_healthy(tiny_clip, sample_images) -> None:
    image = sample_images["rocket"]
    clip = _with_encoder(tiny_clip, _oom_above(1))
    engine = Engine(clip, LabelSet.create(LABELS), method_defaults={"tpt": {"n_views": 16}, "zero": {"n_views": 16}})
    reference = _engine(tiny_clip).predict(image, method="zeroshot")
    for name in ("tpt", "zero"):
        prediction = engine.predict(image, method=name)
        assert prediction.extra["fallback"] == OOM
        assert torch.allclose(prediction.probs, reference.probs, atol=1e-6)
    assert "fallback" not in engine.predict(image, method="tpt", options={"n_views": 1}).extra


def test_out_of_memory_even_for_zero_shot_is_unavailable(tiny_clip, sample_images) -> None:
    engine = _engine(_with_encoder(tiny_clip, _oom_above(0)))
    with pytest.raises(Unavailable, match="out of memory"):
        engine.predict(sample_images["rocket"], method="tpt")


def test_other_errors_are_not_mistaken_for_out_of_memory(tiny_clip, sample_images) -> None:
    def broken(real):
        def encode(views):
            raise RuntimeError("shape mismatch")
        return encode

    with pytest.raises(RuntimeError, match="shape mismatch"):
        _engine(_with_encoder(tiny_clip, broken)).predict(sample_images["rocket"], method="tpt")
