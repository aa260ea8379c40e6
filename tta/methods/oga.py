"""OGA: Online Gaussian Adaptation (Fuchs, Zanella and De Vleeschouwer, 2025, arXiv 2501.04352,
"Online Gaussian Adaptation of Vision-Language Models"; repo cfuchs2023/OGA, `OGA/OGA_core.py`
and `runner.py` at b91d449).

A cache of the most confident test samples per zero-shot class models the class-conditional
likelihood of the features as Gaussians with one shared covariance; the answer is a
pseudo-Bayesian maximum a posteriori estimate with the zero-shot probabilities as prior:

- memory (stream state): `shot_capacity` slots per class (8). A sample with zero-shot
  probabilities y (scale 100) and entropy H(y) goes to class argmax y, replacing the slot of
  highest entropy if H(y) is lower (empty slots hold ln C, so the first samples always enter);
- means: mu_k = sum of class k's stored features / `shot_capacity` once it holds 2 or more (the
  repo's `torch.mean` over all slots, empty ones counting as zeros), else its text embedding;
- covariance (`estimator="ridge_moore_penrose"`, the repo's recommended default): once some class
  holds 3 or more, M = the covariance of the centred stored features (n of them); precision
  d * inv((n - 1) M + tr(M) I) (empirical-Bayes ridge) while n <= 4d, else pinv(M); before that,
  d * I. `"ridge"` always uses the ridge form, `"moore_penrose"` always pinv(M);
- answer: z = y * softmax(tau * log N(x | mu_k, Sigma)), normalised (tau 0.05); the
  class-independent term -x Lambda x / 2 cancels in the softmax and is not computed;
- order: each request is stored first, then answered from the updated memory (the repo's loop).

Defaults: the repo's `main.py` (tau 0.05, shot capacity 8, RidgeMoorePenrose, no mean
normalisation), one setting for every dataset, as the paper advocates; so `val_grid` is empty and
an evaluation chooses nothing. No augmented views (the paper uses none).

Differences from the repo, all deliberate:
- one request at a time: the repo's benchmark stores and answers batches of 32; a server answers
  each request as it comes (batch 1, as the other stream methods here);
- float32 memory (the repo's is float16, its CUDA setting); the precision in float64 by a
  Cholesky solve where the repo takes a float32 `pinv` of the same positive-definite matrix
  (identical up to rounding); pinv(M) in float64 with the float32 cut-off (d x eps32), so singular
  values the repo drops are dropped here too;
- the zero-shot prior uses `logit_scale` (100, the repo's constant; 0 = the model's), like TDA;
- requests with a label set other than the deployment's are answered zero-shot and change nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from tta.errors import BadRequest
from tta.features import encode_images, original_view
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, check, register
from tta.state import StreamStateMixin
from tta.state.schema import Int, Maybe, Record, Tensor, unit_rows

MAX_MEMORY_FLOATS = 1 << 26  # 256 MiB of float32 memory at most (C x shot_capacity x d)
PROB_TOLERANCE = 1e-4  # float32 softmax can exceed 1 by a few ulps
PINV_RTOL = float(torch.finfo(torch.float32).eps)  # x d: torch's default cut-off for a float32 d x d pinv
ENTROPY_EPS = 1e-9  # the repo's runner: H(y) = -sum y log(y + 1e-9)
Estimator = Literal["ridge_moore_penrose", "ridge", "moore_penrose"]


@dataclass(frozen=True)
class OGAOptions(MethodOptions):
    """Defaults of the repo's `main.py`: one setting for every dataset."""

    tau: float = 0.05
    shot_capacity: int = 8
    estimator: Estimator = "ridge_moore_penrose"
    normalize_mu: bool = False
    logit_scale: float = 100.0  # the repo's zero-shot temperature; 0 = the model's own

    def scale(self, model_scale: float) -> float:
        return self.logit_scale if self.logit_scale > 0 else model_scale

    def validate(self) -> None:
        check(0.0 < self.tau <= 10.0, "tau must be in (0, 10]")
        check(1 <= self.shot_capacity <= 256, "shot_capacity must be in [1, 256]")
        check(0.0 <= self.logit_scale <= 1000.0, "logit_scale must be in [0, 1000] (0: the model's own)")


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the last axis, in nats, with the repo's 1e-9 inside the log."""
    return -(probs * (probs + ENTROPY_EPS).log()).sum(-1)


