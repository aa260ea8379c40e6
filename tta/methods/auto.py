"""`auto`: pay for adaptation only where it helps.

Per request, run the cheapest tier first (zero-shot by default), answer at once when its
prediction is confident, otherwise escalate to the next tier (ZERO with a few views, then TPT)
while the request's latency budget allows. The TTA papers' own analyses find the gain on
low-confidence inputs; confident ones rarely change, so most requests can skip the 64-view cost.

- Tiers: ``tiers="zeroshot,zero:32,tpt:64"`` (``name[:views]``; names: zeroshot, zero, tpt, or
  a stream method), cheapest first. A stream tier (``tda``, ``dota``, ``dpe``, ``boostadapter``,
  ``tfup``, ``gda``: any registered stream method that declares its first views) runs the
  deployment's own instance (its defaults, its state, updated as a direct request would) on the
  original view's features: a stream method as the cheap first tier when the deployment has one.
  Its deployment defaults must be single-view (e.g. ``dpe`` with ``n_views=1``), else the tier is
  refused rather than silently encoding views. The last tier with the most views defines the view pool: every multi-view tier
  uses a prefix of the same seeded views, so with the gate at 1 the answer is the last tier's
  own answer for the same seed, and the views a lower tier encoded are reused by the next.
- Gate: a confidence in [0, 1] of the tier's probabilities: ``max_prob`` (top-1 probability),
  ``margin`` (top-1 minus top-2) or ``entropy`` (1 - entropy / log C). A tier answers when the
  confidence is >= ``threshold``; threshold 0 always answers at the first tier, threshold 1
  always escalates to the last. With ``temperature`` (fitted on a validation split by
  ``tta eval --features ... --calibrate``) the zero-shot tier's probabilities are
  softmax(logits / temperature): calibrated, so the threshold reads as a probability of being right.
- Budget: ``budget_ms`` (0 = none) and the request's deadline (`MethodInput.deadline`), both
  from the start of this method. A tier runs only if this worker's *measured* latency for it
  (an exponentially weighted mean per tier and label-set size) fits in what is left; a tier never
  measured yet is estimated from this request's first tier (per image x views, x3 for TPT's
  backward) until it has run once.
- Reuse: the original view's embedding (tier 0) is row 0 of every later tier, the class text
  features come from the engine's cache, and views already encoded are never encoded again.
- Optional online gate: ``target_rate`` > 0 moves this worker's threshold by ``rate_step`` x
  (target - escalated) after every request (a Robbins-Monro step towards the target escalation
  rate), clamped to [``threshold_min``, ``threshold_max``]. It is per worker and in memory
  (restarts from ``threshold``), so it only steers cost; calibrate ``threshold`` offline with
  ``tta eval DATA --methods auto --sweep``.

The response adds ``tier`` (which tier answered), ``escalated``, ``gate`` (kind, threshold,
the confidence after each tier run), ``stopped_by`` (confident | budget | last_tier) and
``encoded_images``; with ``trace`` also each tier's label, gate value and milliseconds (what
``tta eval --sweep`` replays to price every threshold from one run).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tta.errors import BadRequest
from tta.features import encode_images, original_view, precomputed_features, zeroshot_logits
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, check, register
from tta.methods.tpt import TPT, TPTOptions
from tta.methods.zero import ZeroOptions, zero_vote
from tta.views import ViewSpec, make_views

TIER_NAMES = ("zeroshot", "zero", "tpt")  # plus any stream method that runs on the original view
DEFAULT_VIEWS = {"zeroshot": 1, "zero": 64, "tpt": 64}
SINGLE_VIEW = ("zeroshot",)


def stream_tier(name: str) -> bool:
    """Whether `name` is a registered stream method that can run on the original view alone (its
    first views are declared: tda, dota, dpe, boostadapter, tfup, gda); single-view at run time."""
    from tta.methods.base import _REGISTRY, _ensure_loaded

    _ensure_loaded()
    cls = _REGISTRY.get(name)
    return cls is not None and cls.scope == "stream" and cls.batch_encoding in ("original", "views")
Gate = Literal["max_prob", "margin", "entropy"]
EWMA_WEIGHT = 0.3  # weight of the newest latency sample in the per-tier running mean
TPT_PRIOR_FACTOR = 3.0  # TPT's backward through the text encoder on top of its forward


@dataclass(frozen=True)
class Tier:
    name: str
    views: int

    @property
    def key(self) -> str:
        return self.name if self.single else f"{self.name}:{self.views}"

    @property
    def single(self) -> bool:
        return self.name in SINGLE_VIEW or self.stream

    @property
    def stream(self) -> bool:
        return self.name not in TIER_NAMES and stream_tier(self.name)


def parse_tiers(spec: str) -> tuple[Tier, ...]:
    """``"zeroshot,zero:16,tpt:64"`` -> tiers; raises ValueError with a reason."""
    tiers = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, views = part.partition(":")
        name = name.strip()
        stream = name not in TIER_NAMES and stream_tier(name)
        if name not in TIER_NAMES and not stream:
            raise ValueError(f"unknown tier '{name}' (known: {', '.join(TIER_NAMES)}, or a stream method "
                             "that runs on the original view, e.g. tda, dota)")
        n = (1 if stream else DEFAULT_VIEWS[name]) if not views else int(views)
        if (name in SINGLE_VIEW or stream) and n != 1:
            raise ValueError(f"{name} has exactly one view here (its deployment options apply)")
        if not 1 <= n <= 512:
            raise ValueError("views per tier must be in [1, 512]")
        tiers.append(Tier(name, n))
    if not tiers:
        raise ValueError("no tiers")
    return tuple(tiers)


@dataclass(frozen=True)
class AutoOptions(MethodOptions):
    """Escalation policy; defaults answer confident images zero-shot, the rest with ZERO/TPT."""

    tiers: str = "zeroshot,zero:32,tpt:64"
    gate: Gate = "max_prob"
    threshold: float = 0.6  # answer when the gate's confidence >= threshold (0: first tier, 1: last)
    budget_ms: float = 0.0  # latency budget of this method per request; 0 = none (deadline still applies)
    augmix: bool = False  # AugMix views for the multi-view tiers
    target_rate: float = 0.0  # > 0: steer this worker's threshold online towards this escalation rate
    rate_step: float = 0.01
    threshold_min: float = 0.0
    threshold_max: float = 1.0
    trace: bool = False  # add each tier's label, gate value and ms to the answer (calibration)
    # zero-shot temperature fitted on a labelled validation split (`tta eval --features ... --calibrate`):
    # the zero-shot tier answers, and is gated on, softmax(logits / temperature); None = uncalibrated
    temperature: float | None = None

    def parsed_tiers(self) -> tuple[Tier, ...]:
        return parse_tiers(self.tiers)

    def validate(self) -> None:
        try:
            self.parsed_tiers()
        except ValueError as exc:
            check(False, f"tiers: {exc}; e.g. 'zeroshot,zero:16,tpt:64'")
        check(self.gate in ("max_prob", "margin", "entropy"), "gate must be max_prob, margin or entropy")
        check(0.0 <= self.threshold <= 1.0, "threshold must be in [0, 1]")
        check(0.0 <= self.budget_ms <= 3_600_000.0, "budget_ms must be in [0, 3600000] (0 = none)")
        check(0.0 <= self.target_rate <= 1.0, "target_rate must be in [0, 1] (0 = fixed threshold)")
        check(0.0 < self.rate_step <= 0.5, "rate_step must be in (0, 0.5]")
        check(0.0 <= self.threshold_min <= self.threshold_max <= 1.0,
              "need 0 <= threshold_min <= threshold_max <= 1")
        check(self.temperature is None or 0.01 <= self.temperature <= 100.0,
              "temperature must be in [0.01, 100] or null (uncalibrated)")


def gate_confidence(probs: torch.Tensor, kind: str) -> float:
    """Confidence in [0, 1] of one probability vector [C]: higher = more sure."""
    p = probs.detach().float()
    if kind == "max_prob":
        return float(p.max())
    if kind == "margin":
        if p.numel() < 2:
            return 1.0
        top = p.topk(2).values
        return float(top[0] - top[1])
    if p.numel() < 2:
        return 1.0
    q = p.clamp_min(1e-12)
    return float(1.0 + (q * q.log()).sum() / math.log(p.numel()))


class TierLatency:
    """Per-worker running mean (EWMA) of each tier's wall-clock milliseconds."""

    def __init__(self, weight: float = EWMA_WEIGHT) -> None:
        self.weight = weight
        self._ms: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def get(self, key: str, n_classes: int) -> float | None:
        with self._lock:
            return self._ms.get((key, n_classes))

    def observe(self, key: str, n_classes: int, ms: float) -> None:
        with self._lock:
            old = self._ms.get((key, n_classes))
            self._ms[(key, n_classes)] = ms if old is None else (1 - self.weight) * old + self.weight * ms

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {f"{k}@{c}": round(v, 3) for (k, c), v in self._ms.items()}


