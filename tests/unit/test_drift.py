"""The shared drift reference (tta.drift): pure operations, sharing through the state store, and
signals that separate clean from shifted digits on the tiny digits CLIP."""

from __future__ import annotations

import math

import pytest
import torch
from prometheus_client import CollectorRegistry
from torchvision.transforms.v2 import functional as TF

from tta.drift import (
    DriftConfig,
    DriftMonitor,
    apply,
    expected_js_bits,
    frozen,
    js_divergence_bits,
    new_reference,
    observe_op,
)
from tta.engine import Engine
from tta.errors import BadRequest
from tta.metrics import ServingMetrics, sample_values
from tta.state import StateConfig, configure
from tta.text import LabelSet

LABELS = ("a", "b", "c")
META = {"method": "drift", "state_version": 1, "model": "m", "embed_dim": 4, "labels": list(LABELS)}


@pytest.fixture()
def shared_state():
    """One Redis state log for the 'workers' (DriftMonitors) of a test."""
    from tta.testing.redis_server import RedisServer, redis_server_binary

    if redis_server_binary() is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    with RedisServer() as server:
        previous = configure(StateConfig(url=server.url, deployment="t"))
        yield server
        configure(previous)


def unit(*values: float) -> torch.Tensor:
    v = torch.tensor(values, dtype=torch.float64)
    return v / v.norm()


def test_operations_are_pure_and_freeze_at_the_window() -> None:
    ref = new_reference(2, META)
    one = apply(ref, observe_op(unit(1, 0, 0, 0), 0, 0.5, 0.8))
    assert ref["count"] == 0 and float(ref["embedding_sum"].abs().sum()) == 0  # input untouched
    two = apply(one, observe_op(unit(0, 1, 0, 0), None, None, None))  # custom label set: embedding only
    assert frozen(two) and two["count"] == 2 and two["labelled"] == 1
    assert two["class_counts"].tolist() == [1.0, 0.0, 0.0]
    assert apply(two, observe_op(unit(0, 0, 1, 0), 1, 0.1, 0.9))["count"] == 2  # frozen: ignored
    again = apply(two, {"kind": "reset"})
    assert again["epoch"] == 1 and again["count"] == 0 and not frozen(again)
    assert apply(again, {"kind": "load", "state": two})["count"] == 2
    with pytest.raises(ValueError, match="labels"):
        apply(again, {"kind": "load", "state": {**two, "meta": {**META, "labels": ["x", "y", "z"]}}})
    with pytest.raises(ValueError, match="summing to labelled"):
        apply(again, {"kind": "load", "state": {**two, "labelled": 2}})
    with pytest.raises(ValueError, match="unknown"):
        apply(again, {"kind": "bogus"})


def test_js_divergence_bounds_and_noise_level() -> None:
    p = torch.tensor([5.0, 5.0, 0.0])
    assert js_divergence_bits(p, p) == pytest.approx(0.0)
    assert js_divergence_bits(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(1.0)
    # the first-order noise level matches two multinomial samples of one distribution
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.1] * 10)
    values = [js_divergence_bits(torch.bincount(torch.multinomial(probs, 200, True, generator=gen), minlength=10).double(),
                                 torch.bincount(torch.multinomial(probs, 400, True, generator=gen), minlength=10).double())
              for _ in range(200)]
    assert sum(values) / len(values) == pytest.approx(expected_js_bits(10, 200, 400), rel=0.25)


def test_reference_is_shared_between_workers_and_survives_restart(shared_state) -> None:
    config = DriftConfig(reference_size=4, window=2, sync_s=0.0)
    first, second = (DriftMonitor(LABELS, "m", 4, config) for _ in range(2))  # two workers, one store
    probs = torch.tensor([0.7, 0.2, 0.1])
    first.observe(unit(1, 0, 0, 0), probs, True)
    second.observe(unit(1, 1, 0, 0), probs, True)
    first.observe(unit(1, 0, 1, 0), probs, True)
    signals = second.observe(unit(1, 0, 0, 1), probs, True)
    assert signals is not None and signals.reference_ready and signals.reference_samples == 4
    assert first.state_summary()["reference"]["ready"]
    assert torch.equal(first.state_dict()["embedding_sum"], second.state_dict()["embedding_sum"])
    assert second.observe(unit(0, 1, 0, 0), probs, True).embedding_shift is not None  # window of 2 full

    restarted = DriftMonitor(LABELS, "m", 4, config)
    assert restarted.state_summary()["reference"]["samples"] == 4
    first.reset()  # any worker re-captures for all
    assert second.state_summary()["reference"] == {"samples": 0, "size": 4, "ready": False, "epoch": 1, "labelled": 0}
    assert restarted.observe(unit(1, 0, 0, 0), probs, True).embedding_shift is None  # capturing again
    for monitor in (first, second, restarted):
        monitor.host.close()


