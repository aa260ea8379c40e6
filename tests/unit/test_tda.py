"""TDA's cache rules against hand-computed cases, bounds, and snapshot round-trips."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tta.engine import Engine
from tta.methods.tda import TDA, TDAOptions, cache_logits, negative_values, normalized_entropy
from tta.state import StateConfig, configure
from tta.text import LabelSet

LABELS = ["cat", "dog", "car", "cup"]


@pytest.fixture()
def state_dir(tmp_path: Path):
    previous = configure(StateConfig(directory=tmp_path, deployment="t", every=1))
    yield tmp_path
    configure(previous)


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 72, 72, generator=gen) * 255).to(torch.uint8) for _ in range(n)]


def test_cache_logits_is_tip_adapter_affinity() -> None:
    f = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    values = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = cache_logits(f, keys, values, alpha=2.0, beta=5.0)
    assert torch.allclose(out, torch.tensor([[2.0, 2.0 * math.exp(-5.0), 0.0]]))


def test_negative_mask_and_normalised_entropy() -> None:
    probs = torch.tensor([0.02, 0.03, 0.5, 0.45])
    assert negative_values(probs, (0.03, 1.0)).tolist() == [0.0, 0.0, 1.0, 1.0]  # strict bounds
    assert normalized_entropy(1.0, 4) == pytest.approx(0.5)  # nats / log2(C), as the repo does


def test_positive_cache_replaces_highest_entropy_when_full(tiny_clip) -> None:
    method = TDA(tiny_clip)
    opts = TDAOptions(negative=False)
    probs = torch.full((4,), 0.25)
    feats = [F.normalize(torch.randn(64, generator=torch.Generator().manual_seed(i)), dim=0) for i in range(5)]
    for feat, loss in zip(feats[:3], (0.5, 0.4, 0.6), strict=True):
        assert method.update(feat, 0, loss, probs, opts)
    assert method.update(feats[3], 0, 0.45, probs, opts)  # replaces the 0.6 entry
    assert not method.update(feats[4], 0, 0.7, probs, opts)  # higher than every entry: ignored
    entries = method.pos.entries(0)
    assert [e.score for e in entries] == [0.4, 0.45, 0.5]
    assert torch.equal(entries[1].key, feats[3])


def test_negative_cache_only_inside_entropy_band(tiny_clip) -> None:
    method = TDA(tiny_clip)
    opts = TDAOptions(positive=False)  # band (0.2, 0.5) on loss / log2(4) = loss / 2
    probs = torch.tensor([0.7, 0.2, 0.05, 0.05])
    feat = F.normalize(torch.ones(64), dim=0)
    for loss, enters in ((0.3, False), (0.4, False), (0.6, True), (0.99, True), (1.0, False), (1.2, False)):
        before = len(method.neg)
        method.update(feat, 1, loss, probs, opts)
        assert (len(method.neg) > before) == enters or len(method.neg) == 2, loss
    assert sorted(e.score for e in method.neg.entries(1)) == [0.6, 0.99]
    assert torch.equal(method.neg.entries(1)[0].value, probs)


def test_prediction_uses_cache_updated_with_the_current_sample(tiny_clip, sample_images) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    image = sample_images["chelsea"]
    pred = engine.predict(image, method="tda")
    opts = TDAOptions()
    # TDA works on 100 * cos (the repo's scale); log p at the model's scale s is s * cos + const
    logits = (opts.logit_scale / tiny_clip.logit_scale) * pred.zeroshot_probs.log()
    probs = logits.softmax(-1)
    c = int(probs.argmax())
    entropy = float(-(probs * probs.log()).sum())
    expected = logits.clone()
    expected[c] += opts.pos_alpha  # affinity with itself is 1: alpha * exp(0)
    if opts.neg_entropy[0] < normalized_entropy(entropy, len(LABELS)) < opts.neg_entropy[1]:
        expected -= opts.neg_alpha * negative_values(probs, opts.neg_mask)
    assert torch.allclose(pred.probs, expected.softmax(-1), atol=1e-5)
    assert engine.state_summary("tda")["positive"]["entries_per_class"] == {LABELS[c]: 1}


def test_caches_bounded_under_ten_times_capacity(tiny_clip) -> None:
    method = TDA(tiny_clip, TDAOptions(max_entries=12))
    opts = method.defaults
    gen = torch.Generator().manual_seed(0)
    n_classes = 10
    for _ in range(10 * n_classes * 3):
        feat = F.normalize(torch.randn(64, generator=gen), dim=0)
        probs = torch.rand(n_classes, generator=gen).softmax(-1)
        loss = float(torch.rand(1, generator=gen)) * 3.3 * 0.3 + 0.7  # many inside the band
        method.update(feat, int(torch.randint(0, n_classes, (1,), generator=gen)), loss, probs, opts)
        assert len(method.pos) <= 12 and len(method.neg) <= 12
        assert all(n <= 3 for n in method.pos.counts().values())
        assert all(n <= 2 for n in method.neg.counts().values())
    summary = method.state_summary()
    assert summary["positive"]["total"] == 12 and summary["positive"]["capacity_per_class"] == 3


def test_export_import_round_trip_gives_identical_predictions(tiny_clip) -> None:
    images = _images(12)
    a = Engine(tiny_clip, LabelSet.create(LABELS))
    for image in images[:10]:
        a.predict(image, method="tda")
    b = Engine(tiny_clip, LabelSet.create(LABELS))
    b.import_state("tda", a.export_state("tda"))
    for image in images[10:]:
        assert torch.equal(a.predict(image, method="tda").probs, b.predict(image, method="tda").probs)


def test_snapshot_restored_on_start(tiny_clip, state_dir: Path) -> None:
    images = _images(8, seed=1)
    a = Engine(tiny_clip, LabelSet.create(LABELS))
    for image in images[:6]:
        a.predict(image, method="tda")
    assert (state_dir / "t.tda.state").is_file()
    exported = a.export_state("tda")
    restarted = Engine(tiny_clip, LabelSet.create(LABELS))  # a new worker process would do the same
    summary = restarted.state_summary("tda")
    assert summary["persistence"]["restored"] and summary["total"] == a.state_summary("tda")["total"]
    got = restarted.predict(images[7], method="tda")
    previous = configure(StateConfig())  # an in-process reference with the exported state
    try:
        reference = Engine(tiny_clip, LabelSet.create(LABELS))
        reference.import_state("tda", exported)
        want = reference.predict(images[7], method="tda")
    finally:
        configure(previous)
    assert torch.equal(got.probs, want.probs)
    assert _same_state(reference.export_state("tda"), restarted.export_state("tda"))


def _same_state(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same_state(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return len(x) == len(y) and all(_same_state(a, b) for a, b in zip(x, y, strict=True))
    return x == y


def test_corrupt_snapshot_starts_empty_with_warning(tiny_clip, state_dir: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    (state_dir / "t.tda.state").write_bytes(b"TTASTATE" + b"\x01" * 40)
    with caplog.at_level(logging.WARNING):
        engine = Engine(tiny_clip, LabelSet.create(LABELS))
        summary = engine.state_summary("tda")
    assert summary["total"] == 0 and not summary["persistence"]["restored"]
    assert "refused" in caplog.text
    engine.predict(_images(1)[0], method="tda")  # and it serves
    assert engine.state_summary("tda")["total"] >= 1


def test_snapshot_for_other_labels_is_dropped(tiny_clip, state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = Engine(tiny_clip, LabelSet.create(LABELS))
    for image in _images(3):
        a.predict(image, method="tda")
    with caplog.at_level(logging.WARNING):
        other = Engine(tiny_clip, LabelSet.create(["apple", "pear"]))
        other.predict(_images(1)[0], method="tda")
    summary = other.state_summary("tda")
    assert summary["positive"]["total"] == 1 and set(summary["positive"]["entries_per_class"]) <= {"apple", "pear"}
    assert "starting empty" in caplog.text


def test_request_labels_other_than_deployment_leave_state_alone(tiny_clip, sample_images) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    pred = engine.predict(sample_images["coffee"], method="tda", labels=["mug", "plate"])
    assert "fallback" in pred.extra and engine.state_summary("tda")["total"] == 0


def test_multi_view_tda_runs(tiny_clip, sample_images) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    pred = engine.predict(sample_images["rocket"], method="tda", options={"n_views": 8, "augmix": False})
    assert abs(float(pred.probs.sum()) - 1) < 1e-5 and engine.state_summary("tda")["positive"]["total"] == 1
