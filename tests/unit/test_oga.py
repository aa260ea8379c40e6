"""OGA: its memory rule, means, precision and MAP answer against hand-computed cases, and the
order the repo's loop uses (store the request, then answer it from the updated memory)."""

from __future__ import annotations

import math

import torch

from bench.feature_stream import FeatureDriver
from tta.methods.oga import class_means, entropy, precision_times


def _stream(n: int, dim: int = 8, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    feats = torch.nn.functional.normalize(text[torch.arange(n) % classes] + 0.5 * torch.randn(n, dim, generator=gen), dim=-1)
    return text, feats


def _op(x: torch.Tensor, probs: list[float]) -> dict:
    return {"kind": "store", "x": torch.nn.functional.normalize(x, dim=0), "probs": torch.tensor(probs)}


def test_memory_keeps_the_most_confident_per_class_by_hand():
    text, _ = _stream(1, dim=4, classes=2)
    driver = FeatureDriver("oga", text, {"shot_capacity": 2})
    oga = driver.method
    oga._bind_labels(("class 0", "class 1"))
    host = oga.host
    e = torch.eye(4)
    host.commit(_op(e[0], [0.9, 0.1]))  # class 0, entropy H(0.9, 0.1): slot 0 (every empty slot holds ln 2)
    host.commit(_op(e[1], [0.6, 0.4]))  # class 0, less confident: the other empty slot
    assert oga.occupied.tolist() == [[True, True], [False, False]]
    assert torch.equal(oga.memory[0], e[:2])
    host.commit(_op(e[2], [0.8, 0.2]))  # more confident than slot 1 (the least confident): replaces it
    assert torch.equal(oga.memory[0], torch.stack([e[0], e[2]]))
    assert math.isclose(float(oga.soft[0, 1]), 0.8, rel_tol=1e-6)
    host.commit(_op(e[3], [0.7, 0.3]))  # less confident than both stored: not kept
    assert torch.equal(oga.memory[0], torch.stack([e[0], e[2]]))
    h = float(entropy(torch.tensor([0.8, 0.2], dtype=torch.float64)))
    assert math.isclose(float(oga.slot_entropy[0, 1]), h, rel_tol=1e-6)
    assert math.isclose(float(oga.slot_entropy[1, 0]), math.log(2), rel_tol=1e-6)  # class 1 still empty
    assert (oga.samples, oga.stored) == (4, 3)
    driver.close()


def test_means_are_the_repos_sum_over_capacity_from_two_samples():
    memory = torch.zeros(2, 4, 2)
    occupied = torch.zeros(2, 4, dtype=torch.bool)
    memory[0, :2], occupied[0, :2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), True
    memory[1, 0], occupied[1, 0] = torch.tensor([1.0, 0.0]), True
    text = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    mus = class_means(memory, occupied, text, normalize=False)
    assert torch.equal(mus[0], torch.tensor([0.25, 0.25]))  # (1, 1) / 4 slots, empty ones as zeros
    assert torch.equal(mus[1], text[1])  # one sample: still the text embedding
    normalised = class_means(memory, occupied, text, normalize=True)
    assert torch.allclose(normalised[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_precision_is_d_identity_until_a_class_holds_three_then_the_ridge_estimate():
    d = 3
    gen = torch.Generator().manual_seed(1)
    memory = torch.nn.functional.normalize(torch.randn(2, 4, d, generator=gen), dim=-1)
    occupied = torch.zeros(2, 4, dtype=torch.bool)
    occupied[0, :2] = occupied[1, :2] = True
    memory[~occupied] = 0
    mus = torch.randn(2, d, generator=gen)
    assert torch.equal(precision_times(mus, memory, occupied, "ridge_moore_penrose"), d * mus.double())
    occupied[0, 2] = True  # class 0 now holds 3
    memory[0, 2] = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    m64, mu64 = memory.double(), mus.double()
    x = torch.cat([m64[0, :3] - mu64[0], m64[1, :2] - mu64[1]])  # stored minus their class mean
    centred = x - x.mean(0)
    n = x.shape[0]
    m = centred.t() @ centred / (n - 1)
    ridge = d * torch.linalg.inv((n - 1) * m + torch.trace(m) * torch.eye(d, dtype=torch.float64))
    torch.testing.assert_close(precision_times(mus, memory, occupied, "ridge_moore_penrose"), mus.double() @ ridge)
    torch.testing.assert_close(precision_times(mus, memory, occupied, "ridge"), mus.double() @ ridge)
    # n = 5 > 4 d = 12 is false, so only "moore_penrose" takes the pseudo-inverse here
    torch.testing.assert_close(precision_times(mus, memory, occupied, "moore_penrose"),
                               mus.double() @ torch.linalg.pinv(m, hermitian=True))


def test_first_answer_is_the_map_with_text_means_and_precision_d_identity():
    """One request into an empty memory: it is stored (class means are still the text, Lambda = d I),
    so log N(x | t_k) = d x.t_k - d/2 + const and z ~ prior_k exp(tau d x.t_k)."""
    text, feats = _stream(1, dim=8, classes=3)
    driver = FeatureDriver("oga", text, {})
    answer, _ = driver.predict(feats[:1])
    x = feats[0].double()
    prior = (100.0 * x @ text.double().t()).softmax(-1)
    z = prior * torch.exp(0.05 * 8 * (x @ text.double().t()))
    torch.testing.assert_close(answer.double(), z / z.sum(), atol=1e-6, rtol=0)
    assert (driver.method.samples, driver.method.stored) == (1, 1)
    driver.close()


def test_each_request_is_stored_before_it_is_answered():
    text, feats = _stream(12)
    driver = FeatureDriver("oga", text, {"shot_capacity": 4})
    for row in feats[:-1]:
        driver.predict(row[None])
    oga = driver.method
    answer, _ = driver.predict(feats[-1:])
    # the same memory, asked again without storing: the answer the request got
    x = feats[-1]
    prior = (100.0 * x.double() @ text.double().t()).softmax(-1)
    torch.testing.assert_close(answer.double(), oga.map_probs(x, prior, text, oga.defaults), atol=1e-6, rtol=0)
    assert oga.samples == 12 and int(oga.occupied.sum()) <= 3 * 4
    driver.close()
