"""TFUP / TFUP-T: Training-Free Unsupervised Prompt (Long et al., 2024, arXiv 2404.16339; repo
wlb12345/TFUP, `main.py`, `utils.py`).

TFUP builds a Tip-Adapter-style feature cache from *unlabelled* target images: for each class,
take the 2 * shots images with the highest confidence p_i = softmax(10 f T^T)_i, keep the `shots`
of them whose predictions are closest to the others (smallest sum of KL(p_j || p_m) over the
candidates: the class "prototype"), with the class as pseudo-label. A test feature's affinity to a
cache key is feature-level (cosine) times semantic-level (KL between their predictions, min-max
scaled to [0, 2]); logits = scale * f T^T + alpha * exp(-beta (1 - A)) V with alpha 0.3, beta 1.
shots = clamp(int(N * 0.3 / C), 9, 16). The zero-shot term uses the repo's constant 100 (OpenAI
CLIP's own scale; option `logit_scale`, 0 = the model's), so alpha keeps its meaning.

The paper is transductive (the whole target set is encoded first). As an online server method it
keeps a bounded buffer of recent request features (per zero-shot class FIFO, `buffer_per_class`,
and `buffer_size` in total) and rebuilds the cache from that buffer every `rebuild_every`
requests, once the buffer holds `min_buffer` features (default: enough for the paper's rule to
reach 9 shots per class unclamped, capped by the buffer size). Until then it answers zero-shot.
A rebuild is one vectorised selection (C x 2*shots x C), done on the request that triggers it.

TFUP-T (`tfup-t`) adds the paper's learnable parts: a per-class residual on the text classifier
(mixed with ratio 0.5) and a bottleneck MLP image adapter (d -> d/4 -> d, mixed with ratio 0.2),
trained with AdamW (lr 1e-3 here, weight decay 0.1). Differences from the paper: training happens
periodically (every `train_every` requests, `train_steps` full-batch steps on the buffered features,
bounded), not 30 offline epochs; the first round is the paper's warm-up (cross-entropy on a
refined pseudo-labelled subset, shots = max(9, int(N * 0.75 / C))), later rounds use the main loss
(cross-entropy on predictions with TFUP confidence > 0.9 plus 0.3 x the negative marginal entropy);
there are no weak/strong image augmentations (only features are buffered, so both are the same
feature); no model selection on test labels. The optimiser's moments are not snapshotted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tta.features import encode_images, original_view
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, check, register
from tta.state import ClassQueues, StreamStateMixin
from tta.state.schema import Int, ListOf, Maybe, Opts, Record, Tensor, class_index, unit_rows

log = logging.getLogger(__name__)

SELECTION_SCALE = 10.0  # the repo's temperature for selection and semantic similarity
MAX_WEIGHT = 1e4  # adapter weights and text residuals beyond this are not from training (AdamW, lr <= 1)


@dataclass(frozen=True)
class TFUPOptions(MethodOptions):
    """Defaults of the TFUP repository (alpha 0.3, beta 1, cache proportion 0.3, 9-16 shots)."""

    alpha: float = 0.3
    beta: float = 1.0
    cache_proportion: float = 0.3
    min_shots: int = 9
    max_shots: int = 16
    buffer_size: int = 4096
    buffer_per_class: int = 512
    rebuild_every: int = 16
    min_buffer: int | None = None
    logit_scale: float = 100.0  # the repo's constant; 0 = the model's own

    def scale(self, model_scale: float) -> float:
        return self.logit_scale if self.logit_scale > 0 else model_scale

    def validate(self) -> None:
        check(0.0 <= self.logit_scale <= 1000.0, "logit_scale must be in [0, 1000] (0: the model's own)")
        check(0.0 <= self.alpha <= 100.0, "alpha must be in [0, 100]")
        check(0.0 <= self.beta <= 100.0, "beta must be in [0, 100]")
        check(0.0 < self.cache_proportion <= 1.0, "cache_proportion must be in (0, 1]")
        check(1 <= self.min_shots <= self.max_shots <= 256, "need 1 <= min_shots <= max_shots <= 256")
        check(2 <= self.buffer_size <= 200_000, "buffer_size must be in [2, 200000]")
        check(1 <= self.buffer_per_class <= 200_000, "buffer_per_class must be in [1, 200000]")
        check(1 <= self.rebuild_every <= 100_000, "rebuild_every must be in [1, 100000]")
        check(self.min_buffer is None or 1 <= self.min_buffer <= 200_000, "min_buffer must be in [1, 200000]")


@dataclass(frozen=True)
class TFUPTOptions(TFUPOptions):
    """TFUP plus the adapters' fine-tuning (ratios 0.2 / 0.5, confidence 0.9, marginal weight 0.3)."""

    ratio_alpha: float = 0.2
    ratio_beta: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 0.1
    train_every: int = 64
    train_steps: int = 20
    confidence: float = 0.9
    marginal_weight: float = 0.3
    training_proportion: float = 0.75

    def validate(self) -> None:
        super().validate()
        check(0.0 <= self.ratio_alpha <= 1.0 and 0.0 <= self.ratio_beta <= 1.0, "ratios must be in [0, 1]")
        check(0.0 <= self.lr <= 1.0, "lr must be in [0, 1]")
        check(0.0 <= self.weight_decay <= 10.0, "weight_decay must be in [0, 10]")
        check(1 <= self.train_every <= 100_000, "train_every must be in [1, 100000]")
        check(0 <= self.train_steps <= 1000, "train_steps must be in [0, 1000]")
        check(0.0 <= self.confidence <= 1.0, "confidence must be in [0, 1]")
        check(0.0 <= self.marginal_weight <= 10.0, "marginal_weight must be in [0, 10]")
        check(0.0 < self.training_proportion <= 1.0, "training_proportion must be in (0, 1]")


