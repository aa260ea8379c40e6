"""`auto`: the gate's extremes equal its first and last tier, the budget stops escalation, the tier
that answered is reported, and the online gate stays inside its bounds."""

from __future__ import annotations

import time

import pytest
import torch

from tta.engine import Engine
from tta.errors import BadRequest
from tta.methods.auto import gate_confidence, parse_tiers
from tta.text import LabelSet

LABELS = ["cat", "dog", "car", "rocket", "cup"]
TIERS = "zeroshot,zero:4,tpt:8"


@pytest.fixture(scope="module")
def engine(tiny_clip) -> Engine:
    return Engine(tiny_clip, LabelSet.create(LABELS), default_method="auto",
                  method_defaults={"auto": {"tiers": TIERS}, "zero": {"n_views": 4}, "tpt": {"n_views": 8}})


def test_gate_zero_answers_with_the_first_tier(engine, sample_images):
    for name, image in sample_images.items():
        auto = engine.predict(image, method="auto", options={"threshold": 0.0}, seed=3)
        first = engine.predict(image, method="zeroshot", seed=3)
        assert auto.extra["tier"] == "zeroshot" and auto.extra["escalated"] is False, name
        assert auto.extra["stopped_by"] == "confident" and auto.extra["encoded_images"] == 1
        assert torch.allclose(auto.probs, first.probs, atol=1e-6)


def test_gate_one_answers_with_the_last_tier(engine, sample_images):
    for name, image in sample_images.items():
        auto = engine.predict(image, method="auto", options={"threshold": 1.0}, seed=3)
        last = engine.predict(image, method="tpt", seed=3)
        assert auto.extra["tier"] == "tpt:8" and auto.extra["escalated"] is True, name
        assert auto.extra["stopped_by"] == "last_tier" and len(auto.extra["gate"]["values"]) == 2
        assert auto.extra["encoded_images"] == 8  # views of the zero tier were reused, not re-encoded
        assert auto.label == last.label
        assert torch.allclose(auto.probs, last.probs, atol=1e-4)


def test_last_tier_zero_equals_zero(engine, sample_images):
    image = sample_images["coffee"]
    auto = engine.predict(image, method="auto", options={"threshold": 1.0, "tiers": "zeroshot,zero:4"}, seed=9)
    zero = engine.predict(image, method="zero", seed=9)
    assert auto.extra["tier"] == "zero:4" and torch.equal(auto.probs, zero.probs)


def test_middle_threshold_reports_the_gate_it_used(engine, sample_images):
    image = sample_images["chelsea"]
    zs = engine.predict(image, method="zeroshot")
    confidence = float(zs.probs.max())
    below = engine.predict(image, method="auto", options={"threshold": confidence - 1e-3})
    above = engine.predict(image, method="auto", options={"threshold": min(1.0, confidence + 1e-3),
                                                          "tiers": "zeroshot,zero:4"})
    assert below.extra["tier"] == "zeroshot" and below.extra["gate"]["values"] == [pytest.approx(confidence, abs=1e-5)]
    assert above.extra["tier"] == "zero:4" and above.extra["escalated"] is True
    body = above.to_dict()
    assert {"tier", "escalated", "gate", "stopped_by"} <= body.keys()


def test_budget_stops_escalation_using_measured_tier_latency(engine, sample_images):
    image = sample_images["rocket"]
    engine.predict(image, method="auto", options={"threshold": 1.0})  # every tier measured once
    latency = engine.method("auto").latency
    tpt_ms = latency.get("tpt:8", len(LABELS))
    zero_ms = latency.get("zero:4", len(LABELS))
    assert tpt_ms is not None and zero_ms is not None and tpt_ms > 0
    tight = engine.predict(image, method="auto", options={"threshold": 1.0, "budget_ms": 0.001})
    assert tight.extra["tier"] == "zeroshot" and tight.extra["stopped_by"] == "budget"
    # a deadline already passed stops it as well
    deadline = engine.predict(image, method="auto", options={"threshold": 1.0}, deadline=time.monotonic())
    assert deadline.extra["stopped_by"] == "budget" and deadline.extra["tier"] == "zeroshot"
    roomy = engine.predict(image, method="auto", options={"threshold": 1.0, "budget_ms": 600_000})
    assert roomy.extra["tier"] == "tpt:8"


def test_online_gate_tracks_a_target_rate_within_bounds(tiny_clip, sample_images):
    engine = Engine(tiny_clip, LabelSet.create(LABELS), default_method="auto",
                    method_defaults={"auto": {"tiers": "zeroshot,zero:2", "threshold": 0.9, "target_rate": 0.25,
                                              "rate_step": 0.2, "threshold_min": 0.1, "threshold_max": 0.95}})
    thresholds, escalated = [], []
    for i in range(12):
        pred = engine.predict(sample_images["astronaut"], seed=i)
        thresholds.append(pred.extra["gate"]["threshold"])
        escalated.append(pred.extra["escalated"])
    assert all(0.1 <= t <= 0.95 for t in thresholds)
    # each step moves the threshold by rate_step * (target - escalated), clamped to the bounds
    for i in range(1, 12):
        expected = thresholds[i - 1] + 0.2 * (0.25 - escalated[i - 1])
        assert thresholds[i] == pytest.approx(min(max(expected, 0.1), 0.95), abs=1e-5)
    assert escalated[0] and thresholds[-1] < thresholds[0]  # a 5-class random model is never 90 % sure
    engine.reset_state("auto")
    assert engine.predict(sample_images["astronaut"]).extra["gate"]["threshold"] == pytest.approx(0.9)


def test_gate_confidences():
    p = torch.tensor([0.7, 0.2, 0.1])
    assert gate_confidence(p, "max_prob") == pytest.approx(0.7)
    assert gate_confidence(p, "margin") == pytest.approx(0.5)
    assert gate_confidence(torch.full((4,), 0.25), "entropy") == pytest.approx(0.0, abs=1e-6)
    assert gate_confidence(torch.tensor([1.0, 0.0]), "entropy") == pytest.approx(1.0)


def test_bad_tiers_are_client_errors(engine, sample_images):
    assert [t.key for t in parse_tiers("zeroshot, zero:16 ,tpt")] == ["zeroshot", "zero:16", "tpt:64"]
    for bad in ("", "zeroshot,rlcf", "zero:0", "zeroshot:4", "zero:x"):
        with pytest.raises(BadRequest):
            engine.predict(sample_images["chelsea"], method="auto", options={"tiers": bad})


def test_tda_tier_is_the_deployments_tda_fed_the_original_view(tiny_clip, sample_images):
    """With a stream tier first, auto at gate 0 answers what `tda` answers and updates the same
    caches in the same order (two fresh engines, the same stream of images)."""
    via_auto = Engine(tiny_clip, LabelSet.create(LABELS), default_method="auto",
                      method_defaults={"auto": {"tiers": "tda,zero:4", "threshold": 0.0}})
    direct = Engine(tiny_clip, LabelSet.create(LABELS), default_method="tda")
    for name, image in sample_images.items():
        a, d = via_auto.predict(image), direct.predict(image)
        assert a.extra["tier"] == "tda" and a.extra["encoded_images"] == 1, name
        assert torch.allclose(a.probs, d.probs, atol=1e-6)
    assert via_auto.state_summary("tda")["updates"] == direct.state_summary("tda")["updates"] > 0
    escalated = via_auto.predict(sample_images["chelsea"], options={"threshold": 1.0}, seed=2)
    assert escalated.extra["tier"] == "zero:4" and escalated.extra["encoded_images"] == 4