def shifted(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Rotated a quarter turn and noisy: the kind of shift a camera change brings."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.stack([TF.rotate(img.float(), 90.0) for img in images])
    return (out + torch.randn(out.shape, generator=gen) * 60).clamp(0, 255).round().to(torch.uint8)


def test_signals_separate_clean_from_shifted_digits(digits_clip, digits_data) -> None:
    """Grounds the alert thresholds of monitoring/: clean windows stay far below, shifted far above."""
    from tta.testing.digits import DIGIT_CLASSNAMES

    *_, images, _ = digits_data
    n, w = 128, 64
    engine = Engine(digits_clip, LabelSet.create(DIGIT_CLASSNAMES), drift=DriftConfig(n, w))
    for image in images[:n - 1]:
        assert engine.predict(image).drift.embedding_shift is None  # capturing the reference
    assert engine.predict(images[n - 1]).drift.reference_ready
    readings = {}
    for name, stream in (("clean", images[n:n + 2 * w]), ("shifted", shifted(images[:w]))):
        readings[name] = [engine.predict(image).drift for image in stream][-1]
    clean, shift = readings["clean"], readings["shifted"]
    assert clean.embedding_shift - clean.embedding_shift_expected < 0.05 < shift.embedding_shift - shift.embedding_shift_expected
    assert clean.class_divergence - clean.class_divergence_expected < 0.1 < shift.class_divergence - shift.class_divergence_expected
    assert abs(clean.entropy_shift) < 0.1 < shift.entropy_shift
    assert shift.confidence_shift > 0.1 > abs(clean.confidence_shift)


def test_engine_routes_state_actions_to_drift(tiny_clip) -> None:
    engine = Engine(tiny_clip, LabelSet.create(["cat", "dog"]), drift=DriftConfig(3, 2))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        engine.predict((torch.rand(3, 40, 40, generator=gen) * 255).to(torch.uint8))
    summary = engine.state_summary("drift")
    assert summary["scope"] == "stream" and summary["reference"]["ready"]
    exported = engine.export_state("drift")
    engine.reset_state("drift")
    assert engine.state_summary("drift")["reference"]["samples"] == 0
    engine.import_state("drift", exported)
    assert engine.state_summary("drift")["reference"] == {**summary["reference"], "epoch": 0}
    with pytest.raises(BadRequest):
        engine.import_state("drift", {**exported, "class_counts": torch.zeros(5)})
    with pytest.raises(BadRequest):
        engine.import_state("drift", {"meta": {}})
    assert engine.state_summary("drift")["reference"]["samples"] == 3  # a refused import changes nothing


def test_drift_gauges_follow_the_signals(tiny_clip) -> None:
    engine = Engine(tiny_clip, LabelSet.create(["cat", "dog"]), drift=DriftConfig(2, 2))
    metrics = ServingMetrics(CollectorRegistry())
    gen = torch.Generator().manual_seed(1)
    values = []
    for _ in range(4):
        prediction = engine.predict((torch.rand(3, 40, 40, generator=gen) * 255).to(torch.uint8))
        metrics.observe_drift("m", prediction.drift)
        text = metrics.render().decode()
        values.append(next(iter(sample_values(text, "tta_drift_embedding_shift", {"model": "m"}))))
    assert math.isnan(values[0]) and not math.isnan(values[1])  # capturing, then reference and window full
    assert values[3] == pytest.approx(prediction.drift.embedding_shift)
    assert next(iter(sample_values(text, "tta_drift_reference_ready", {"model": "m"}))) == 1.0