def cache_shots(n_features: int, n_classes: int, proportion: float, low: int, high: int) -> int:
    """The repo's rule: clamp(int(N * proportion / C), low, high)."""
    return min(high, max(low, int(n_features * proportion / n_classes)))


def select_prototypes(probs: torch.Tensor, shots: int) -> torch.Tensor:
    """TFUP's selection: [C, k] indices into `probs` [N, C].

    Per class i: the top 2*shots samples by p[:, i]; among them the `shots` with the smallest
    sum over candidates m of KL(p_j || p_m) (ties: the more confident first, as `sort` keeps the
    confidence order). sum_m KL(p_j||p_m) = M * sum_c p_jc log p_jc - sum_c p_jc * sum_m log p_mc.
    """
    n, n_classes = probs.shape
    n_cand = min(2 * shots, n)
    keep = min(shots, n_cand)
    cand = probs.t().topk(n_cand, dim=1).indices  # [C, M] by confidence, descending
    p = probs[cand]  # [C, M, C]
    log_p = p.clamp_min(1e-30).log()
    self_term = (p * log_p).sum(-1)  # [C, M]
    cross = torch.einsum("imc,ic->im", p, log_p.sum(1))  # sum_c p_jc * sum_m log p_mc
    kl_sum = n_cand * self_term - cross
    order = torch.sort(kl_sum, dim=1, stable=True).indices[:, :keep]
    return torch.gather(cand, 1, order)


def semantic_similarity(query_probs: torch.Tensor, key_log_probs: torch.Tensor) -> torch.Tensor:
    """[N, M] in [0, 2]: 2 * (1 - minmax(z(KL(q || p_key)))) per query row; 1 when undefined."""
    q = query_probs.clamp_min(1e-30)
    kl = (q * q.log()).sum(-1, keepdim=True) - q @ key_log_probs.t()  # [N, M]
    if kl.shape[1] < 2:
        return torch.ones_like(kl)
    z = (kl - kl.mean(1, keepdim=True)) / kl.std(1, keepdim=True).clamp_min(1e-12)
    lo, hi = z.min(1, keepdim=True).values, z.max(1, keepdim=True).values
    span = hi - lo
    sim = 2.0 * (1.0 - (z - lo) / span.clamp_min(1e-12))
    return torch.where(span > 1e-12, sim, torch.ones_like(sim))