def class_means(memory: torch.Tensor, occupied: torch.Tensor, text: torch.Tensor, normalize: bool) -> torch.Tensor:
    """mu_k [C, d]: the stored features' sum / capacity where a class holds >= 2, else its text embedding."""
    capacity = memory.shape[1]
    means = (occupied[..., None] * memory).sum(1) / capacity
    ready = occupied.sum(1) >= 2
    mus = torch.where(ready[:, None], means, text.to(means.dtype))
    if normalize:
        mus = torch.where(ready[:, None], torch.nn.functional.normalize(mus, dim=-1), mus)
    return mus


def precision_times(mus: torch.Tensor, memory: torch.Tensor, occupied: torch.Tensor, estimator: Estimator
                    ) -> torch.Tensor:
    """mu Lambda [C, d] in float64, with Lambda the precision of the shared covariance."""
    d = memory.shape[-1]
    mus64 = mus.double()
    if not bool((occupied.sum(1) > 2).any()):
        return d * mus64  # Lambda = d I until a class holds 3 samples (the repo's initial inv_Sig)
    classes = occupied.nonzero()[:, 0]
    centred = memory[occupied].double() - mus64[classes]
    centred = centred - centred.mean(0, keepdim=True)
    n = centred.shape[0]
    m = centred.t() @ centred / (n - 1)
    if estimator == "moore_penrose" or (estimator == "ridge_moore_penrose" and n > 4 * d):
        # with n < d samples M is singular and pinv depends on its cut-off: the repo's float32 one
        return mus64 @ torch.linalg.pinv(m, rtol=PINV_RTOL * d, hermitian=True)
    ridge = (n - 1) * m + torch.trace(m) * torch.eye(d, dtype=torch.float64, device=m.device)
    factor, info = torch.linalg.cholesky_ex(ridge)
    if int(info) != 0:  # cannot happen for a covariance + a positive ridge; never fail a request on it
        return d * mus64 @ torch.linalg.pinv(ridge, hermitian=True)
    return d * torch.cholesky_solve(mus64.t(), factor).t()


