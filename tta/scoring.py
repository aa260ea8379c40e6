"""Pure functions over logits shared by the methods: entropy, confident-view selection,
marginal entropy. Tested directly against hand-computed cases."""

from __future__ import annotations

import math

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy (nats) of each row of `logits` [..., C]."""
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def n_confident(n_views: int, fraction: float) -> int:
    """How many views a fraction keeps: int(n * p) as the papers do, but at least one."""
    return max(1, int(n_views * fraction))


def select_confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the `fraction` lowest-entropy views (TPT's `select_confident_samples`)."""
    k = n_confident(logits.shape[0], fraction)
    return torch.argsort(entropy(logits), descending=False)[:k]


def marginal_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log of the mean softmax over views, computed in log space (TPT's `avg_entropy`)."""
    log_p = logits.log_softmax(dim=-1)
    return torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the view-averaged prediction: the loss TPT minimises."""
    avg = marginal_log_probs(logits).clamp(min=torch.finfo(logits.dtype).min)
    return -(avg * avg.exp()).sum()
