"""Paired accuracy statistics for claims that must hold on any CPU.

Two classifiers scored on the same n images differ only on the discordant ones: b images only A
gets right, c only B gets right. The accuracy difference is (b - c) / n and, paired, its standard
error is sqrt(b + c - (b - c)^2 / n) / n <= sqrt(b + c) / n (McNemar's variance). A claim is stated
as a one-sided bound at a fixed z over the stated n, e.g. "A is no more than 5 points worse than B
at 99.9 % (z = 3.09)". A different CPU trains slightly different digits weights and flips a few
borderline images; a claim tested this way has a margin of several standard errors to absorb that,
where "A >= B" on the raw accuracies had none (0.6556 vs 0.6593 was one image in 270).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Z_99 = 2.326  # one-sided 99 %
Z_999 = 3.090  # one-sided 99.9 %


@dataclass(frozen=True)
class Paired:
    n: int
    a_only: int  # b: A right, B wrong
    b_only: int  # c: B right, A wrong

    @property
    def difference(self) -> float:
        return (self.a_only - self.b_only) / self.n

    def standard_error(self) -> float:
        discordant = self.a_only + self.b_only
        return math.sqrt(max(discordant - (self.a_only - self.b_only) ** 2 / self.n, 0.0)) / self.n

    def lower(self, z: float) -> float:
        """One-sided lower confidence bound of accuracy(A) - accuracy(B)."""
        return self.difference - z * self.standard_error()

    def __str__(self) -> str:
        return (f"n={self.n}, A-only {self.a_only}, B-only {self.b_only}, "
                f"difference {self.difference:+.4f} (se {self.standard_error():.4f})")


def paired(a_hits: torch.Tensor, b_hits: torch.Tensor) -> Paired:
    """From boolean per-image correctness of A and B on the same images."""
    a, b = a_hits.bool(), b_hits.bool()
    assert a.shape == b.shape and a.ndim == 1
    return Paired(n=len(a), a_only=int((a & ~b).sum()), b_only=int((b & ~a).sum()))


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2) (ties dropped)."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0
