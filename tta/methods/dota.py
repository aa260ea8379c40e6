"""DOTA: Distributional Test-time Adaptation (Han et al., NeurIPS 2025, arXiv 2409.19375; repo
skylineeeeen/DOTA, `dota.py` at bc67d44).

Instead of a cache of a few samples, DOTA estimates one Gaussian per class from *every* test
sample, each weighted by its zero-shot probabilities (soft labels), and adds the Gaussian
discriminant to the zero-shot logits:

- state: class means mu_k (init 0.001 everywhere, as the repo does), soft counts c_k (init 1) and a
  covariance (init sigma * I); a sample x with zero-shot probabilities y updates, with the means
  *before* the update, mu_k <- (c_k mu_k + y_k x) / (c_k + y_k), c_k <- c_k + y_k, and the
  covariance with y_k (x - mu_k)(x - mu_k)^T;
- precision: Lambda = inv((1 - epsilon) Sigma + epsilon I);
- scores: s_k = x Lambda mu_k - mu_k Lambda mu_k / 2; logits = clip_logits + w s with
  w = min(rho * mean(c) / k, eta) (k = views fitted per image): the weight grows as evidence
  accumulates, so the method starts as zero-shot CLIP;
- order: each sample is scored with the state *before* it, then fitted (the repo's loop).

Defaults are `configs/vit/imagenet.yaml` (epsilon 1e-4, sigma 0.002, eta 0.2, rho 0.005, one
view; the repo runs 64 AugMix views, 10 % most confident, on ImageNet-A/V2/R/S: `n_views=64`).

Differences from the repo, all deliberate:
- `covariance="pooled"` (default): the repo keeps one d x d covariance per class and uses their
  plain mean, C * d^2 floats of state (1 GiB for ImageNet at d=512), which a server cannot
  snapshot or replicate. Pooled keeps one scatter matrix and divides by the total count: the
  soft-count-weighted mean of the class covariances instead of the unweighted one (identical
  while all c_k are equal). `covariance="per_class"` is the repo's estimator, exact, allowed while
  C * d^2 <= `MAX_PER_CLASS_FLOATS`; `bench/check_originals.py` measures both against the repo.
- arithmetic in float32 with the precision inverted in float64; the repo casts the precision and
  the scores to float16 (its CUDA setting), which moves its logits by up to ~0.1.
- the zero-shot term uses `logit_scale` (100, the repo's constant; 0 = the model's), like TDA.
- requests with a label set other than the deployment's are answered zero-shot and leave the state
  alone; the state belongs to the deployment's labels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from tta.errors import BadRequest
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, check, register
from tta.scoring import select_confident
from tta.state import StreamStateMixin
from tta.state.schema import Int, Maybe, Record, Str, Tensor, unit_rows

log = logging.getLogger(__name__)

MAX_PER_CLASS_FLOATS = 1 << 26  # 256 MiB of float32 per-class covariances at most
PROB_TOLERANCE = 1e-4  # float32 softmax can exceed 1 by a few ulps
INIT_MEAN = 0.001  # the repo initialises every class mean to this constant, not to the text embedding


@dataclass(frozen=True)
class DOTAOptions(MethodOptions):
    """Defaults of DOTA's `configs/vit/imagenet.yaml` (single view)."""

    epsilon: float = 1e-4
    sigma: float = 0.002
    eta: float = 0.2
    rho: float = 0.005
    n_views: int = 1
    selection_p: float = 0.1
    augmix: bool = True
    covariance: Literal["pooled", "per_class"] = "pooled"
    logit_scale: float = 100.0  # the repo's constant; 0 = the model's own

    def scale(self, model_scale: float) -> float:
        return self.logit_scale if self.logit_scale > 0 else model_scale

    def validate(self) -> None:
        check(0.0 < self.epsilon < 1.0, "epsilon must be in (0, 1)")
        check(0.0 < self.sigma <= 10.0, "sigma must be in (0, 10]")
        check(0.0 <= self.eta <= 100.0, "eta must be in [0, 100]")
        check(0.0 <= self.rho <= 100.0, "rho must be in [0, 100]")
        check(1 <= self.n_views <= 512, "n_views must be in [1, 512]")
        check(0.0 < self.selection_p <= 1.0, "selection_p must be in (0, 1]")
        check(0.0 <= self.logit_scale <= 1000.0, "logit_scale must be in [0, 1000] (0: the model's own)")