class _Episode:
    """One request's reusable work: view pool and the features encoded so far (row i = view i)."""

    def __init__(self, method: Auto, request: MethodInput, opts: AutoOptions, tiers: tuple[Tier, ...]) -> None:
        self.method = method
        self.request = request
        self.pool_size = max(t.views for t in tiers)
        self.augmix = opts.augmix
        self.generator_state = request.generator.get_state()  # every view pool starts from the request seed
        self.views: torch.Tensor | None = None
        self.feats: torch.Tensor | None = None
        self.original: torch.Tensor | None = None  # the normalised original view [1, 3, S, S]

    def features(self, n: int) -> torch.Tensor:
        """Features of views 0..n-1, encoding only those not encoded yet."""
        clip = self.method.clip
        timer = self.request.timer
        have = 0 if self.feats is None else self.feats.shape[0]
        if have >= n:
            return self.feats[:n]
        if n == 1 and self.views is None:
            with timer.stage("augment"):
                views = original_view(clip, self.request.image)
        else:
            if self.views is None:
                generator = torch.Generator().set_state(self.generator_state)
                with timer.stage("augment"):
                    self.views = make_views(self.request.image, clip.image_size, clip.mean, clip.std,
                                            ViewSpec(n_views=self.pool_size, augmix=self.augmix),
                                            generator=generator, device=clip.device)
            views = self.views[have:n]
        if have == 0:
            self.original = views[:1]
        with timer.stage("encode"):
            new = encode_images(clip, views).float()
        self.feats = new if self.feats is None else torch.cat([self.feats, new])
        return self.feats[:n]


