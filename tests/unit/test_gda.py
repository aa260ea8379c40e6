"""GDA: estimator equals a direct NumPy computation; feedback, support folder, bounds, round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tta.engine import Engine
from tta.errors import BadRequest
from tta.methods.gda import ALPHA_GRID, choose_alpha, class_means, fit_gda, fit_support_folder
from tta.text import LabelSet

LABELS = ["cat", "dog", "car"]


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 64, 64, generator=gen) * 255).to(torch.uint8) for _ in range(n)]


def test_gda_matches_direct_numpy() -> None:
    rng = np.random.default_rng(0)
    n, d, c = 40, 6, 3
    x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.arange(n) % c
    mus = np.stack([x[y == k].mean(0) for k in range(c)])
    centered = x - mus[y]
    s = np.cov(centered.T)  # ddof 1, as torch.cov
    precision = d * np.linalg.pinv((n - 1) * s + np.trace(s) * np.eye(d))
    w_np = mus @ precision
    b_np = np.log(1.0 / c) - 0.5 * np.einsum("kd,de,ke->k", mus, precision, mus)
    w, b = fit_gda(torch.tensor(x, dtype=torch.float32), torch.tensor(y), c)
    assert np.allclose(w.numpy(), w_np, rtol=1e-4, atol=1e-4)
    assert np.allclose(b.numpy(), b_np, rtol=1e-4, atol=1e-4)


def test_class_without_examples_uses_fallback_mean() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 2])
    fallback = torch.tensor([[9.0, 9.0], [0.5, -0.5], [9.0, 9.0]])
    means = class_means(x, y, 3, fallback)
    assert torch.allclose(means, torch.tensor([[0.5, 0.5], [0.5, -0.5], [1.0, 1.0]]))


def test_alpha_cross_validation_prefers_gda_when_zero_shot_is_wrong() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = torch.eye(3, 8) * 3
    y = torch.arange(60) % 3
    x = torch.nn.functional.normalize(centers[y] + 0.3 * torch.randn(60, 8, generator=gen), dim=-1)
    wrong = torch.nn.functional.one_hot((y + 1) % 3, 3).float() * 5  # zero-shot always off by one
    alpha, acc = choose_alpha(x, y, torch.arange(60), wrong, 3, None)
    assert alpha > ALPHA_GRID[2] and acc > 0.9 and alpha in ALPHA_GRID
    right = torch.nn.functional.one_hot(y, 3).float() * 5
    alpha, acc = choose_alpha(x, y, torch.arange(60), right, 3, None)
    assert alpha == ALPHA_GRID[0] and acc == 1.0  # ties go to the smallest alpha, as in the repo


def test_feedback_fits_and_unknown_label_is_client_error(tiny_clip) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    image = _images(1)[0]
    assert "fallback" in engine.predict(image, method="gda").extra
    with pytest.raises(BadRequest) as err:
        engine.feedback(image, "zebra", "gda")
    assert err.value.code == "unknown_label"
    for i, img in enumerate(_images(9, seed=1)):
        reply = engine.feedback(img, LABELS[i % 3], "gda")
    assert reply["support_total"] == 9 and reply["refit_ms"] > 0
    summary = engine.state_summary("gda")
    assert summary["fitted"] and summary["support"]["entries_per_class"] == {"cat": 3, "dog": 3, "car": 3}
    assert summary["feedback_total"] == 9
    assert "fallback" not in engine.predict(image, method="gda").extra


def test_feedback_on_a_method_without_it_is_client_error(tiny_clip) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    with pytest.raises(BadRequest):
        engine.feedback(_images(1)[0], "cat", "tda")


def test_support_bounded_under_ten_times_capacity(tiny_clip) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS),
                    method_defaults={"gda": {"support_per_class": 2, "max_entries": 5}})
    for i, img in enumerate(_images(10 * 5, seed=2)):
        engine.feedback(img, LABELS[i % 3], "gda")
        summary = engine.state_summary("gda")
        assert summary["support"]["total"] <= 5
        assert all(n <= 2 for n in summary["support"]["entries_per_class"].values())


def test_pseudo_labels_bounded_and_used(tiny_clip) -> None:
    engine = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults={
        "gda": {"pseudo_labels": True, "pseudo_threshold": 0.0, "pseudo_per_class": 2, "refit_every": 3}})
    for img in _images(30, seed=3):
        engine.predict(img, method="gda")
    summary = engine.state_summary("gda")
    assert 2 <= summary["pseudo"]["total"] <= 6 and summary["fitted"]


def test_support_folder(tiny_clip, tmp_path: Path) -> None:
    for i, img in enumerate(_images(6, seed=4)):
        folder = tmp_path / LABELS[i % 3]
        folder.mkdir(exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    summary = fit_support_folder(engine, tmp_path)
    assert summary["fitted"] and summary["support"]["total"] == 6
    (tmp_path / "zebra").mkdir()
    with pytest.raises(BadRequest):
        fit_support_folder(engine, tmp_path)


def test_export_import_round_trip_gives_identical_predictions(tiny_clip) -> None:
    a = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults={"gda": {"pseudo_labels": True,
                                                                           "pseudo_threshold": 0.0}})
    for i, img in enumerate(_images(6, seed=5)):
        a.feedback(img, LABELS[i % 3], "gda")
    b = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults={"gda": {"pseudo_labels": True,
                                                                           "pseudo_threshold": 0.0}})
    b.import_state("gda", a.export_state("gda"))
    for img in _images(4, seed=6):
        assert torch.allclose(a.predict(img, method="gda").probs, b.predict(img, method="gda").probs, atol=1e-6)


def test_alpha_choice_does_not_depend_on_how_long_cross_validation_took(tiny_clip, monkeypatch) -> None:
    """A slow or loaded CPU must pick the same alpha: the rerun rule counts examples, not milliseconds."""
    import types

    from tta.methods import gda as gda_module

    def fed(clock) -> Engine:
        if clock is not None:
            monkeypatch.setattr(gda_module, "time", clock)
        engine = Engine(tiny_clip, LabelSet.create(LABELS))
        for i, img in enumerate(_images(30, seed=3)):
            engine.feedback(img, LABELS[i % 3], "gda")
        monkeypatch.undo()
        return engine

    ticks = iter(range(0, 10**9, 10))  # every perf_counter() call 10 s later: each CV "costs" 10 s
    slow = fed(types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    fast = fed(None)
    probe = _images(3, seed=4)
    for img in probe:
        assert torch.equal(slow.predict(img, method="gda").probs, fast.predict(img, method="gda").probs)