def fit_step(mu: torch.Tensor, counts: torch.Tensor, cov: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             per_class: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DOTA update with a batch x [B, d] of soft labels y [B, C] (the repo's `fit`).

    `cov` is the per-class covariances [C, d, d] (`per_class`) or the pooled scatter
    sum_k c_k Sigma_k [d, d]. Returns the new (mu, counts, cov); the deviations use the old means.
    """
    weights = y.sum(0)  # [C]
    new_mu = (y.t() @ x + counts[:, None] * mu) / (weights[:, None] + counts[:, None])
    diff = x[:, None, :] - mu[None, :, :]  # [B, C, d]
    if per_class:
        delta = torch.einsum("bk,bki,bkj->kij", y, diff, diff)
        cov = (counts[:, None, None] * cov + delta) / (counts[:, None, None] + weights[:, None, None])
    else:
        weighted = (diff * y[:, :, None]).reshape(-1, diff.shape[-1])
        cov = cov + weighted.t() @ diff.reshape(-1, diff.shape[-1])
    return new_mu, counts + weights, cov


def shared_covariance(counts: torch.Tensor, cov: torch.Tensor, per_class: bool) -> torch.Tensor:
    """The covariance the precision is built from: mean of the class covariances, or pooled."""
    return cov.mean(0) if per_class else cov / counts.sum()


def precision_matrix(sigma: torch.Tensor, epsilon: float) -> torch.Tensor:
    """inv((1 - epsilon) Sigma + epsilon I), inverted in float64 (reference; `discriminant` avoids the inverse)."""
    d = sigma.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=sigma.device)
    return torch.linalg.inv((1.0 - epsilon) * sigma.double() + epsilon * eye).to(sigma.dtype)


def gaussian_scores(x: torch.Tensor, mu: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """s_k = x Lambda mu_k - mu_k Lambda mu_k / 2 for x [N, d] -> [N, C] (the repo's `predict`)."""
    weights = mu @ precision  # [C, d] (Lambda is symmetric)
    return x @ weights.t() - 0.5 * (weights * mu).sum(-1)


def discriminant(mu: torch.Tensor, sigma: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [C, d], b [C]) with W = mu Lambda and b = -mu_k Lambda mu_k / 2, so s = x W^T + b equals
    `gaussian_scores` with Lambda = inv((1 - epsilon) Sigma + epsilon I); one float64 Cholesky
    solve instead of the inverse (3x cheaper at d = 512)."""
    d = sigma.shape[-1]
    matrix = (1.0 - epsilon) * sigma.double() + epsilon * torch.eye(d, dtype=torch.float64, device=sigma.device)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        weights = torch.cholesky_solve(mu.double().t(), factor).t()
    else:  # not positive definite (cannot happen for a covariance + epsilon I): least squares
        weights = torch.linalg.lstsq(matrix, mu.double().t()).solution.t()
    return weights.to(mu.dtype), (-0.5 * (weights * mu.double()).sum(-1)).to(mu.dtype)


def fusion_weight(counts: torch.Tensor, n_fitted: int, rho: float, eta: float) -> float:
    """min(rho * mean(c) / k, eta): little weight on the Gaussians until evidence accumulates."""
    return min(rho * float(counts.mean()) / max(n_fitted, 1), eta)


@register
class DOTA(StreamStateMixin, Method):
    name = "dota"
    scope = "stream"
    Options = DOTAOptions
    description = "online Gaussian discriminant over all test samples (zero-shot soft labels) + zero-shot; forward only"
    batch_encoding = "views"
    state_version = 1
    val_grid: ClassVar[Mapping[str, tuple[Any, ...]]] = {"rho": (0.005, 0.01, 0.02), "eta": (0.1, 0.2, 0.3)}

    def __init__(self, clip, defaults=None) -> None:  # noqa: ANN001 (signature of Method)
        super().__init__(clip, defaults)
        self.mu: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.cov: torch.Tensor | None = None
        self.samples = 0
        self._head: tuple[float, torch.Tensor, torch.Tensor] | None = None  # (epsilon, W, b) of the current state
        self._init_stream()

    # --- state ----------------------------------------------------------------------------
    @property
    def _per_class(self) -> bool:
        return self.defaults.covariance == "per_class"  # type: ignore[attr-defined]

    def _init_tensors(self, n_classes: int) -> None:
        d = int(self.clip.embed_dim)
        opts: DOTAOptions = self.defaults  # type: ignore[assignment]
        if self._per_class and n_classes * d * d > MAX_PER_CLASS_FLOATS:
            raise BadRequest(f"dota covariance='per_class' needs {n_classes} x {d} x {d} floats, more than "
                             f"{MAX_PER_CLASS_FLOATS}; use covariance='pooled'", code="bad_options")
        self.mu = torch.full((n_classes, d), INIT_MEAN)
        self.counts = torch.ones(n_classes)
        eye = opts.sigma * torch.eye(d)
        self.cov = eye.repeat(n_classes, 1, 1) if self._per_class else n_classes * eye
        self._head = None

    def _export_state(self) -> dict[str, Any]:
        return {"mu": self.mu, "counts": self.counts, "cov": self.cov, "samples": self.samples,
                "covariance": self.defaults.covariance}  # type: ignore[attr-defined]

    def _state_schema(self) -> Record:
        cov = ("C", "d", "d") if self._per_class else ("d", "d")
        return Record(mu=Maybe(unit_rows(("C", "d"))), counts=Maybe(Tensor(("C",), low=1.0)),
                      cov=Maybe(Tensor(cov, max_abs=1e9)), samples=Int(low=0),
                      covariance=Str(("pooled", "per_class")))

    def _op_schemas(self) -> dict[str, Record]:
        return {"fit": Record(x=unit_rows(("k", "d")), y=Tensor(("k", "C"), low=0.0, high=1.0 + PROB_TOLERANCE))}

    def _import_state(self, state: Mapping[str, Any]) -> None:
        if state.get("mu") is None:
            return
        if state.get("covariance") != self.defaults.covariance:  # type: ignore[attr-defined]
            raise ValueError(f"state has covariance={state.get('covariance')!r}, this deployment "
                             f"{self.defaults.covariance!r}")  # type: ignore[attr-defined]
        mu, counts, cov = (torch.as_tensor(state[k]).float() for k in ("mu", "counts", "cov"))
        n_classes, d = mu.shape
        expected = (n_classes, d, d) if self._per_class else (d, d)
        if d != int(self.clip.embed_dim) or counts.shape != (n_classes,) or tuple(cov.shape) != expected:
            raise ValueError(f"dota state shapes {tuple(mu.shape)}, {tuple(counts.shape)}, {tuple(cov.shape)} "
                             f"do not fit C x {self.clip.embed_dim}")
        if not (torch.isfinite(mu).all() and torch.isfinite(cov).all() and torch.isfinite(counts).all()
                and bool((counts > 0).all())):
            raise ValueError("dota state has non-finite values or non-positive counts")
        self.mu, self.counts, self.cov = mu.clone(), counts.clone(), cov.clone()
        self.samples = int(state.get("samples", 0))
        self._head = None

    def _clear_state(self) -> None:
        self.mu = self.counts = self.cov = None
        self.samples = 0
        self._head = None

    def _summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.samples, "covariance": self.defaults.covariance}  # type: ignore[attr-defined]
        if self.counts is not None:
            out.update(mean_count=round(float(self.counts.mean()), 4), classes=int(self.counts.numel()),
                       state_floats=int(self.mu.numel() + self.counts.numel() + self.cov.numel()))  # type: ignore[union-attr]
        return out

    # --- operations -----------------------------------------------------------------------
    def update_op(self, feats: torch.Tensor, probs: torch.Tensor) -> dict[str, Any]:
        """One image: its fitted view features [k, d] and their zero-shot probabilities [k, C]."""
        return {"kind": "fit", "x": feats.detach().float().cpu(), "y": probs.detach().float().cpu()}

    def _apply_op(self, op: Mapping[str, Any]) -> None:
        if op["kind"] != "fit":
            raise ValueError(f"dota has no operation {op['kind']!r}")
        x, y = torch.as_tensor(op["x"]).float(), torch.as_tensor(op["y"]).float()
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != int(self.clip.embed_dim):
            raise ValueError(f"dota fit wants x [k, d] and y [k, C], got {tuple(x.shape)}, {tuple(y.shape)}")
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()) or bool((y < 0).any()):
            raise ValueError("dota fit has non-finite features or negative probabilities")
        if self.mu is None:
            self._init_tensors(y.shape[1])
        if y.shape[1] != self.mu.shape[0]:  # type: ignore[union-attr]
            raise ValueError(f"dota fit has {y.shape[1]} classes, the state {self.mu.shape[0]}")  # type: ignore[union-attr]
        self.mu, self.counts, self.cov = fit_step(self.mu, self.counts, self.cov, x, y, self._per_class)  # type: ignore[arg-type]
        self.samples += 1
        self._head = None

    def head(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) of the current state, solved once per change (on this replica's first read)."""
        assert self.mu is not None and self.counts is not None and self.cov is not None
        if self._head is None or self._head[0] != epsilon:
            sigma = shared_covariance(self.counts, self.cov, self._per_class)
            self._head = (epsilon, *discriminant(self.mu, sigma, epsilon))
        return self._head[1], self._head[2]

    def adapted_logits(self, feature: torch.Tensor, clip_logits: torch.Tensor, n_fitted: int,
                       opts: DOTAOptions) -> torch.Tensor:
        """clip_logits + w * Gaussian scores of the mean fitted feature, from the current state."""
        if self.mu is None:
            self._init_tensors(clip_logits.shape[-1])
        assert self.mu is not None and self.counts is not None
        device = feature.device
        weights, bias = self.head(opts.epsilon)
        scores = feature.float() @ weights.to(device).t() + bias.to(device)
        return clip_logits + fusion_weight(self.counts, n_fitted, opts.rho, opts.eta) * scores

    # --- compute --------------------------------------------------------------------------
    def predict(self, request: MethodInput) -> MethodOutput:
        opts: DOTAOptions = request.options  # type: ignore[assignment]
        if opts.covariance != self.defaults.covariance:  # type: ignore[attr-defined]
            raise BadRequest("dota's covariance is the deployment's (it shapes the state); a request cannot change it",
                             code="bad_options")
        feats = self.encode_views(request, opts)
        text = request.text_features
        logits = opts.scale(self.clip.logit_scale) * feats @ text.t()
        zeroshot = (self.clip.logit_scale * feats[0] @ text.t()).softmax(-1)
        if feats.shape[0] > 1:  # the repo fits every selected view, and scores their mean
            keep = select_confident(logits, opts.selection_p)
            feats, logits = feats[keep], logits[keep]
        clip_logits = logits.mean(0)
        if not request.is_default_labels:
            return MethodOutput(probs=clip_logits.softmax(-1), zeroshot_probs=zeroshot, image_features=feats.mean(0),
                                extra={"fallback": "dota keeps state for the deployment's labels only; zero-shot"})
        with request.timer.stage("adapt"):
            self._bind_labels(request.labels.names)
            available = self.host.sync()
            final = self.adapted_logits(feats.mean(0), clip_logits, feats.shape[0], opts)
            available = self.host.commit(self.update_op(feats, logits.softmax(-1))) and available
        extra = {"samples": self.samples}
        if math.isfinite(float(final.max())):
            probs = final.softmax(-1)
        else:  # cannot happen with a positive-definite precision; never answer NaN
            probs, extra["fallback"] = clip_logits.softmax(-1), "dota scores not finite; zero-shot"
        return MethodOutput(probs=probs, zeroshot_probs=zeroshot, image_features=feats.mean(0),
                            extra=self._flag(extra, available))