@register
class Auto(Method):
    name = "auto"
    scope = "episodic"
    Options = AutoOptions
    description = "zero-shot first; escalates to ZERO/TPT only when unsure and the latency budget allows"
    batch_encoding = "original"
    manages_own_deadline = True  # stops escalating at the deadline and says so ("stopped_by")
    val_grid = {"threshold": (0.6, 0.4, 0.8, 0.95)}  # the default first (it wins ties)
    feature_options = {"tiers": "zeroshot,tda"}
    feature_options_note = "tiers zeroshot,tda only: the ZERO and TPT tiers encode views of the pixels"

    def __init__(self, clip, defaults=None) -> None:  # noqa: ANN001 (signature of Method)
        super().__init__(clip, defaults)
        self._tpt = TPT(clip)
        self._lookup: Callable[[str], Method] | None = None
        self.latency = TierLatency()
        self._online_threshold: float | None = None
        self._lock = threading.Lock()

    def feature_input_reason(self, options: MethodOptions) -> str | None:
        """From an embedding, auto can run its single-view tiers only (e.g. ``tiers="zeroshot,tda"``)."""
        multi = [t.key for t in options.parsed_tiers() if t.views > 1]  # type: ignore[attr-defined]
        return f"auto's multi-view tiers {multi} need the pixels" if multi else None

    def batch_views(self, request: MethodInput) -> torch.Tensor | None:
        """A batch can share the first tier's encoding when that tier is single-view."""
        tiers = request.options.parsed_tiers()  # type: ignore[attr-defined]
        return super().batch_views(request) if tiers[0].single else None

    # --- the gate's threshold (fixed, or tracked online) ----------------------------------------
    def _threshold(self, opts: AutoOptions) -> float:
        if opts.target_rate <= 0:
            return opts.threshold
        with self._lock:
            if self._online_threshold is None:
                self._online_threshold = opts.threshold
            return min(max(self._online_threshold, opts.threshold_min), opts.threshold_max)

    def _track(self, opts: AutoOptions, threshold: float, wanted_escalation: bool) -> None:
        if opts.target_rate <= 0:
            return
        step = opts.rate_step * (opts.target_rate - float(wanted_escalation))
        with self._lock:
            self._online_threshold = min(max(threshold + step, opts.threshold_min), opts.threshold_max)

    def reset(self) -> None:
        with self._lock:
            self._online_threshold = None

    # --- tiers ------------------------------------------------------------------------------------
    def _run_tier(self, tier: Tier, episode: _Episode, request: MethodInput) -> torch.Tensor:
        clip = self.clip
        feats = episode.features(tier.views)
        if tier.name == "zeroshot":
            temperature = request.options.temperature or 1.0  # type: ignore[attr-defined]
            with request.timer.stage("predict"):
                return (zeroshot_logits(clip, feats[:1], request.text_features) / temperature).softmax(-1)[0]
        if tier.stream:
            return self._run_stream(tier.name, feats, episode, request)
        if tier.name == "zero":
            with request.timer.stage("predict"):
                votes = zero_vote(zeroshot_logits(clip, feats, request.text_features), ZeroOptions.gamma)
                return votes / votes.sum()
        tpt, base = self._tpt, TPTOptions()
        if self._lookup is not None:  # the deployment's own TPT instance and its method defaults
            tpt = self._lookup("tpt")
            base = tpt.defaults
        assert isinstance(tpt, TPT) and isinstance(base, TPTOptions)
        options = dataclasses.replace(base, n_views=tier.views, augmix=episode.augmix)
        return tpt.adapt_and_predict(request, feats, options)

    def bind_engine(self, lookup: Callable[[str], Method]) -> None:
        """The engine's method lookup: a stream tier (`tda`) runs the deployment's own instance."""
        self._lookup = lookup

    def _run_stream(self, name: str, feats: torch.Tensor, episode: _Episode, request: MethodInput) -> torch.Tensor:
        """The deployment's stream method on this image, fed the original view's features already
        computed (its state is updated exactly as a direct request would update it)."""
        if self._lookup is None:
            raise BadRequest(f"tier '{name}' needs a serving engine (Engine.method)", code="bad_options")
        stream = self._lookup(name)
        reason = stream.feature_input_reason(stream.defaults)
        if reason is not None:  # a cheap tier must not encode views of its own
            raise BadRequest(f"tier '{name}' runs on the original view only: {reason}; deploy it with n_views=1",
                             code="bad_options")
        sub = dataclasses.replace(request, options=stream.defaults,
                                  generator=torch.Generator().set_state(episode.generator_state))
        assert episode.original is not None
        with precomputed_features([(episode.original, feats[:1])]):
            return stream.predict(sub).probs

    def _estimate_ms(self, tier: Tier, n_classes: int, first_ms: float, first_views: int) -> float:
        measured = self.latency.get(tier.key, n_classes)
        if measured is not None:
            return measured
        per_view = first_ms / max(1, first_views)
        return per_view * tier.views * (TPT_PRIOR_FACTOR if tier.name == "tpt" else 1.0)

    def predict(self, request: MethodInput) -> MethodOutput:
        opts: AutoOptions = request.options  # type: ignore[assignment]
        tiers = opts.parsed_tiers()
        start = time.monotonic()
        limits = [start + opts.budget_ms / 1000.0] if opts.budget_ms > 0 else []
        if request.deadline is not None:
            limits.append(request.deadline)
        due = min(limits) if limits else None
        threshold = self._threshold(opts)
        n_classes = request.text_features.shape[0]
        episode = _Episode(self, request, opts, tiers)
        gates: list[float] = []
        stopped_by = "last_tier"
        wanted_escalation = False
        first_ms = 0.0
        probs = None
        answered = 0
        trace: list[dict[str, Any]] = []
        for index, tier in enumerate(tiers):
            if index > 0:
                estimate = self._estimate_ms(tier, n_classes, first_ms, tiers[0].views)
                if due is not None and time.monotonic() + estimate / 1000.0 > due:
                    stopped_by = "budget"
                    break
            tier_start = time.perf_counter()
            probs = self._run_tier(tier, episode, request)
            request.timer.sync()
            ms = (time.perf_counter() - tier_start) * 1000.0
            self.latency.observe(tier.key, n_classes, ms)
            if index == 0:
                first_ms = ms
            answered = index
            step = {"tier": tier.key, "label": request.labels.names[int(probs.argmax())], "ms": round(ms, 3)}
            trace.append(step)
            if index == len(tiers) - 1:
                break
            confidence = gate_confidence(probs, opts.gate)
            gates.append(round(confidence, 6))
            step["gate"] = gates[-1]
            if confidence >= threshold and threshold < 1.0:
                stopped_by = "confident"
                break
            wanted_escalation = True
        self._track(opts, threshold, wanted_escalation)
        assert probs is not None and episode.feats is not None
        feats = episode.feats
        zeroshot = zeroshot_logits(self.clip, feats[:1], request.text_features).softmax(-1)[0]
        extra: dict[str, Any] = {
            "tier": tiers[answered].key,
            "escalated": answered > 0,
            "gate": {"kind": opts.gate, "threshold": round(threshold, 6), "values": gates},
            "stopped_by": stopped_by,
            "encoded_images": int(feats.shape[0]),
        }
        if opts.trace:
            extra["trace"] = trace
        return MethodOutput(probs=probs, zeroshot_probs=zeroshot, image_features=feats[0], extra=extra)

    def state_summary(self) -> dict[str, Any]:
        """Measured tier latencies and the online threshold (worker-local, not persisted)."""
        with self._lock:
            online = self._online_threshold
        return {"tier_latency_ms": self.latency.snapshot(), "online_threshold": online}
