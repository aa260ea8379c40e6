"""DiffTPT: real diffusers generation inside the method, the cosine filter, the budget fallback."""

from __future__ import annotations

import math
import time

import pytest
import torch

from tta.engine import Engine
from tta.errors import BadRequest, ModelUnavailable
from tta.generation import (
    GenerationBudgetExceeded,
    GenerationConfig,
    ViewGenerator,
    get_generator,
    load_pipeline,
)
from tta.methods.difftpt import (
    FALLBACK_DEADLINE,
    FALLBACK_DISABLED,
    FALLBACK_OVER_BUDGET,
    cosine_filter,
    select_views,
)
from tta.testing.tiny_diffusion import build_tiny_variation_pipeline
from tta.text import LabelSet

LABELS = ["cat", "dog", "car", "rocket", "cup"]
TINY = {"generator": "tiny-random", "n_generated": 3, "diffusion_steps": 2, "generation_batch": 2,
        "n_views": 8, "steps": 1}


def _engine(clip, **overrides) -> Engine:
    return Engine(clip, LabelSet.create(LABELS), method_defaults={"difftpt": {**TINY, **overrides}})


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_cosine_filter_keeps_the_views_whose_logits_point_like_the_originals():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(11, 5, generator=gen)
    rows = logits.tolist()
    # by the definition: cosine of each non-original row with row 0, keep int(10 * 0.8) = 8 highest
    ranked = sorted(range(1, 11), key=lambda i: _cos(rows[0], rows[i]), reverse=True)
    kept = cosine_filter(logits, 0.8)
    assert kept.tolist() == ranked[:8]
    assert 0 not in kept.tolist()
    # cosine, not distance: scaling a view's logits does not change whether it is kept
    scaled = logits.clone()
    scaled[ranked[0]] *= 50.0
    assert cosine_filter(scaled, 0.8).tolist() == ranked[:8]
    assert cosine_filter(logits[:1], 0.8).numel() == 0


def test_views_kept_are_cosine_top_80_percent_plus_original_then_30_percent_lowest_entropy():
    gen = torch.Generator().manual_seed(11)
    logits = 4.0 * torch.randn(21, 6, generator=gen)
    rows = logits.tolist()

    def entropy(row: list[float]) -> float:
        z = sum(math.exp(v) for v in row)
        return -sum(math.exp(v) / z * (v - math.log(z)) for v in row)

    by_cosine = sorted(range(1, 21), key=lambda i: _cos(rows[0], rows[i]), reverse=True)[: int(20 * 0.8)]
    pool = [0] + by_cosine  # 17 views
    expected = sorted(pool, key=lambda i: entropy(rows[i]))[: int(17 * 0.3)]
    assert select_views(logits, 0.8, 0.3).tolist() == expected


def test_difftpt_runs_the_real_diffusers_pipeline_for_generated_views(tiny_clip, sample_images):
    engine = _engine(tiny_clip)
    generator = engine.method("difftpt").generator()
    calls = []
    hook = generator.pipe.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        prediction = engine.predict(sample_images["chelsea"], method="difftpt", seed=0)
    finally:
        hook.remove()
    body = prediction.to_dict()
    assert body["generated_views"] == 3 and "fallback" not in body
    # 3 views in batches of 2 -> 2 pipeline calls x 2 denoising steps; CFG doubles each UNet batch
    assert calls == [4, 4, 2, 2]
    assert prediction.timings_ms["generate"] > 0 and "adapt" in prediction.timings_ms
    assert abs(float(prediction.probs.sum()) - 1.0) < 1e-5
    assert generator.estimate_ms(3, 2) is not None  # the measured per-view time drives the budget


def test_fallback_when_the_estimate_exceeds_the_budget_is_reported_and_equals_tpt_views(tiny_clip, sample_images):
    engine = _engine(tiny_clip)
    image = sample_images["coffee"]
    engine.predict(image, method="difftpt", seed=0)  # measures the per-view time
    fast = engine.predict(image, method="difftpt", seed=4, options={"time_budget_ms": 0.001})
    body = fast.to_dict()
    assert body["fallback"] == FALLBACK_OVER_BUDGET and body["generated_views"] == 0
    assert fast.timings_ms["generate"] < 50.0  # refused before generating
    plain = engine.predict(image, method="difftpt", seed=4, options={"generation": False})
    assert plain.to_dict()["fallback"] == FALLBACK_DISABLED
    assert torch.equal(fast.probs, plain.probs)  # the fallback is exactly DiffTPT over the TPT views