@register
class OGA(StreamStateMixin, Method):
    name = "oga"
    scope = "stream"
    Options = OGAOptions
    description = "Gaussian likelihood of the most confident cached samples x zero-shot prior (MAP); forward only"
    batch_encoding = "original"
    state_version = 1
    val_grid: ClassVar[Mapping[str, tuple[Any, ...]]] = {}  # one setting for every dataset (the paper's claim)

    def __init__(self, clip, defaults=None) -> None:  # noqa: ANN001 (signature of Method)
        super().__init__(clip, defaults)
        self.memory: torch.Tensor | None = None  # [C, S, d] stored features (zeros where empty)
        self.slot_entropy: torch.Tensor | None = None  # [C, S] entropy of each slot (ln C where empty)
        self.occupied: torch.Tensor | None = None  # [C, S] bool
        self.soft: torch.Tensor | None = None  # [C, S] the stored sample's zero-shot probability of its class
        self.samples = 0
        self.stored = 0
        # (options key, the request's text tensor, its CPU copy, W, b) of the current memory
        self._head: tuple[tuple[str, bool], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._init_stream()

    # --- state ----------------------------------------------------------------------------
    @property
    def _capacity(self) -> int:
        return int(self.defaults.shot_capacity)  # type: ignore[attr-defined]

    def _init_tensors(self, n_classes: int) -> None:
        d = int(self.clip.embed_dim)
        if n_classes * self._capacity * d > MAX_MEMORY_FLOATS:
            raise BadRequest(f"oga memory of {n_classes} classes x {self._capacity} shots x {d} floats exceeds "
                             f"{MAX_MEMORY_FLOATS}; lower shot_capacity", code="bad_options")
        self.memory = torch.zeros(n_classes, self._capacity, d)
        self.slot_entropy = torch.full((n_classes, self._capacity), math.log(n_classes))
        self.occupied = torch.zeros(n_classes, self._capacity, dtype=torch.bool)
        self.soft = torch.zeros(n_classes, self._capacity)
        self._head = None

    def _export_state(self) -> dict[str, Any]:
        """Copies: `_apply_op` writes a slot in place, which must not reach an export already taken."""
        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.clone()

        return {"memory": copy(self.memory), "entropy": copy(self.slot_entropy), "occupied": copy(self.occupied),
                "soft": copy(self.soft), "samples": self.samples, "stored": self.stored}

    def _state_schema(self) -> Record:
        def consistent(state: Mapping[str, Any], dims: Mapping[str, int]) -> str | None:
            parts = [state.get(k) is None for k in ("memory", "entropy", "occupied", "soft")]
            if all(parts):
                return None
            if any(parts):
                return "memory, entropy, occupied and soft go together (all present or all absent)"
            occupied = state["occupied"]
            if occupied.shape[1] != self._capacity:
                return f"occupied has {occupied.shape[1]} slots per class, the deployment's shot_capacity {self._capacity}"
            if bool((state["memory"][~occupied] != 0).any()) or bool((state["soft"][~occupied] != 0).any()):
                return "empty slots must hold zeros"
            if int(state["stored"]) < int(occupied.sum()) or int(state["samples"]) < int(state["stored"]):
                return "counters must satisfy samples >= stored >= occupied slots"
            return None

        ln_classes = lambda dims: math.log(dims["C"]) * (1.0 + 1e-6) if "C" in dims else None  # noqa: E731
        return Record(memory=Maybe(unit_rows(("C", "S", "d"))),
                      entropy=Maybe(Tensor(("C", "S"), low=0.0, high=ln_classes)),
                      occupied=Maybe(Tensor(("C", "S"), "bool")),
                      soft=Maybe(Tensor(("C", "S"), low=0.0, high=1.0 + PROB_TOLERANCE)),
                      samples=Int(low=0), stored=Int(low=0), checks=(consistent,))

    def _op_schemas(self) -> dict[str, Record]:
        return {"store": Record(x=unit_rows(("d",)), probs=Tensor(("C",), low=0.0, high=1.0 + PROB_TOLERANCE))}

    def _import_state(self, state: Mapping[str, Any]) -> None:
        self.samples, self.stored = int(state.get("samples", 0)), int(state.get("stored", 0))
        self._head = None
        if state.get("memory") is None:
            self.memory = self.slot_entropy = self.occupied = self.soft = None
            return
        self.memory = torch.as_tensor(state["memory"]).float().clone()
        self.slot_entropy = torch.as_tensor(state["entropy"]).float().clone()
        self.occupied = torch.as_tensor(state["occupied"]).bool().clone()
        self.soft = torch.as_tensor(state["soft"]).float().clone()

    def _clear_state(self) -> None:
        self.memory = self.slot_entropy = self.occupied = self.soft = None
        self.samples = self.stored = 0
        self._head = None

    def _summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.samples, "stored": self.stored, "shot_capacity": self._capacity}
        if self.occupied is not None:
            per_class = self.occupied.sum(1)
            out.update(classes=int(per_class.numel()), occupied=int(per_class.sum()),
                       classes_with_mean=int((per_class >= 2).sum()))
        return out

    # --- operations -----------------------------------------------------------------------
    def update_op(self, feature: torch.Tensor, probs: torch.Tensor) -> dict[str, Any]:
        """One request: its original-view feature [d] and zero-shot probabilities [C]."""
        return {"kind": "store", "x": feature.detach().float().cpu(), "probs": probs.detach().float().cpu()}

    def _apply_op(self, op: Mapping[str, Any]) -> None:
        x, probs = torch.as_tensor(op["x"]).float(), torch.as_tensor(op["probs"]).float()
        if self.memory is None:
            self._init_tensors(probs.shape[0])
        assert self.memory is not None and self.slot_entropy is not None and self.occupied is not None
        assert self.soft is not None
        if probs.shape[0] != self.memory.shape[0]:
            raise ValueError(f"oga store has {probs.shape[0]} classes, the state {self.memory.shape[0]}")
        self.samples += 1
        label = int(probs.argmax())
        score = float(entropy(probs.double()))
        slot = int(self.slot_entropy[label].argmax())  # the least confident stored sample (first on ties)
        if score < float(self.slot_entropy[label, slot]):
            self.memory[label, slot] = x
            self.slot_entropy[label, slot] = score
            self.occupied[label, slot] = True
            self.soft[label, slot] = probs[label]
            self.stored += 1
            self._head = None

    def head(self, text: torch.Tensor, opts: OGAOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [C, d], b [C]) with log N(x | mu_k, Sigma) = x W_k^T + b_k + (a term equal for all k),
        solved once per change of the memory (on this replica's first read)."""
        assert self.memory is not None and self.occupied is not None
        key, cached = (opts.estimator, opts.normalize_mu), self._head
        # the deployment's text tensor is the same object request after request: no copy, no compare
        fresh = cached is not None and cached[0] == key and (
            cached[1] is text or torch.equal(cached[2], text.detach().float().cpu()))
        if not fresh:
            cpu_text = text.detach().float().cpu()
            mus = class_means(self.memory, self.occupied, cpu_text, opts.normalize_mu)
            weights = precision_times(mus, self.memory, self.occupied, opts.estimator)
            cached = self._head = (key, text, cpu_text, weights, -0.5 * (weights * mus.double()).sum(-1))
        assert cached is not None
        return cached[3], cached[4]

    def map_probs(self, feature: torch.Tensor, prior: torch.Tensor, text: torch.Tensor, opts: OGAOptions
                  ) -> torch.Tensor:
        """z = prior * softmax(tau * log-likelihood), normalised, in float64."""
        weights, bias = self.head(text, opts)
        log_likelihood = feature.double().cpu() @ weights.t() + bias
        z = prior.double().cpu() * (opts.tau * log_likelihood).softmax(-1)
        return z / z.sum()

    # --- compute --------------------------------------------------------------------------
    def predict(self, request: MethodInput) -> MethodOutput:
        opts: OGAOptions = request.options  # type: ignore[assignment]
        if opts.shot_capacity != self._capacity:
            raise BadRequest("oga's shot_capacity is the deployment's (it shapes the state); a request cannot change it",
                             code="bad_options")
        clip = self.clip
        with request.timer.stage("augment"):
            view = original_view(clip, request.image)
        with request.timer.stage("encode"):
            feature = encode_images(clip, view)[0]
        text = request.text_features
        prior = (opts.scale(clip.logit_scale) * feature.double() @ text.double().t()).softmax(-1)
        zeroshot = (clip.logit_scale * feature @ text.t()).softmax(-1)
        if not request.is_default_labels:
            return MethodOutput(probs=zeroshot, zeroshot_probs=zeroshot, image_features=feature,
                                extra={"fallback": "oga keeps state for the deployment's labels only; zero-shot"})
        with request.timer.stage("adapt"):
            self._bind_labels(request.labels.names)
            available = self.host.sync()
            available = self.host.commit(self.update_op(feature, prior.float())) and available
            if self.memory is None:
                self._init_tensors(text.shape[0])
            z = self.map_probs(feature, prior, text, opts)
        extra: dict[str, Any] = {"samples": self.samples, "stored": self.stored}
        if bool(torch.isfinite(z).all()) and float(z.sum()) > 0:
            probs = z.float().to(feature.device)
        else:  # a prior of exact zeros under an extreme scale; never answer NaN
            probs, extra["fallback"] = zeroshot, "oga posterior not finite; zero-shot"
        return MethodOutput(probs=probs, zeroshot_probs=zeroshot, image_features=feature,
                            extra=self._flag(extra, available))
