"""Admission: what one request may cost, and by when it must be answered.

A request's options are range-checked by its method, but ranges alone let one request cost
minutes (512 views x 16 steps over 1,000 new labels). TorchServe restarts a worker whose batch
runs past its response timeout, failing every request of the batch and dropping in-process
state. So before running, the engine *estimates* a request's work in encoder passes and refuses
what exceeds the deployment's budget (a 4xx naming the limit); and every request carries a
*deadline* below the worker timeout, checked between the stages of the multi-view methods,
past which the answer is the zero-shot prediction flagged ``"fallback": "deadline"``.

Cost units (documented in docs/reliability.md):
- one image-encoder pass of one view = 1 unit (forward; a forward + backward counts 3);
- one text-encoder pass of one prompt = ``text_weight`` units (default 0.25: CLIP's text tower
  on <= 77 tokens costs about a quarter of a ViT-B/16 image pass on 197 tokens);
- one denoising step for one generated view (DiffTPT) = ``generation_weight`` units.

Every limit is a deployment setting: the ``tta:`` section of model-config.yaml
(``max_request_cost``, ``deadline_ms``, ...) or the environment (``TTA_MAX_REQUEST_COST``,
``TTA_DEADLINE_MS``, ...), the environment winning so a Kubernetes overlay can change them
without rebuilding the archive.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from tta.errors import BadRequest

DEFAULT_MAX_REQUEST_COST = 8192.0  # admits every method's paper defaults over 1,000 classes
DEFAULT_DEADLINE_MS = 60_000.0  # half of TorchServe's default 120 s response timeout
DEFAULT_RESPONSE_TIMEOUT_S = 120.0  # TorchServe's default_response_timeout
DEADLINE_FRACTION = 0.75  # a deadline must leave a quarter of the worker timeout for fallbacks + batch peers
MIN_DEADLINE_MS = 1.0
DEADLINE_HEADER = "x-tta-deadline-ms"
DEADLINE_FIELD = "deadline_ms"


@dataclass(frozen=True)
class Cost:
    """A request's estimated work, by kind; `units` weighs them into one number."""

    image_passes: float = 0.0
    text_passes: float = 0.0
    generation_steps: float = 0.0

    def units(self, budget: Budget) -> float:
        return (self.image_passes + budget.text_weight * self.text_passes
                + budget.generation_weight * self.generation_steps)

    def describe(self) -> str:
        parts = [f"{self.image_passes:g} image-encoder passes", f"{self.text_passes:g} text-encoder passes"]
        if self.generation_steps:
            parts.append(f"{self.generation_steps:g} denoising steps")
        return ", ".join(parts)


@dataclass(frozen=True)
class Budget:
    """Per-deployment admission limits (see the module docstring for the units)."""

    max_request_cost: float = DEFAULT_MAX_REQUEST_COST
    deadline_ms: float = DEFAULT_DEADLINE_MS
    text_weight: float = 0.25
    generation_weight: float = 1.0

    ENV = {"max_request_cost": "TTA_MAX_REQUEST_COST", "deadline_ms": "TTA_DEADLINE_MS",
           "text_weight": "TTA_COST_TEXT_WEIGHT", "generation_weight": "TTA_COST_GENERATION_WEIGHT"}

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None,
                    environ: Mapping[str, str] | None = None) -> Budget:
        """The `tta:` config section's keys, overridden by their environment variables."""
        config = config or {}
        environ = os.environ if environ is None else environ
        values: dict[str, float] = {}
        for f in fields(cls):
            raw = environ.get(cls.ENV[f.name]) or config.get(f.name)
            if raw in (None, ""):
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"{f.name} must be a number, got {raw!r}") from None
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{f.name} must be a positive finite number, got {raw!r}")
            values[f.name] = value
        return cls(**values)

    @classmethod
    def for_worker(cls, config: Mapping[str, Any] | None, response_timeout_s: float | None,
                   environ: Mapping[str, str] | None = None) -> Budget:
        """The budget of a worker with this response timeout: an unset deadline defaults to the
        smaller of 60 s and half the timeout; a configured one must fit (`check_timeout`)."""
        environ = os.environ if environ is None else environ
        budget = cls.from_config(config, environ)
        if not (environ.get(cls.ENV["deadline_ms"]) or (config or {}).get("deadline_ms")):
            timeout_ms = 1000.0 * float(response_timeout_s or DEFAULT_RESPONSE_TIMEOUT_S)
            budget = replace(budget, deadline_ms=min(budget.deadline_ms, 0.5 * timeout_ms))
        budget.check_timeout(response_timeout_s)
        return budget

    def check_timeout(self, response_timeout_s: float | None) -> None:
        """Refuse to start when the deadline would not leave the worker time to answer.

        TorchServe's timeout covers a whole batch, whose requests run one after another: every
        request of a batch gets the same absolute deadline (batch start + deadline), and the
        remaining quarter of the timeout is for the zero-shot fallbacks of late requests.
        """
        timeout_ms = 1000.0 * float(response_timeout_s or DEFAULT_RESPONSE_TIMEOUT_S)
        if self.deadline_ms > DEADLINE_FRACTION * timeout_ms:
            raise ValueError(
                f"deadline_ms {self.deadline_ms:g} must be at most {DEADLINE_FRACTION:g} x the worker response "
                f"timeout ({timeout_ms / 1000:g} s = {DEADLINE_FRACTION * timeout_ms:g} ms): lower deadline_ms "
                f"(TTA_DEADLINE_MS) or raise responseTimeout / default_response_timeout")

    def admit(self, cost: Cost) -> float:
        """The cost in units, or `BadRequest` (code over_budget, a 4xx) naming the limit that refused it."""
        units = cost.units(self)
        if units > self.max_request_cost:
            raise BadRequest(
                f"request too expensive: estimated {units:.0f} cost units ({cost.describe()}) > max_request_cost "
                f"{self.max_request_cost:g} of this deployment; lower n_views, steps, the number of labels or "
                f"generated views", code="over_budget")
        return units

    def deadline(self, requested_ms: Any = None, start: float | None = None) -> float:
        """Absolute `time.monotonic()` deadline: the deployment's, or a lower one the request asked for."""
        ms = self.deadline_ms
        if requested_ms is not None:
            ms = min(ms, parse_deadline_ms(requested_ms))
        return (time.monotonic() if start is None else start) + ms / 1000.0


