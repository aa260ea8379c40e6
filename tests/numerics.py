"""Tolerances derived from the computation, not from what one CPU printed.

Floating-point error model (Higham & Mary, "A new approach to probabilistic rounding error
analysis", SIAM J. Sci. Comput. 2019): a sum of n rounded products carries an error of at most
``lam * sqrt(n) * u * sum|a_i b_i|`` with probability >= 1 - 2 exp(-lam^2 / 2), where u is the unit
roundoff of the dtype (2^-24 for fp32, 2^-53 for fp64). A different CPU, thread count or BLAS
blocking changes the order of the sums, i.e. which rounding errors occur, not this bound.

`rounding_bound(reference, dtype, n)` is that bound with the magnitude taken as max|reference|
and n the number of terms that feed one output element (`TEXT_FORWARD_TERMS` etc. below count
them for open_clip towers). lam = 6 keeps the chance that any of a few thousand elements crosses
it below 1e-4 under the model; the measured errors sit 30-50x below it (docs/portability.md),
while any real bug (a wrong mask, token or position) moves outputs by O(magnitude).
"""

from __future__ import annotations

import copy
import math

import torch

LAM = 6.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def rounding_bound(reference: torch.Tensor, dtype: torch.dtype, terms: int, lam: float = LAM) -> float:
    """Absolute error bound for a `dtype` computation of `reference` whose elements each sum `terms` products."""
    return lam * math.sqrt(terms) * unit_roundoff(dtype) * float(reference.detach().abs().max())


def transformer_terms(layers: int, width: int, tokens: int) -> int:
    """Products feeding one output of a pre-LN transformer: per layer attention over `tokens` keys and
    width-long q/k/v/out projections (4 x width) and a 4x-wide MLP (4 x width + 4 x width)."""
    return layers * (tokens + 12 * width)


def text_forward_terms(clip) -> int:
    model = clip.model
    return transformer_terms(model.transformer.layers, model.transformer.width, model.context_length) + clip.embed_dim


def float64_copy(clip):
    """The same CLIP with float64 weights: the exact (to 1e-16) reference of an fp32 computation."""
    twin = copy.copy(clip)
    twin.model = copy.deepcopy(clip.model).double()
    return twin


def assert_within(actual: torch.Tensor, reference: torch.Tensor, bound: float, what: str) -> None:
    error = float((actual.detach().double() - reference.detach().double()).abs().max())
    assert error <= bound, f"{what}: max error {error:.3g} > bound {bound:.3g}"