def tfup_cache_logits(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, text: torch.Tensor,
                      key_log_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta (1 - R * sim)) V for features [N, d]; keys normalised [M, d]; values one-hot [M, C]."""
    feature_level = features @ keys.t()
    query_probs = (SELECTION_SCALE * features @ text.t()).softmax(-1)
    sim = semantic_similarity(query_probs, key_log_probs)
    return torch.exp(-beta * (1.0 - feature_level * sim)) @ values


class ImageAdapter(torch.nn.Module):
    """TFUP-T's residual bottleneck MLP (d -> d/4 -> d, ReLUs, no bias)."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc = torch.nn.Sequential(torch.nn.Linear(dim, hidden, bias=False), torch.nn.ReLU(),
                                      torch.nn.Linear(hidden, dim, bias=False), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@register
class TFUP(StreamStateMixin, Method):
    name = "tfup"
    scope = "stream"
    Options = TFUPOptions
    description = "cache of confident, prototypical past requests (pseudo-labelled); forward only"
    batch_encoding = "original"
    state_version = 1

    def __init__(self, clip, defaults=None) -> None:  # noqa: ANN001 (signature of Method)
        super().__init__(clip, defaults)
        opts: TFUPOptions = self.defaults  # type: ignore[assignment]
        self.buffer = ClassQueues(opts.buffer_per_class, opts.buffer_size, "fifo")
        self._cache: dict[str, torch.Tensor] | None = None
        self.requests = 0
        self._since_rebuild = 0
        self.rebuilds = 0
        self.last_rebuild_ms = 0.0
        self._extra_init()
        self._init_stream()

    def _extra_init(self) -> None:
        """Hook for TFUP-T's adapters."""

    # --- state ----------------------------------------------------------------------------
    def _export_state(self) -> dict[str, Any]:
        cache = None if self._cache is None else {k: v.cpu() for k, v in self._cache.items()}
        return {"buffer": self.buffer.state_dict(), "cache": cache,
                "counters": [self.requests, self._since_rebuild, self.rebuilds]}

    def _import_state(self, state: Any) -> None:
        self.buffer.load_state_dict(state["buffer"])
        cache = state.get("cache")
        self._cache = None if cache is None else {k: v.to(self.clip.device) for k, v in cache.items()}
        self.requests, self._since_rebuild, self.rebuilds = (int(v) for v in state.get("counters", [0, 0, 0]))

    def _state_schema(self) -> Record:
        cache = Record(keys=unit_rows(("m", "d")), classes=class_index(("m",)), shots=Tensor((), "int64", low=1, high=257),
                       checks=(_cache_layout,))
        return Record(buffer=self.buffer.schema(score_high=0.0), cache=Maybe(cache),
                      counters=ListOf(Int(low=0), length=3), checks=(_counters_consistent,))

    def _op_schemas(self) -> dict[str, Record]:
        return {"observe": Record(cls=class_index(), feature=unit_rows(("d",)), opts=Opts(self.defaults))}

    def _clear_state(self) -> None:
        self.buffer.clear()
        self._cache = None
        self.requests = self._since_rebuild = self.rebuilds = 0

    def _summary(self) -> dict[str, Any]:
        cache: dict[str, Any] = {"total": 0}
        if self._cache is not None:
            counts = torch.bincount(self._cache["classes"].cpu(), minlength=len(self._names or ())).tolist()
            names = self._names or tuple(str(i) for i in range(len(counts)))
            cache = {"entries_per_class": {names[i]: n for i, n in enumerate(counts) if n},
                     "shots": int(self._cache["shots"]), "total": int(self._cache["classes"].numel())}
        return {"buffer": self.buffer.summary(self._names), "cache": cache, "requests": self.requests,
                "rebuilds": self.rebuilds, "last_rebuild_ms": round(self.last_rebuild_ms, 3),
                "total": len(self.buffer) + cache["total"]}

    # --- cache ----------------------------------------------------------------------------
    def min_buffer(self, opts: TFUPOptions, n_classes: int) -> int:
        if opts.min_buffer is not None:
            return opts.min_buffer
        return min(opts.buffer_size, math.ceil(opts.min_shots * n_classes / opts.cache_proportion))

    def rebuild(self, text: torch.Tensor, opts: TFUPOptions) -> None:
        """Select the cache from the buffer (TFUP's rule); timed."""
        start = time.perf_counter()
        feats, _, _ = self.buffer.stacked(text.device)
        n_classes = text.shape[0]
        shots = cache_shots(feats.shape[0], n_classes, opts.cache_proportion, opts.min_shots, opts.max_shots)
        probs = (SELECTION_SCALE * feats @ text.t()).softmax(-1)
        chosen = select_prototypes(probs, shots)  # [C, k]
        classes = torch.arange(n_classes, device=text.device).repeat_interleave(chosen.shape[1])
        self._cache = {"keys": F.normalize(feats[chosen.reshape(-1)], dim=-1), "classes": classes,
                       "shots": torch.tensor(chosen.shape[1])}
        self._since_rebuild = 0
        self.rebuilds += 1
        self.last_rebuild_ms = (time.perf_counter() - start) * 1000.0

    def _text(self, text: torch.Tensor) -> torch.Tensor:
        """The classifier used for logits and semantic similarity (TFUP-T adapts it)."""
        return text

    def _image(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def logits(self, features: torch.Tensor, text: torch.Tensor, opts: TFUPOptions) -> torch.Tensor:
        """scale * f T^T + alpha * cache logits (zero-shot while there is no cache)."""
        text_used = self._text(text)
        feats = self._image(features)
        out = opts.scale(self.clip.logit_scale) * feats @ text_used.t()
        if self._cache is None:
            return out
        keys = self._cache["keys"]
        values = F.one_hot(self._cache["classes"], text.shape[0]).to(feats.dtype)
        key_log_probs = (SELECTION_SCALE * keys @ text_used.t()).log_softmax(-1)
        return out + opts.alpha * tfup_cache_logits(feats, keys, values, text_used, key_log_probs, opts.beta)

    def _after_update(self, text: torch.Tensor, opts: TFUPOptions) -> None:
        """Hook: TFUP-T trains here."""

    def predict(self, request: MethodInput) -> MethodOutput:
        opts: TFUPOptions = request.options  # type: ignore[assignment]
        clip = self.clip
        with request.timer.stage("encode"):
            feats = encode_images(clip, original_view(clip, request.image))
        text = request.text_features
        zs_logits = clip.logit_scale * feats[0] @ text.t()
        zeroshot = zs_logits.softmax(-1)
        if not request.is_default_labels:
            return MethodOutput(probs=zeroshot, zeroshot_probs=zeroshot, image_features=feats[0],
                                extra={"fallback": f"{self.name} keeps state for the deployment's labels only"})
        self._last_text = text
        with request.timer.stage("adapt"), torch.no_grad():
            self._bind_labels(request.labels.names)
            trained = getattr(self, "trained_rounds", 0)
            op = {"kind": "observe", "cls": int(zs_logits.argmax()), "feature": feats[0].detach().float().cpu(),
                  "opts": self._opts_delta(opts)}
            available = self.host.commit(op)
            logits = self.logits(feats, text, opts)[0]
            cached = self._cache is not None
        if getattr(self, "trained_rounds", 0) != trained:
            request.timer.add("train", self.last_train_ms)  # type: ignore[attr-defined]
        extra: dict[str, Any] = {} if cached else {"fallback": f"{self.name} cache not built yet; zero-shot"}
        if not cached:  # nothing adapted yet (training needs a cache): exactly zero-shot
            logits = zs_logits
        return MethodOutput(probs=logits.softmax(-1), zeroshot_probs=zeroshot, image_features=feats[0],
                            extra=self._flag(extra, available))

    def _apply_op(self, op: Any) -> None:
        """One request's feature joins the buffer; the cache is rebuilt (and TFUP-T trained) on schedule."""
        if op["kind"] != "observe":
            raise ValueError(f"{self.name} has no operation {op['kind']!r}")
        opts: TFUPOptions = self._options(op)
        self.buffer.offer(op["cls"], op["feature"])
        self.requests += 1
        self._since_rebuild += 1
        text = self._deployment_text()
        if text is None:  # library use before any request bound a classifier: rebuild later
            return
        with torch.no_grad():
            ready = len(self.buffer) >= self.min_buffer(opts, text.shape[0])
            if ready and (self._cache is None or self._since_rebuild >= opts.rebuild_every):
                self.rebuild(text, opts)
            self._after_update(text, opts)


def _cache_layout(cache: Any, dims: dict[str, int]) -> str | None:
    """A rebuilt cache holds `shots` entries of every class, in class order (`TFUP.rebuild`)."""
    if "C" not in dims:  # library use before any label set is bound: nothing to compare with
        return None
    shots, classes, n_classes = int(cache["shots"]), cache["classes"], dims["C"]
    if not torch.equal(classes, torch.arange(n_classes).repeat_interleave(shots)):
        return f"classes must be each of the {n_classes} classes {shots} times (shots), in order"
    return None


def _counters_consistent(state: Any, dims: dict[str, int]) -> str | None:
    requests, since_rebuild, rebuilds = state["counters"]
    if since_rebuild > requests or rebuilds > requests:
        return "counters must be [requests, since_rebuild <= requests, rebuilds <= requests]"
    return None


def marginal_loss(logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy of the batch-mean prediction (minimising it spreads predictions over classes)."""
    mean = logits.softmax(-1).mean(0)
    return (mean * torch.log(mean + 1e-6)).sum()


@register
class TFUPT(TFUP):
    name = "tfup-t"
    scope = "stream"
    Options = TFUPTOptions
    description = "TFUP plus periodically trained text/image adapters (bounded steps on buffered features)"
    state_version = 1

    def _extra_init(self) -> None:
        self._new_adapters()

    def _new_adapters(self) -> None:
        dim = int(self.clip.embed_dim)
        with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG is untouched
            torch.manual_seed(0)
            self.image_adapter = ImageAdapter(dim).to(self.clip.device)
        self.text_residual: torch.Tensor | None = None
        self.trained_rounds = 0
        self.last_train_ms = 0.0
        self.last_loss: float | None = None
        self._since_train = 0
        self._optimizer: torch.optim.Optimizer | None = None

    def _export_state(self) -> dict[str, Any]:
        out = super()._export_state()
        out["adapters"] = {"image": {k: v.cpu() for k, v in self.image_adapter.state_dict().items()},
                           "text_residual": None if self.text_residual is None else self.text_residual.detach().cpu(),
                           "rounds": self.trained_rounds, "since_train": self._since_train}
        return out

    def _import_state(self, state: Any) -> None:
        super()._import_state(state)
        adapters = state["adapters"]
        self.image_adapter.load_state_dict(adapters["image"])
        residual = adapters.get("text_residual")
        self.text_residual = None if residual is None else residual.to(self.clip.device)
        self.trained_rounds = int(adapters.get("rounds", 0))
        self._since_train = int(adapters.get("since_train", 0))
        self._optimizer = None

    def _state_schema(self) -> Record:
        base = super()._state_schema()
        image = Record({"fc.0.weight": Tensor(("h", "d"), max_abs=MAX_WEIGHT),
                        "fc.2.weight": Tensor(("d", "h"), max_abs=MAX_WEIGHT)})
        adapters = Record(image=image, text_residual=Maybe(Tensor(("C", "d"), max_abs=MAX_WEIGHT)),
                          rounds=Int(low=0), since_train=Int(low=0))
        return Record({**base.fields, "adapters": adapters}, optional=base.optional, checks=base.checks)

    def _schema_dims(self) -> dict[str, int]:
        return {**super()._schema_dims(), "h": max(1, int(self.clip.embed_dim) // 4)}  # ImageAdapter's width

    def _clear_state(self) -> None:
        super()._clear_state()
        self._new_adapters()

    def _summary(self) -> dict[str, Any]:
        out = super()._summary()
        out["adapters"] = {"trained_rounds": self.trained_rounds, "last_train_ms": round(self.last_train_ms, 3),
                           "last_loss": self.last_loss}
        return out

    def _text(self, text: torch.Tensor) -> torch.Tensor:
        if self.trained_rounds == 0 or self.text_residual is None:
            return text
        opts: TFUPTOptions = self.defaults  # type: ignore[assignment]
        return F.normalize((1 - opts.ratio_beta) * text + opts.ratio_beta * self.text_residual, dim=-1)

    def _image(self, features: torch.Tensor) -> torch.Tensor:
        if self.trained_rounds == 0:
            return features
        opts: TFUPTOptions = self.defaults  # type: ignore[assignment]
        mixed = opts.ratio_alpha * self.image_adapter(features) + (1 - opts.ratio_alpha) * features
        return F.normalize(mixed, dim=-1)

    def _after_update(self, text: torch.Tensor, opts: TFUPOptions) -> None:
        topts: TFUPTOptions = opts  # type: ignore[assignment]
        self._since_train += 1
        if self._cache is None or topts.train_steps == 0 or self._since_train < topts.train_every:
            return
        self.train_round(text, topts)

    def train_round(self, text: torch.Tensor, opts: TFUPTOptions) -> None:
        """One bounded round: warm-up (refined pseudo-labels) first, then the main loss."""
        start = time.perf_counter()
        feats, _, _ = self.buffer.stacked(text.device)
        n_classes = text.shape[0]
        shape: TFUPTOptions = self.defaults  # type: ignore[assignment]  # mixing ratios shape the state
        opts = dataclasses.replace(opts, ratio_alpha=shape.ratio_alpha, ratio_beta=shape.ratio_beta)
        if self.text_residual is None:
            self.text_residual = torch.zeros_like(text)
        residual = self.text_residual.clone().requires_grad_(True)
        params = [residual, *self.image_adapter.parameters()]
        optimizer = torch.optim.AdamW(params, lr=opts.lr, eps=0.003, weight_decay=opts.weight_decay)
        if self._optimizer is not None:
            try:
                optimizer.load_state_dict(self._optimizer.state_dict())
            except (ValueError, KeyError):
                pass
        scale = opts.scale(self.clip.logit_scale)
        warmup = self.trained_rounds == 0
        if warmup:
            shots = max(opts.min_shots, int(feats.shape[0] * opts.training_proportion / n_classes))
            chosen = select_prototypes((SELECTION_SCALE * feats @ text.t()).softmax(-1), shots)
            x = feats[chosen.reshape(-1)]
            y = torch.arange(n_classes, device=text.device).repeat_interleave(chosen.shape[1])
        self.image_adapter.train()
        loss_value = None
        with torch.enable_grad():
            for _ in range(opts.train_steps):
                text_used = F.normalize((1 - opts.ratio_beta) * text + opts.ratio_beta * residual, dim=-1)
                if warmup:
                    adapted = F.normalize(opts.ratio_alpha * self.image_adapter(x) + (1 - opts.ratio_alpha) * x, dim=-1)
                    loss = F.cross_entropy(scale * adapted @ text_used.t(), y)
                else:
                    adapted = F.normalize(opts.ratio_alpha * self.image_adapter(feats)
                                          + (1 - opts.ratio_alpha) * feats, dim=-1)
                    logits = scale * adapted @ text_used.t()
                    assert self._cache is not None
                    keys = self._cache["keys"]
                    values = F.one_hot(self._cache["classes"], n_classes).to(feats.dtype)
                    key_log_probs = (SELECTION_SCALE * keys @ text_used.t()).log_softmax(-1)
                    weak = logits + opts.alpha * tfup_cache_logits(adapted, keys, values, text_used,
                                                                   key_log_probs, opts.beta)
                    probs = weak.detach().softmax(-1)
                    confident = probs.max(-1).values > opts.confidence
                    loss = opts.marginal_weight * marginal_loss(logits)
                    if confident.any():
                        loss = loss + F.cross_entropy(logits[confident], probs.argmax(-1)[confident])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_value = float(loss.detach())
        self.image_adapter.eval()
        self.text_residual = residual.detach()
        self._optimizer = optimizer
        self.trained_rounds += 1
        self._since_train = 0
        self.last_loss = loss_value
        self.last_train_ms = (time.perf_counter() - start) * 1000.0
        log.debug("tfup-t round %d (%s) in %.1f ms, loss %s", self.trained_rounds, "warm-up" if warmup else "main",
                  self.last_train_ms, loss_value)
