"""TFUP / TFUP-T: the selection rule, semantic similarity, buffer bounds, periodic training, round-trip."""

from __future__ import annotations

import pytest
import torch

from tta.engine import Engine
from tta.methods.tfup import cache_shots, select_prototypes, semantic_similarity
from tta.text import LabelSet

LABELS = ["cat", "dog", "car"]
FAST = {"min_buffer": 6, "rebuild_every": 3, "min_shots": 2, "max_shots": 3}


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 64, 64, generator=gen) * 255).to(torch.uint8) for _ in range(n)]


def _select_by_definition(probs: torch.Tensor, shots: int) -> list[list[int]]:
    """The repo's double loop, literally: top 2*shots by p_i, then smallest sum of KL to the others."""
    out = []
    for i in range(probs.shape[1]):
        cand = probs[:, i].sort(descending=True).indices[: 2 * shots]
        p = probs[cand]
        kl = torch.stack([(p[j] * torch.log(p[j] / p)).sum() for j in range(len(cand))])
        out.append(cand[kl.sort(stable=True).indices[:shots]].tolist())
    return out


def test_selection_drops_the_confident_outlier() -> None:
    probs = torch.tensor([[0.99, 0.01], [0.70, 0.30], [0.69, 0.31], [0.71, 0.29], [0.20, 0.80], [0.10, 0.90]])
    chosen = select_prototypes(probs, shots=2)
    # class 0 candidates (top 4 by p0): 0, 3, 1, 2; sample 0 is the most confident but far from the
    # others; sample 1 (0.70) is the centre of the three similar ones.
    assert 0 not in chosen[0].tolist() and 1 in chosen[0].tolist()
    assert chosen.shape == (2, 2)


def test_selection_matches_the_definition_on_random_predictions() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = (torch.randn(40, 5, generator=gen) * 2).softmax(-1)
    for shots in (1, 3, 9):
        assert select_prototypes(probs, shots).tolist() == _select_by_definition(probs, shots)


def test_cache_shots_rule() -> None:
    assert cache_shots(100, 10, 0.3, 9, 16) == 9
    assert cache_shots(400, 10, 0.3, 9, 16) == 12
    assert cache_shots(10_000, 10, 0.3, 9, 16) == 16


def test_semantic_similarity_scaled_to_zero_two() -> None:
    query = torch.tensor([[0.8, 0.1, 0.1]])
    keys = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.4, 0.3, 0.3]]).log()
    sim = semantic_similarity(query, keys)
    assert sim[0, 0] == pytest.approx(2.0) and sim[0, 1] == pytest.approx(0.0) and 0 < sim[0, 2] < 2
    assert torch.equal(semantic_similarity(query, keys[:1]), torch.ones(1, 1))  # one key: neutral


def test_zero_shot_until_the_buffer_is_warm_then_cache(tiny_clip) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults={"tfup": FAST})
    images = _images(8)
    first = engine.predict(images[0], method="tfup")
    assert "fallback" in first.extra and torch.allclose(first.probs, first.zeroshot_probs)
    for image in images[1:]:
        last = engine.predict(image, method="tfup")
    summary = engine.state_summary("tfup")
    assert "fallback" not in last.extra and summary["rebuilds"] >= 1
    assert summary["cache"]["total"] == len(LABELS) * summary["cache"]["shots"]


def test_buffer_bounded_under_ten_times_capacity(tiny_clip) -> None:
    opts = dict(FAST, buffer_size=6, buffer_per_class=4)
    engine = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults={"tfup": opts})
    for image in _images(60, seed=1):
        engine.predict(image, method="tfup")
        summary = engine.state_summary("tfup")
        assert summary["buffer"]["total"] <= 6
        assert all(n <= 4 for n in summary["buffer"]["entries_per_class"].values())
        assert summary["cache"]["total"] <= len(LABELS) * 3


@pytest.mark.parametrize("name", ["tfup", "tfup-t"])
def test_export_import_round_trip_gives_identical_predictions(tiny_clip, name: str) -> None:
    opts = dict(FAST, train_every=4, train_steps=3) if name == "tfup-t" else FAST
    images = _images(14, seed=2)
    a = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults={name: opts})
    for image in images[:10]:
        a.predict(image, method=name)
    b = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults={name: opts})
    b.import_state(name, a.export_state(name))
    for image in images[10:12]:  # no training round in between: identical
        assert torch.equal(a.predict(image, method=name).probs, b.predict(image, method=name).probs)


def test_tfup_t_trains_periodically_and_bounded(tiny_clip) -> None:
    opts = dict(FAST, train_every=4, train_steps=5)
    engine = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults={"tfup-t": opts, "tfup": FAST})
    images = _images(14, seed=3)
    for image in images:
        adapted = engine.predict(image, method="tfup-t")
        plain = engine.predict(image, method="tfup")
    adapters = engine.state_summary("tfup-t")["adapters"]
    assert adapters["trained_rounds"] >= 2 and adapters["last_train_ms"] > 0 and adapters["last_loss"] is not None
    assert not torch.equal(adapted.probs, plain.probs)  # the adapters change the classifier