def test_deadline_stops_generation_inside_the_denoising_loop(tiny_clip, sample_images):
    config = GenerationConfig(pipeline="tiny-random", steps=2, batch_size=2)
    fresh = ViewGenerator(build_tiny_variation_pipeline(), config, torch.device("cpu"))
    with pytest.raises(GenerationBudgetExceeded):
        fresh.generate(sample_images["rocket"], 2, deadline=time.perf_counter())
    assert fresh.ms_per_view_step is not None  # the aborted attempt still informs the next estimate
    # through the method: no estimate yet, so only the deadline can stop it
    engine = _engine(tiny_clip)
    method = engine.method("difftpt")
    method._generator = ViewGenerator(build_tiny_variation_pipeline(), config, torch.device("cpu"))
    prediction = engine.predict(sample_images["rocket"], method="difftpt", options={"time_budget_ms": 0.001})
    assert prediction.to_dict()["fallback"] == FALLBACK_DEADLINE


def test_generation_disabled_per_deployment_and_requests_cannot_raise_costs(tiny_clip, sample_images):
    engine = _engine(tiny_clip, generation=False, time_budget_ms=5000.0)
    prediction = engine.predict(sample_images["chelsea"], method="difftpt")
    assert prediction.to_dict()["fallback"] == FALLBACK_DISABLED
    for options in ({"generation": True}, {"generator": "lambdalabs/other"}, {"time_budget_ms": 9999.0},
                    {"n_generated": 65}, {"generation_cache_size": 10}):
        with pytest.raises(BadRequest):
            engine.predict(sample_images["chelsea"], method="difftpt", options=options)


def test_prompt_is_restored_bit_exactly_after_a_request(tiny_clip, sample_images):
    engine = _engine(tiny_clip, steps=2, lr=0.05)
    method = engine.method("difftpt")
    engine.predict(sample_images["astronaut"], method="difftpt")
    learner = method.prompts.get(method, engine.labels, 4, "a photo of a")
    assert torch.equal(learner.ctx.detach(), learner.ctx_init) and learner.ctx.grad is None


def test_generated_view_cache_is_bounded_and_keyed_by_image(sample_images):
    config = GenerationConfig(pipeline="tiny-random", steps=1, cache_size=2)
    gen = ViewGenerator(build_tiny_variation_pipeline(), config, torch.device("cpu"))
    small = {k: v[:, :64, :64].contiguous() for k, v in sample_images.items()}
    first = gen.generate(small["chelsea"], 1, seed=0, out_size=16)
    again = gen.generate(small["chelsea"], 1, seed=7, out_size=16)
    assert again is first and gen.cache_hits == 1
    assert first.dtype == torch.uint8 and first.shape == (1, 3, 16, 16)
    for name in ("coffee", "rocket", "astronaut"):
        gen.generate(small[name], 1, out_size=16)
    assert gen.cache_len == 2


def test_missing_pipeline_offline_names_it_and_the_local_path_option():
    with pytest.raises(ModelUnavailable, match="lambdalabs/sd-image-variations-diffusers.*save_pretrained"):
        load_pipeline(GenerationConfig(), torch.device("cpu"))
    with pytest.raises(ModelUnavailable, match="/no/such/folder"):
        get_generator(GenerationConfig(pipeline="/no/such/folder"), "cpu")


def test_a_stale_estimate_is_not_trusted_so_generation_recovers(sample_images, monkeypatch):
    import tta.generation as generation

    config = GenerationConfig(pipeline="tiny-random", steps=1)
    gen = ViewGenerator(build_tiny_variation_pipeline(), config, torch.device("cpu"))
    gen.generate(sample_images["coffee"][:, :64, :64].contiguous(), 1)
    assert gen.estimate_ms(4, 1) == pytest.approx(4 * gen.ms_per_view_step)
    monkeypatch.setattr(generation, "ESTIMATE_TTL_S", 0.0)
    assert gen.estimate_ms(4, 1) is None  # one slow outlier cannot refuse generation forever


def test_unloadable_generator_falls_back_with_the_reason(tiny_clip, sample_images):
    engine = _engine(tiny_clip, generator="/no/such/sd-folder")
    body = engine.predict(sample_images["chelsea"], method="difftpt").to_dict()
    assert body["fallback"] == "generator_unavailable" and "/no/such/sd-folder" in body["fallback_detail"]
    assert body["generated_views"] == 0
