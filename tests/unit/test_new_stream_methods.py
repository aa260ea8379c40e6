"""dota, boostadapter, dpe: each core update against hand-computed cases, plus the method-level
rules the contract suite cannot see (order of update and prediction, what is episodic)."""

from __future__ import annotations

import math

import pytest
import torch

from bench.feature_stream import FeatureDriver
from tta.methods.boostadapter import boosted_cache, boosting_views
from tta.methods.dota import discriminant, fit_step, fusion_weight, gaussian_scores, precision_matrix, shared_covariance
from tta.methods.dpe import evolve, info_nce, prototypes
from tta.state import ClassQueues

SIGMA = 0.5


# --- DOTA ---------------------------------------------------------------------------------
def test_dota_fit_step_per_class_by_hand():
    mu = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    counts = torch.ones(2)
    cov = SIGMA * torch.eye(2).repeat(2, 1, 1)
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    new_mu, new_counts, new_cov = fit_step(mu, counts, cov, x, y, per_class=True)
    assert torch.equal(new_mu, torch.tensor([[0.5, 0.0], [1.0, 1.0]]))  # (1 * 0 + 1 * x) / 2; class 1 untouched
    assert torch.equal(new_counts, torch.tensor([2.0, 1.0]))
    # class 0: (1 * sigma I + (x - mu_old)(x - mu_old)^T) / 2 with the *old* mean 0
    assert torch.allclose(new_cov[0], torch.tensor([[(SIGMA + 1.0) / 2, 0.0], [0.0, SIGMA / 2]]))
    assert torch.equal(new_cov[1], SIGMA * torch.eye(2))
    assert torch.allclose(shared_covariance(new_counts, new_cov, True), (new_cov[0] + new_cov[1]) / 2)


def test_dota_fit_step_pooled_by_hand():
    mu = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    counts = torch.ones(2)
    scatter = 2 * SIGMA * torch.eye(2)  # sum_k c_k Sigma_k at the start
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.75, 0.25]])
    _, new_counts, new_scatter = fit_step(mu, counts, scatter, x, y, per_class=False)
    # 0.75 * (1,0)(1,0)^T + 0.25 * (0,-1)(0,-1)^T added to the scatter
    expected = 2 * SIGMA * torch.eye(2) + torch.tensor([[0.75, 0.0], [0.0, 0.25]])
    assert torch.allclose(new_scatter, expected)
    assert torch.allclose(shared_covariance(new_counts, new_scatter, False), expected / 3.0)


def test_dota_scores_precision_and_weight_by_hand():
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    precision = 2.0 * torch.eye(2)
    scores = gaussian_scores(torch.tensor([[1.0, 0.0]]), mu, precision)
    assert torch.allclose(scores, torch.tensor([[2.0 - 1.0, 0.0 - 1.0]]))  # x L mu_k - mu_k L mu_k / 2
    sigma = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    assert torch.allclose(precision_matrix(sigma, 0.5), torch.diag(torch.tensor([1 / 1.5, 1 / 2.5])))
    assert fusion_weight(torch.tensor([3.0, 3.0]), 1, rho=0.1, eta=0.2) == 0.2  # capped at eta
    assert math.isclose(fusion_weight(torch.tensor([3.0, 3.0]), 2, rho=0.1, eta=1.0), 0.15)  # / views fitted


