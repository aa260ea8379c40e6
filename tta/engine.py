"""The façade the edges call: one `Engine` per worker binds a frozen CLIP, the deployment's label
set and method defaults, and answers `predict(image, method=..., options=...)`.

The CLI and the TorchServe handler both use it, so a different server can wrap the same core
by decoding requests and calling `Engine.predict`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tta.admission import Budget, estimate
from tta.drift import DriftConfig, DriftMonitor, DriftSignals
from tta.errors import BadRequest, PixelsRequired, TTAError, Unavailable
from tta.faults import (
    DEADLINE,
    NUMERICAL,
    OOM,
    STATE_INVALID,
    ZeroShotFallback,
    deadline_passed,
    is_out_of_memory,
)
from tta.features import encode_images, feature_input, placeholder_image, precomputed_features
from tta.methods.base import Method, MethodInput, MethodOutput, get_method_class, list_methods
from tta.models import ClipModel
from tta.text import LabelSet, TextFeatureCache
from tta.timing import StageTimer

log = logging.getLogger(__name__)

MAX_TOP_K = 100
MAX_OOM_RETRIES = 2  # out of memory: retry with half the views, twice, then answer zero-shot


@dataclass
class Prediction:
    """One answer. `to_dict` is the JSON object `tta predict` prints and the server returns."""

    label: str
    score: float
    top_k: list[dict[str, Any]]
    method: str
    changed_by_adaptation: bool
    timings_ms: dict[str, float]
    zeroshot_label: str
    probs: torch.Tensor = field(repr=False)
    zeroshot_probs: torch.Tensor = field(repr=False)
    image_features: torch.Tensor | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)
    drift: DriftSignals | None = field(default=None, repr=False)  # set when the engine monitors drift
    labels: LabelSet | None = field(default=None, repr=False)  # the label set the answer is of
    answer_id: str | None = None  # set by a server that remembers answers for later labels

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.answer_id} if self.answer_id is not None else {}
        out |= {
            "label": self.label,
            "score": round(self.score, 6),
            "top_k": self.top_k,
            "method": self.method,
            "changed_by_adaptation": self.changed_by_adaptation,
            "zeroshot_label": self.zeroshot_label,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }
        out.update(self.extra)
        return out


@dataclass
class PredictRequest:
    """One decoded request for `Engine.predict_batch` (the arguments of `Engine.predict`).

    `features` instead of `image`: the precomputed, L2-normalised embedding [d] of the image's
    original view (CLIP's resize + center crop) by this deployment's model; methods that need the
    pixels answer `PixelsRequired` (400 needs_pixels).
    """

    image: torch.Tensor | None
    method: str | None = None
    options: Mapping[str, Any] | None = None
    labels: Sequence[str] | None = None
    top_k: int = 5
    seed: int | None = None
    deadline: float | None = None  # absolute time.monotonic(); None = none
    features: torch.Tensor | None = None


@dataclass
class _Job:
    """A validated request on its way through the engine."""

    name: str
    impl: Method
    options: Any
    labels: LabelSet
    top_k: int
    seed: int
    image: torch.Tensor
    deadline: float | None
    start: float
    timer: StageTimer
    text_features: torch.Tensor | None = None
    shared: tuple[torch.Tensor, torch.Tensor] | None = None  # (views, features) encoded with the batch
    batch: dict[str, Any] | None = None
    features: torch.Tensor | None = None  # the request's own original-view embedding (no pixels)


class Engine:
    """Per-worker core: model + default labels + method instances + text-feature cache."""

    def __init__(
        self,
        clip: ClipModel,
        labels: LabelSet,
        default_method: str = "zeroshot",
        method_defaults: Mapping[str, Mapping[str, Any]] | None = None,
        max_labels: int = 1000,
        seed: int = 0,
        drift: DriftConfig | None = None,
        budget: Budget | None = None,
        max_batch_images: int = 256,
    ) -> None:
        self.clip = clip
        self.budget = budget  # None: no cost admission (library use); servers always pass one
        self.max_batch_images = max_batch_images  # images per shared encoder pass in predict_batch
        self.labels = labels
        self.max_labels = max_labels
        self.seed = seed
        self.text_cache = TextFeatureCache()
        self._methods: dict[str, Method] = {}
        self._method_defaults = {k: dict(v) for k, v in (method_defaults or {}).items()}
        self._lock = threading.RLock()
        self.default_method = default_method
        get_method_class(default_method)  # unknown default -> error at start, not at first request
        # the deployment's drift reference: one more stream-state owner, addressed as method "drift"
        self.drift = DriftMonitor(labels.names, clip.name, clip.embed_dim, drift) if drift is not None else None
        for name in self._method_defaults:
            self.method(name)  # validates deployment defaults early

    @property
    def methods(self) -> list[str]:
        return list_methods()

    def method(self, name: str) -> Method:
        """The (lazily created) instance of a registered method, configured with deployment defaults."""
        with self._lock:
            if name not in self._methods:
                cls = get_method_class(name)
                defaults = cls.Options.from_dict(self._method_defaults.get(name))
                instance = cls(self.clip, defaults)
                instance.bind_engine(self.method)
                instance.bind_deployment(self.labels.names, lambda: self.text_cache.get(self.clip, self.labels))
                self._methods[name] = instance
            return self._methods[name]

    def resolve_labels(self, labels: Sequence[str] | None) -> LabelSet:
        if labels is None:
            return self.labels
        if len(labels) > self.max_labels:
            raise BadRequest(f"too many labels: {len(labels)} > {self.max_labels}", code="too_many_labels")
        return LabelSet.create(labels, templates=self.labels.templates)

    def predict(
        self,
        image: torch.Tensor,
        method: str | None = None,
        options: Mapping[str, Any] | None = None,
        labels: Sequence[str] | None = None,
        top_k: int = 5,
        seed: int | None = None,
        deadline: float | None = None,
    ) -> Prediction:
        """Classify one decoded image (uint8 [3, H, W]) with `method`, adapting as it does.

        `deadline` (absolute `time.monotonic()`): past it, multi-view methods stop adapting and
        the answer is zero-shot, flagged ``"fallback": "deadline"``. With a `budget`, a request
        whose estimated cost exceeds it is refused before any work (`BadRequest` over_budget).
        """
        return self._predict_one(PredictRequest(image, method, options, labels, top_k, seed, deadline))

    def _predict_one(self, request: PredictRequest) -> Prediction:
        start = time.perf_counter()
        job = self._prepare(request, start)
        with self._lock:  # one request at a time per worker: methods share prompts and caches
            return self._finish(job)

    def predict_features(
        self,
        features: torch.Tensor,
        method: str | None = None,
        options: Mapping[str, Any] | None = None,
        labels: Sequence[str] | None = None,
        top_k: int = 5,
        seed: int | None = None,
        deadline: float | None = None,
    ) -> Prediction:
        """`predict` for a precomputed original-view embedding [d] instead of the image.

        The same method objects, options, state and fallbacks run as for an image (offline
        evaluation on stored features, clients that embed at the edge); a method that needs the
        pixels, e.g. TPT's augmented views, raises `PixelsRequired` before any state is touched.
        """
        return self._predict_one(PredictRequest(None, method, options, labels, top_k, seed, deadline,
                                                features=features))

    def predict_batch(self, requests: Sequence[PredictRequest]) -> list[Prediction | Exception]:
        """Answer a batch: one answer (or the exception it raised) per request, in order.

        The frozen image encoder runs once per group instead of once per request: every request
        whose method declares its first views (`Method.batch_encoding`) has them encoded together,
        single-view requests (zero-shot, cache methods, `auto`'s first tier) in one pass and the
        multi-view ones (ZERO, TPT) packed up to `max_batch_images` per pass. Then each request is
        finished on its own, in request order, so stream methods update their state in the same
        order as one-at-a-time calls, and a failing request only fails itself. Answers equal
        `predict` up to float rounding of the batched forward. Timings stay per request: `encode`
        is the shared passes the request waited for, `total` runs from the batch's start to its
        answer; `batch` in the answer says how the work was shared.
        """
        start = time.perf_counter()
        jobs: list[_Job | Exception] = []
        for request in requests:
            try:
                jobs.append(self._prepare(request, start))
            except Exception as exc:  # noqa: BLE001 (returned to the caller, which maps it to a status)
                jobs.append(exc)
        results: list[Prediction | Exception] = []
        with self._lock:
            prepared = [j for j in jobs if isinstance(j, _Job) and j.features is None]
            if sum(j.impl.batch_encoding != "none" for j in prepared) > 1:  # else nothing to share: a batch
                self._encode_shared(prepared)  # of one (the common case) would build its views twice
            for job in jobs:
                if isinstance(job, Exception):
                    results.append(job)
                    continue
                try:
                    results.append(self._finish(job))
                except Exception as exc:  # noqa: BLE001
                    results.append(exc)
        return results

    def _prepare(self, request: PredictRequest, start: float) -> _Job:
        """Validate one request and resolve its method, options and labels (4xx on bad input)."""
        name = request.method or self.default_method
        if not isinstance(name, str):
            raise BadRequest("'method' must be a string", code="unknown_method")
        impl = self.method(name)
        opts = impl.parse_options(request.options)
        top_k = request.top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise BadRequest(f"top_k must be an integer in [1, {MAX_TOP_K}]", code="bad_options")
        features = None
        if request.features is not None:
            features = self.check_features(request.features)
            reason = impl.feature_input_reason(opts)
            if reason is not None:
                raise PixelsRequired(f"method '{name}' cannot answer from an embedding: {reason}")
            image = placeholder_image(self.clip)
        else:
            image = request.image
            if (not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3
                    or image.shape[0] != 3):
                raise BadRequest("image must be a uint8 RGB tensor [3, H, W]", code="not_an_image")
        label_set = self.resolve_labels(request.labels)
        self.admit(opts, label_set)
        seed = self.seed if request.seed is None else int(request.seed)
        return _Job(name=name, impl=impl, options=opts, labels=label_set, top_k=top_k, seed=seed,
                    image=image, deadline=request.deadline, start=start, timer=StageTimer(self.clip.device),
                    features=features)

    def check_features(self, features: Any) -> torch.Tensor:
        """A request's embedding as float32 [d] on the model's device, or `BadRequest`: it must be a
        finite vector of the model's width with unit norm (what the image encoder would produce)."""
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise BadRequest("features must be a float tensor [d]", code="bad_features")
        flat = features.detach().reshape(-1).float()
        width = self.clip.embed_dim
        if features.ndim not in (1, 2) or (features.ndim == 2 and features.shape[0] != 1) or flat.numel() != width:
            raise BadRequest(f"features must have shape [{width}] (this model's embedding width), "
                             f"got {list(features.shape)}", code="bad_features")
        if not bool(torch.isfinite(flat).all()):
            raise BadRequest("features must be finite", code="bad_features")
        norm = float(flat.norm())
        # float16 storage of a unit vector keeps its norm within ~d * 2^-11 relative; 1e-2 is loose
        # enough for any stored precision and tight enough to catch unnormalised encoder outputs
        if abs(norm - 1.0) > 1e-2:
            raise BadRequest(f"features must be L2-normalised (norm {norm:.4f})", code="bad_features")
        return (flat / norm).to(self.clip.device)

    def _input(self, job: _Job) -> MethodInput:
        if job.text_features is None:
            with job.timer.stage("text"):
                job.text_features = self.text_cache.get(self.clip, job.labels)
        return MethodInput(
            image=job.image, labels=job.labels, text_features=job.text_features, options=job.options,
            generator=torch.Generator().manual_seed(job.seed), timer=job.timer,
            is_default_labels=job.labels is self.labels, deadline=job.deadline,
        )

    def _finish(self, job: _Job) -> Prediction:
        if job.features is not None:
            with feature_input(self.clip, job.features):  # every fallback runs on the embedding too
                output = self._run(job.impl, self._input(job), job.seed)
        else:
            output = self._run(job.impl, self._input(job), job.seed, job.shared)
        job.timer.add("total", (time.perf_counter() - job.start) * 1000.0)
        prediction = self._to_prediction(job.name, job.labels, output, job.top_k, job.timer)
        if job.batch is not None:
            prediction.extra["batch"] = job.batch
        self.observe_drift(prediction, default_labels=job.labels is self.labels)
        return prediction

    def _encode_shared(self, jobs: list[_Job]) -> None:
        """Encode the declared first views of `jobs` in shared passes; a failure here only means
        the requests encode on their own."""
        planned: list[tuple[_Job, torch.Tensor]] = []
        for job in jobs:
            try:
                with job.timer.stage("augment"):
                    views = job.impl.batch_views(self._input(job))
            except Exception:  # noqa: BLE001 (the request's own predict reports its error)
                log.debug("no shared views for a %s request", job.name, exc_info=True)
                continue
            if views is not None:
                planned.append((job, views))
        if len(planned) < 2:
            return  # nothing to share
        single = [p for p in planned if p[1].shape[0] == 1]
        multi = [p for p in planned if p[1].shape[0] > 1]
        groups = [single] if len(single) > 1 else []
        limit = max(1, self.max_batch_images)
        current: list[tuple[_Job, torch.Tensor]] = []
        for item in multi:  # pack whole requests into passes of at most `limit` images
            if current and sum(v.shape[0] for _, v in current) + item[1].shape[0] > limit:
                groups.append(current)
                current = []
            current.append(item)
        if len(current) > 1 or (current and groups):
            groups.append(current)
        passes = 0
        for group in groups:
            views = torch.cat([v for _, v in group])
            timer = StageTimer(self.clip.device)
            timer.sync()
            begin = time.perf_counter()
            try:
                feats = encode_images(self.clip, views, batch_size=max(limit, views.shape[0]))
            except Exception:  # noqa: BLE001 (e.g. out of memory: let each request encode alone)
                log.warning("shared encoding of %d images failed; requests encode one by one", views.shape[0],
                            exc_info=True)
                continue
            timer.sync()
            ms = (time.perf_counter() - begin) * 1000.0
            passes += 1
            offset = 0
            for job, v in group:
                job.shared = (v, feats[offset:offset + v.shape[0]])
                offset += v.shape[0]
                job.timer.add("encode", ms)
                job.batch = {"requests": len(group), "images": int(views.shape[0]), "encode_ms": round(ms, 3)}
        if passes:
            log.info("batch of %d requests: %d shared encoder pass(es) over %d requests",
                     len(jobs), passes, sum(1 for j in jobs if j.shared is not None))

    def observe_drift(self, prediction: Prediction, default_labels: bool) -> None:
        """Feed one answer to the drift monitor (monitoring never fails a request: errors are logged)."""
        if self.drift is None:
            return
        try:
            prediction.drift = self.drift.observe(prediction.image_features, prediction.zeroshot_probs, default_labels)
        except Exception:
            log.exception("drift monitoring failed for one request; the answer is unaffected")

    def admit(self, options: Any, labels: LabelSet) -> float:
        """Estimated cost units of a request (0 without a budget); `BadRequest` over the budget."""
        if self.budget is None:
            return 0.0
        new_prompts = 0
        if not self.text_cache.contains(self.clip, labels):
            new_prompts = sum(len(labels.prompts_for(i)) for i in range(len(labels)))
        return self.budget.admit(estimate(options, len(labels), new_prompts))

    def _run(self, impl: Method, request: MethodInput, seed: int,
             shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> MethodOutput:
        """`impl.predict` with the fallbacks: deadline / numerical fault -> zero-shot; out of memory
        -> the same request with half the views (twice), then zero-shot; a stream method raising
        unexpectedly -> zero-shot flagged ``state_invalid``. Never a non-finite score.
        `shared`: (views, features) a batch already encoded for this request (predict_batch)."""
        retries = 0
        while True:
            try:
                if not impl.manages_own_deadline and deadline_passed(request.deadline):
                    raise ZeroShotFallback(DEADLINE, "deadline passed before the method started")
                if shared is not None:
                    with precomputed_features([shared]):
                        output = impl.predict(request)
                else:
                    output = impl.predict(request)
            except ZeroShotFallback as fb:
                log.info("%s falls back to zero-shot (%s): %s", impl.name, fb.reason, fb.detail)
                return self._zeroshot_fallback(request, fb.reason, fb.detail)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    if impl.scope != "stream" or isinstance(exc, TTAError):
                        raise
                    # state is shared by every replica and outlives the request: whatever in it makes the
                    # method fail must not turn every later request into a 5xx (validation should have kept it out)
                    log.exception("%s raised while answering from its stream state; zero-shot answer (state_invalid)",
                                  impl.name)
                    return self._zeroshot_fallback(request, STATE_INVALID, f"{impl.name} failed on its stream state "
                                                   f"({type(exc).__name__}); see the worker log")
                release_memory(self.clip.device)
                smaller = fewer_views(request.options)
                if smaller is None or retries >= MAX_OOM_RETRIES:
                    log.warning("%s ran out of memory (%d retries); zero-shot answer: %s", impl.name, retries, exc)
                    return self._zeroshot_fallback(request, OOM, f"out of memory after {retries} retries")
                retries += 1
                shared = None  # the batch's features were for the full view count
                log.warning("%s ran out of memory; retrying with n_views=%s", impl.name,
                            getattr(smaller, "n_views", None))
                request = dataclasses.replace(request, options=smaller,
                                              generator=torch.Generator().manual_seed(seed))
                continue
            if retries:
                output.extra.update(oom_retries=retries, n_views=getattr(request.options, "n_views", None))
            if not (bool(torch.isfinite(output.probs).all()) and bool(torch.isfinite(output.zeroshot_probs).all())):
                log.warning("%s produced non-finite scores; zero-shot answer", impl.name)
                return self._zeroshot_fallback(request, NUMERICAL, "non-finite scores")
            return output

    def _zeroshot_fallback(self, request: MethodInput, reason: str, detail: str) -> MethodOutput:
        """Plain CLIP on the original image: the answer every fallback guarantees."""
        zeroshot = self.method("zeroshot")
        try:
            output = zeroshot.predict(dataclasses.replace(request, options=zeroshot.defaults, deadline=None))
        except Exception as exc:
            if is_out_of_memory(exc):
                release_memory(self.clip.device)
                raise Unavailable("out of memory even for a zero-shot answer; retry later") from exc
            raise
        if not bool(torch.isfinite(output.probs).all()):
            raise Unavailable("the model produced non-finite scores for this image")
        output.extra.update(fallback=reason, fallback_detail=detail)
        return output

    # --- stream-state operations (inspect / reset / export / import / feedback) ----------------
    def state_owner(self, name: str) -> Method | DriftMonitor:
        """A method, or the drift reference (`drift`): both answer the state actions."""
        if name == DriftMonitor.name and self.drift is not None:
            return self.drift
        return self.method(name)

    def state_summary(self, method: str) -> dict[str, Any]:
        impl = self.state_owner(method)
        return {"method": method, "scope": impl.scope, **impl.state_summary()}

    def reset_state(self, method: str) -> None:
        with self._lock:
            self.state_owner(method).reset()

    def export_state(self, method: str) -> dict[str, Any]:
        with self._lock:
            return self.state_owner(method).state_dict()

    def import_state(self, method: str, state: Mapping[str, Any]) -> None:
        with self._lock:
            self.state_owner(method).load_state_dict(state)

    def feedback(self, image: torch.Tensor | None, label: str, method: str, seed: int | None = None,
                 features: torch.Tensor | None = None) -> dict[str, Any]:
        """A labelled example for `method` (GDA support set, online accuracy); unknown labels are 4xx.

        `features` instead of `image`: the example's original-view embedding (see `predict_features`).
        """
        if label not in self.labels.names:
            raise BadRequest(f"unknown label '{label}': not in the deployment's label set", code="unknown_label")
        impl = self.method(method)
        timer = StageTimer(self.clip.device)
        generator = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
        embedding = self.check_features(features) if features is not None else None
        with self._lock:
            text_features = self.text_cache.get(self.clip, self.labels)
            request = MethodInput(image=placeholder_image(self.clip) if embedding is not None else image,
                                  labels=self.labels, text_features=text_features,
                                  options=impl.defaults, generator=generator, timer=timer)
            if embedding is None:
                return impl.feedback(request, self.labels.names.index(label))
            with feature_input(self.clip, embedding):
                return impl.feedback(request, self.labels.names.index(label))

    def feedback_many(self, labels: Sequence[str], method: str, images: Sequence[torch.Tensor] | None = None,
                      features: torch.Tensor | Sequence[torch.Tensor] | None = None,
                      seed: int | None = None) -> dict[str, Any]:
        """Many labelled examples for `method` (`Method.feedback_many`: GDA refits once for all).

        Give `images` (uint8 [3, H, W] each) or `features` (original-view embeddings, [N, d] or a
        list of [d]); every label and embedding is checked before any state changes.
        """
        if (images is None) == (features is None):
            raise BadRequest("give either images or features", code="bad_feedback")
        unknown = sorted({label for label in labels if label not in self.labels.names})
        if unknown:
            raise BadRequest(f"unknown label(s) {unknown[:5]}: not in the deployment's label set", code="unknown_label")
        examples = list(images) if images is not None else list(features)  # type: ignore[arg-type]
        if len(examples) != len(labels):
            raise BadRequest(f"{len(examples)} examples but {len(labels)} labels", code="bad_feedback")
        impl = self.method(method)
        embeddings = [self.check_features(f) for f in examples] if features is not None else None
        index = {name: i for i, name in enumerate(self.labels.names)}
        base = self.seed if seed is None else int(seed)
        with self._lock:
            text_features = self.text_cache.get(self.clip, self.labels)
            requests = [MethodInput(image=placeholder_image(self.clip) if embeddings is not None else examples[i],
                                    labels=self.labels, text_features=text_features, options=impl.defaults,
                                    generator=torch.Generator().manual_seed(base + i), timer=StageTimer(self.clip.device))
                        for i in range(len(examples))]

            def scope(i: int) -> Any:
                return feature_input(self.clip, embeddings[i]) if embeddings is not None else contextlib.nullcontext()

            return impl.feedback_many(requests, [index[label] for label in labels], scope)

    def feedback_answer(self, feature: torch.Tensor, label_index: int, method: str,
                        served_correct: bool) -> dict[str, Any]:
        """A label for an earlier answer of `method` on the deployment's labels, with the original-view
        feature that answer saw (methods with `learns_from_answers`: GDA's support set)."""
        impl = self.method(method)
        with self._lock:
            text_features = self.text_cache.get(self.clip, self.labels)
            return impl.feedback_answer(feature, label_index, self.labels, text_features, served_correct)

    def _to_prediction(self, name: str, labels: LabelSet, output: Any, top_k: int, timer: StageTimer) -> Prediction:
        probs = output.probs.detach().float().cpu()
        zs = output.zeroshot_probs.detach().float().cpu()
        k = min(top_k, probs.shape[0])
        values, indices = probs.topk(k)
        top = [{"label": labels.names[i], "score": round(float(v), 6)} for v, i in zip(values, indices, strict=True)]
        best = int(indices[0])
        zs_best = int(zs.argmax())
        feats = output.image_features.detach().float().cpu() if output.image_features is not None else None
        return Prediction(
            label=labels.names[best], score=float(values[0]), top_k=top, method=name,
            changed_by_adaptation=best != zs_best, timings_ms=dict(timer.timings_ms),
            zeroshot_label=labels.names[zs_best], probs=probs, zeroshot_probs=zs,
            image_features=feats, extra=dict(output.extra), labels=labels,
        )


def fewer_views(options: Any) -> Any | None:
    """`options` with half the views (and generated views), or None when there is nothing to halve."""
    n_views = getattr(options, "n_views", None)
    n_generated = getattr(options, "n_generated", None)
    changes: dict[str, int] = {}
    if isinstance(n_views, int) and n_views > 1:
        changes["n_views"] = n_views // 2
    if isinstance(n_generated, int) and n_generated > 1:
        changes["n_generated"] = n_generated // 2
    return dataclasses.replace(options, **changes) if changes else None


def release_memory(device: torch.device) -> None:
    """Give cached blocks back after an out-of-memory error so the retry can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
