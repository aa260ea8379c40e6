"""Faults a method can hit mid-request that end in a zero-shot answer instead of an error.

Multi-view methods call `check_deadline` between their stages and `check_step` after every
optimisation step. Either raises `ZeroShotFallback`; the engine catches it (the methods restore
their prompts / weights on the way out, as on any error), answers with plain zero-shot CLIP on
the original image and flags the response ``"fallback": <reason>``. The engine also handles an
out-of-memory error (fewer views, then zero-shot), answers zero-shot flagged ``state_invalid`` when
a stream method raises unexpectedly (its state, shared by every replica, must never turn into
5xx answers), and never lets a non-finite score out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch

DEADLINE = "deadline"
NUMERICAL = "numerical"
OOM = "oom"
STATE_INVALID = "state_invalid"  # a stream method raised while reading its state: zero-shot, detail to the log
DIVERGENCE_FACTOR = 1e4  # a step whose |loss| grows past this multiple of the first step's diverged


class ZeroShotFallback(Exception):
    """Stop adapting this request and answer zero-shot; `reason` goes into the response."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def deadline_passed(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def check_deadline(deadline: float | None, stage: str) -> None:
    """Between stages: past the request's deadline, give up adapting (zero-shot answer)."""
    if deadline_passed(deadline):
        raise ZeroShotFallback(DEADLINE, f"deadline passed before {stage}")


def check_step(loss: torch.Tensor, params: Iterable[torch.Tensor], first_loss: float | None,
               step: int) -> float:
    """After an optimisation step: a non-finite loss or parameter, or a loss that grew by
    `DIVERGENCE_FACTOR`, is a numerical fault. Returns the first step's loss for later calls."""
    value = float(loss.detach().float())
    if not math.isfinite(value):
        raise ZeroShotFallback(NUMERICAL, f"non-finite loss at step {step}")
    finite = [torch.isfinite(p.detach()).all() for p in params]  # one device sync for all, not one each
    if finite and not bool(torch.stack(finite).all()):
        raise ZeroShotFallback(NUMERICAL, f"non-finite parameters after step {step}")
    if first_loss is None:
        return value
    if abs(value) > DIVERGENCE_FACTOR * max(abs(first_loss), 1e-3):
        raise ZeroShotFallback(NUMERICAL, f"diverging loss at step {step}: {value:.3g} from {first_loss:.3g}")
    return first_loss


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM (torch.OutOfMemoryError) or an allocator failure reported as a RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
