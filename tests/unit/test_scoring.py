"""The pure functions against hand-computed cases."""

from __future__ import annotations

import math

import torch

from tta.scoring import entropy, marginal_entropy, n_confident, select_confident


def test_entropy_of_uniform_and_one_hot_rows():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    values = entropy(logits)
    assert math.isclose(values[0].item(), math.log(4), rel_tol=1e-6)
    assert values[1].item() < 1e-6


def test_marginal_entropy_is_entropy_of_mean_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    mean_p = logits.softmax(-1).mean(0)
    expected = -(mean_p * mean_p.log()).sum()
    assert torch.allclose(marginal_entropy(logits), expected, atol=1e-6)


def test_select_confident_keeps_int_fraction_lowest_entropy():
    logits = torch.tensor([[0.0, 0.0], [5.0, 0.0], [1.0, 0.0], [9.0, 0.0], [0.1, 0.0]])
    assert select_confident(logits, 0.4).tolist() == [3, 1]
    assert n_confident(64, 0.1) == 6 and n_confident(64, 0.3) == 19 and n_confident(3, 0.1) == 1