def _feature_stream(n: int, dim: int = 8, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    feats = torch.nn.functional.normalize(text[torch.arange(n) % classes] + 0.5 * torch.randn(n, dim, generator=gen), dim=-1)
    return text, feats


def test_dota_scores_each_sample_with_the_state_before_it():
    text, feats = _feature_stream(6)
    driver = FeatureDriver("dota", text, {"rho": 0.5, "eta": 10.0})
    first, _ = driver.predict(feats[:1])
    zeroshot = (100.0 * feats[0] @ text.t()).softmax(-1)
    assert torch.allclose(first, zeroshot, atol=1e-6)  # all means start equal: the Gaussian term is a constant
    for row in feats[1:]:
        driver.predict(row[None])
    method = driver.method
    assert method.samples == 6 and torch.allclose(method.counts.sum(), torch.tensor(3.0 + 6.0))
    expected = driver.method.adapted_logits(feats[0], 100.0 * feats[0] @ text.t(), 1, method.defaults).softmax(-1)
    again, _ = driver.predict(feats[:1])
    assert torch.allclose(again, expected, atol=1e-6)


def test_dota_per_class_refuses_what_it_cannot_hold():
    from tta.errors import BadRequest
    from tta.methods import dota

    text, feats = _feature_stream(1)
    driver = FeatureDriver("dota", text, {"covariance": "per_class"})
    old = dota.MAX_PER_CLASS_FLOATS
    dota.MAX_PER_CLASS_FLOATS = 3 * 8 * 8 - 1
    try:
        with pytest.raises(BadRequest, match="pooled"):
            driver.predict(feats[:1])
    finally:
        dota.MAX_PER_CLASS_FLOATS = old


# --- BoostAdapter ---------------------------------------------------------------------------
def test_boosting_views_follow_the_repo_rule():
    logits = torch.tensor([[0.0, 0.0]] * 9 + [[5.0, 0.0]])
    assert boosting_views(logits, 0.1).tolist() == [9]  # int(10 * 0.1) = 1: the most confident view
    assert boosting_views(logits[:1], 0.1).numel() == 0  # int(1 * 0.1) = 0: one view boosts nothing


def test_boosted_cache_by_hand():
    history = ClassQueues(3, 100, "lowest")
    for score in (0.5, 0.75, 0.875):
        history.offer(0, torch.full((2,), score), score)
    history.offer(2, torch.full((2,), 2.0), 2.0)
    boost = [(0, torch.full((2,), 0.625), 0.625), (0, torch.full((2,), 0.75), 0.75), (1, torch.full((2,), 1.5), 1.5)]
    keys, classes = boosted_cache(history, boost, capacity=3)
    got = sorted((int(c), float(k[0])) for k, c in zip(keys, classes, strict=True))
    # class 0: 0.625 replaces 0.875; 0.75 ties the worst kept history entry: not strictly lower, dropped
    assert got == [(0, 0.5), (0, 0.625), (0, 0.75), (1, 1.5), (2, 2.0)]
    assert len(history) == 4 and [e.score for e in history.entries(0)] == [0.5, 0.75, 0.875]  # history untouched
    keys, classes = boosted_cache(history, boost, capacity=5)  # room (pos_capacity + delta): all are kept
    assert sorted(float(k[0]) for k, c in zip(keys, classes, strict=True) if int(c) == 0) == [0.5, 0.625, 0.75, 0.75, 0.875]


def test_boostadapter_negative_cache_is_fifo_and_boosting_is_per_request():
    text, feats = _feature_stream(1, classes=3)
    driver = FeatureDriver("boostadapter", text, {"n_views": 1, "neg_entropy": [0.0, 10.0], "neg_capacity": 2})
    method = driver.method
    for i in range(3):  # three different features predicted as class 0 by a forced classifier
        feature = torch.nn.functional.normalize(text[0] + 0.1 * i * text[1], dim=-1)
        driver.predict(feature[None])
    entries = method.neg.entries(0)
    assert sorted(e.seq for e in entries) == [1, 2]  # the two newest of offers 0, 1, 2
    newest = torch.nn.functional.normalize(text[0] + 0.2 * text[1], dim=-1)
    assert torch.allclose(max(entries, key=lambda e: e.seq).key, newest)
    views = torch.cat([feats, torch.nn.functional.normalize(feats + 0.1, dim=-1).repeat(19, 1)])
    driver2 = FeatureDriver("boostadapter", text, {"n_views": 20, "infer_original": True})
    driver2.predict(views)
    assert len(driver2.method.pos) == 1  # only the history entry: the boosting views are not stored


# --- DPE ------------------------------------------------------------------------------------
def test_dpe_evolve_is_the_repos_running_average():
    text, adapted = torch.ones(2, 2), torch.zeros(2, 2)
    once, n = evolve(text, 0, adapted)
    assert n == 1 and torch.equal(once, torch.full((2, 2), 0.5))  # the zero-shot classifier counts as one
    twice, n = evolve(once, n, torch.full((2, 2), 2.0))
    assert n == 2 and torch.allclose(twice, torch.full((2, 2), 0.5 * 2 / 3 + 2.0 / 3))


def test_dpe_prototypes_and_info_nce_by_hand():
    cache = ClassQueues(3, 100, "lowest")
    cache.offer(1, torch.tensor([1.0, 0.0]), 0.1)
    cache.offer(1, torch.tensor([0.0, 1.0]), 0.2)
    cache.offer(0, torch.tensor([2.0, 2.0]), 0.3)
    keys, classes = prototypes(cache, "cpu")
    assert classes.tolist() == [0, 1] and torch.allclose(keys, torch.tensor([[2.0, 2.0], [0.5, 0.5]]))
    query, positive = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # row 0: logits (100, 100) -> log 2; row 1: logits (0, 0) -> log 2
    assert math.isclose(float(info_nce(query, positive)), math.log(2.0), rel_tol=1e-6)


def test_dpe_residual_is_episodic_and_zero_steps_is_cache_plus_zeroshot():
    from tta.methods.tda import cache_logits

    text, feats = _feature_stream(4)
    driver = FeatureDriver("dpe", text, {"n_views": 1, "steps": 0, "evolve_entropy": 0.0})
    for row in feats[:3]:
        driver.predict(row[None])
    method = driver.method
    assert set(method.state_dict()) == {"meta", "cache", "text", "evolved", "updates"}  # no residual, no optimizer
    probs, _ = driver.predict(feats[3:4])
    keys, classes = prototypes(method.cache, "cpu")
    onehot = torch.nn.functional.one_hot(classes, 3).float()
    expected = 100.0 * feats[3] @ text.t() + cache_logits(feats[3:4], torch.nn.functional.normalize(keys, dim=-1),
                                                          onehot, 6.0, 5.0)[0]
    assert torch.allclose(probs, expected.softmax(-1), atol=1e-6)
    assert method.text is None and method.evolved == 0


def test_dpe_one_step_moves_the_answer_and_confident_answers_evolve_the_prototypes():
    text, feats = _feature_stream(3)
    light = {"n_views": 1, "logit_scale": 5.0}  # an uncertain answer: the entropy has a gradient
    still = FeatureDriver("dpe", text, {**light, "steps": 0, "evolve_entropy": 0.0})
    moved = FeatureDriver("dpe", text, {**light, "steps": 1, "lr_text": 0.05, "lr_image": 0.05, "evolve_entropy": 1.0})
    for row in feats[:2]:
        p0, _ = still.predict(row[None])
        p1, extra = moved.predict(row[None])
    assert not torch.allclose(p0.log(), p1.log(), atol=1e-2)
    assert extra["evolved_now"] and moved.method.evolved == 2 and still.method.text is None
    # T <- T n/(n+1) + T'/(n+1) with T' the requests' normalised adapted prototypes: moved, rows within the unit ball
    assert moved.method.text is not None and not torch.allclose(moved.method.text, text)
    assert torch.all(moved.method.text.norm(dim=-1) <= 1.0 + 1e-6)


# --- feature input (Engine.predict_features) ---------------------------------------------------
@pytest.mark.parametrize("method", ["dota", "dpe", "boostadapter", "oga"])
def test_embeddings_answer_as_images_do_with_one_view(tiny_clip, method: str) -> None:
    """One view: the same answers and state from the original view's embedding as from the image;
    with views, dpe / boostadapter refuse an embedding before any state changes."""
    from tests.unit.test_feature_input import _assert_same_state, _embedding, _images
    from tta.engine import Engine
    from tta.errors import PixelsRequired
    from tta.text import LabelSet

    labels = LabelSet.create(["cat", "dog", "car", "cup"])
    defaults = {method: {"n_views": 1}} if method != "oga" else {}
    by_image, by_embedding = Engine(tiny_clip, labels, method_defaults=defaults), Engine(tiny_clip, labels, method_defaults=defaults)
    for image in _images(8):
        a = by_image.predict(image, method=method)
        b = by_embedding.predict_features(_embedding(tiny_clip, image), method=method)
        torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=0)
    _assert_same_state(by_image.export_state(method), by_embedding.export_state(method))
    if method not in ("dota", "oga"):
        before = by_embedding.export_state(method)
        with pytest.raises(PixelsRequired):
            by_embedding.predict_features(_embedding(tiny_clip, _images(1)[0]), method=method, options={"n_views": 8})
        _assert_same_state(before, by_embedding.export_state(method))