def parse_deadline_ms(value: Any) -> float:
    """A per-request deadline (JSON number or header string) in ms, or `BadRequest`."""
    if isinstance(value, bool):
        raise BadRequest("deadline_ms must be a number of milliseconds", code="bad_deadline")
    try:
        ms = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, AttributeError):
        raise BadRequest(f"deadline_ms must be a number of milliseconds, got {value!r:.40}",
                         code="bad_deadline") from None
    if not math.isfinite(ms) or ms < MIN_DEADLINE_MS:
        raise BadRequest(f"deadline_ms must be a finite number >= {MIN_DEADLINE_MS:g}, got {value!r:.40}",
                         code="bad_deadline")
    return ms


def estimate(options: Any, n_classes: int, new_text_prompts: int = 0) -> Cost:
    """Work of one request from its method options (duck-typed on the option names every
    method shares: n_views, steps, n_ctx, variant, selection_p, n_generated, diffusion_steps).

    - every method encodes `n_views` views once (zero-shot: 1);
    - prompt tuning (an `n_ctx` option, not RLCF's image variant) runs the text encoder over all
      classes forward + backward (3 passes) per step, plus the initial and final forwards;
    - RLCF's image variant runs the image encoder forward + backward on the selected views per
      step; RLCF also encodes the selected views with its reward model;
    - DiffTPT encodes its generated views and denoises each for `diffusion_steps`;
    - a label set not yet cached costs one text pass per class and template (`new_text_prompts`).
    """
    n_views = max(1, int(getattr(options, "n_views", 1) or 1))
    steps = max(0, int(getattr(options, "steps", 0) or 0))
    image = float(n_views)
    text = float(new_text_prompts)
    generation = 0.0
    selected = math.ceil(n_views * float(getattr(options, "selection_p", 1.0) or 1.0))
    variant = getattr(options, "variant", None)
    if hasattr(options, "sample_k"):  # RLCF: the reward model encodes the selected views
        image += selected
    if variant == "image":
        image += 3.0 * selected * steps + 1.0
    elif hasattr(options, "n_ctx"):
        text += float(n_classes) * (3.0 * steps + 2.0)
    if getattr(options, "generation", False):
        n_generated = int(getattr(options, "n_generated", 0) or 0)
        image += n_generated
        generation += float(n_generated) * int(getattr(options, "diffusion_steps", 0) or 0)
    return Cost(image_passes=image, text_passes=text, generation_steps=generation)


def remaining_ms(deadline: float | None) -> float | None:
    """Milliseconds left before `deadline` (negative when past), None without one."""
    return None if deadline is None else (deadline - time.monotonic()) * 1000.0