def test_dota_discriminant_equals_the_inverse_form():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=gen)
    sigma = a @ a.t() / 6
    mu, x = torch.randn(4, 6, generator=gen), torch.randn(5, 6, generator=gen)
    weights, bias = discriminant(mu, sigma, 0.01)
    reference = gaussian_scores(x, mu, precision_matrix(sigma, 0.01))
    # float32 scores of magnitude ~|x| |mu| / epsilon: compare relative to that magnitude
    torch.testing.assert_close(x @ weights.t() + bias, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


# --- auto's stream tier ------------------------------------------------------------------------
@pytest.mark.parametrize("method, defaults", [("dota", {}), ("dpe", {"n_views": 1}), ("boostadapter", {"n_views": 1}),
                                              ("oga", {})])
def test_auto_stream_tier_is_the_deployments_method(tiny_clip, sample_images, method: str, defaults: dict) -> None:
    """At gate 0 auto answers what the stream method answers, and updates the same state."""
    from tests.unit.test_feature_input import _assert_same_state
    from tta.engine import Engine
    from tta.text import LabelSet

    labels = LabelSet.create(["cat", "dog", "car", "rocket", "cup"])
    via_auto = Engine(tiny_clip, labels, default_method="auto",
                      method_defaults={"auto": {"tiers": f"{method},zero:4", "threshold": 0.0}, method: defaults})
    direct = Engine(tiny_clip, labels, default_method=method, method_defaults={method: defaults})
    for name, image in sample_images.items():
        a, d = via_auto.predict(image), direct.predict(image)
        assert a.extra["tier"] == method and a.extra["encoded_images"] == 1, name
        torch.testing.assert_close(a.probs, d.probs, atol=1e-6, rtol=0)
    _assert_same_state(via_auto.export_state(method), direct.export_state(method))


def test_auto_refuses_a_multi_view_or_unknown_stream_tier(tiny_clip, sample_images) -> None:
    from tta.engine import Engine
    from tta.errors import BadRequest
    from tta.text import LabelSet

    engine = Engine(tiny_clip, LabelSet.create(["cat", "dog", "car"]), default_method="auto")
    with pytest.raises(BadRequest, match="original view only"):  # dpe's deployment default: 64 views
        engine.predict(sample_images["chelsea"], options={"tiers": "dpe,zero:4", "threshold": 0.0})
    for bad in ("dota:4", "nosuch,zero:4", "rlcf"):
        with pytest.raises(BadRequest):
            engine.predict(sample_images["chelsea"], options={"tiers": bad})
