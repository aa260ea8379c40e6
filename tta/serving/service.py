"""The server-agnostic worker: build it from a deployment config, then decode -> run -> encode.

Both adapters (TorchServe's handler, KServe's model) hold one `Service` and call it, so the
answers, the status codes and the Prometheus metrics are the same whichever server is in front.
The phases are separate methods so a batch can be decoded first, checked (admission), run
together, then encoded one answer per request; a failing request never fails its neighbours.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tta import state as tta_state
from tta.admission import Budget
from tta.drift import DriftConfig
from tta.engine import Engine, Prediction, PredictRequest
from tta.errors import BadRequest, TTAError, Unavailable
from tta.methods.base import get_method_class
from tta.metrics import Exporter, ServingMetrics
from tta.serving import codec
from tta.serving.admin import AdminAuth
from tta.serving.answers import AnswerMemory
from tta.serving.codec import Action, Decoded, Failure, Limits, ModelInfo, OipInfer, Predict

log = logging.getLogger(__name__)

Result = list[Prediction] | dict[str, Any] | Failure  # what `run` produced for one request


@dataclass
class Reply:
    """One answer: HTTP status and JSON body (`text()` for the bytes on the wire)."""

    status: int
    body: dict[str, Any]
    method: str
    kind: str = "json"  # "json" (JSON form, actions), "oip" (OIP v2 response) or "error"
    predictions: list[Prediction] = field(default_factory=list, repr=False)
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers (Retry-After)
    failure: Failure | None = field(default=None, repr=False)  # what an error reply answers

    @property
    def ok(self) -> bool:
        return self.status < 400

    def text(self) -> str:
        return codec.dumps(self.body)


class Service:
    """One worker's request runner over an `Engine`, with its metrics."""

    def __init__(self, engine: Engine, metrics: ServingMetrics, model: ModelInfo,
                 limits: Limits = codec.DEFAULT_LIMITS, budget: Budget | None = None,
                 admin: AdminAuth | None = None, max_inflight: int = 0, answers: AnswerMemory | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model = model
        self.limits = limits
        self.budget = budget or engine.budget or Budget()  # every request gets a deadline
        self.admin = admin or AdminAuth()  # none configured: privileged actions are refused (403)
        self.max_inflight = max_inflight  # 0: no bound (TorchServe's queue bounds a worker's load)
        # this worker's answers, for labels sent later ("feedback" with an "id"); workers share none
        self.answers = answers if answers is not None else AnswerMemory(engine.labels.names)
        self._inflight = 0
        self._inflight_lock = threading.Lock()

    # --- the three phases ------------------------------------------------------------------------
    def decode(self, body: Any, headers: Mapping[str, str] | None = None) -> Decoded:
        """Bytes/text/JSON -> a typed request or a `Failure` (see `tta.serving.codec.decode`)."""
        try:
            return codec.decode(body, headers, self.limits)
        except Exception as exc:  # noqa: BLE001 - a decoder bug fails this request only
            log.exception("request could not be decoded")
            return codec.failure(exc)

    def run(self, request: Decoded, started: float | None = None) -> Result:
        """Call the Engine for one decoded request; errors become a `Failure`, never an exception.

        `started` (`time.monotonic()`, default now) anchors the request's deadline: a batch passes
        its own start so the whole batch finishes within the deadline, below the worker timeout.
        """
        if isinstance(request, Failure):
            return request
        if not self._enter():
            return Failure(503, "overloaded", f"more than {self.max_inflight} requests in flight; retry later",
                           self.method_of(request), retry_after=codec.RETRY_AFTER_S)
        try:
            anchor = time.monotonic() if started is None else started
            if isinstance(request, Predict):
                return [self._predict(request, anchor)]
            if isinstance(request, OipInfer):
                return [self._predict(item, anchor) for item in request.items]
            return self._action(request)
        except Exception as exc:  # noqa: BLE001 - one request must never take its neighbours down
            if not isinstance(exc, TTAError):
                log.exception("request failed unexpectedly")
            return codec.failure(exc, self.method_of(request))
        finally:
            self._leave()

    def _enter(self) -> bool:
        with self._inflight_lock:
            if self.max_inflight and self._inflight >= self.max_inflight:
                return False
            self._inflight += 1
            return True

    def _leave(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1

    def encode(self, request: Decoded, result: Result) -> Reply:
        """The answer for one request, counting its outcome."""
        method = self.method_of(request)
        if isinstance(result, Failure):
            self.metrics.observe_outcome(self.model.name, result.method or method, result.outcome)
            if result.code == Unavailable.code:  # stream state out of reach (a model failing to load is not)
                self.metrics.observe_state_unavailable(self.model.name, result.method or method)
            log.info("request -> %d %s: %s", result.status, result.code, result.message)
            headers = {"Retry-After": str(result.retry_after)} if result.retry_after is not None else {}
            return Reply(result.status, result.body(), result.method or method, kind="error", headers=headers,
                         failure=result)
        if isinstance(result, dict):  # state actions are counted in tta_state_actions only
            return Reply(200, result, method)
        outcome = "fallback" if any(p.extra.get("fallback") for p in result) else "ok"
        self.metrics.observe_outcome(self.model.name, method, outcome)
        if isinstance(request, OipInfer):
            return Reply(200, codec.encode_oip(result, self.model, request.id, request.outputs), method, kind="oip",
                         predictions=result)
        return Reply(200, codec.encode_prediction(result[0], self.model), method, predictions=result)

    # --- conveniences ------------------------------------------------------------------------------
    def handle(self, body: Any, headers: Mapping[str, str] | None = None) -> Reply:
        """decode -> run -> encode for one request."""
        request = self.decode(body, headers)
        return self.encode(request, self.run(request))

    def handle_batch(self, requests: Sequence[tuple[Any, Mapping[str, str] | None]]) -> list[Reply]:
        """One reply per (body, headers), in order; each request fails alone."""
        started = time.monotonic()  # one deadline for the batch: it must end before the worker timeout
        return self.run_batch([self.decode(body, headers) for body, headers in requests], started)

    def run_batch(self, requests: Sequence[Decoded], started: float | None = None) -> list[Reply]:
        """run + encode for decoded requests, one reply each, in order.

        The predictions run as one `Engine.predict_batch` (shared image-encoder passes); a state
        action splits the batch there, so it sees exactly the state it would see one by one.
        `started` (`time.monotonic()`, default now) anchors the one deadline of the batch.
        """
        started = time.monotonic() if started is None else started
        results: list[Result | None] = [None] * len(requests)
        segment: list[int] = []
        for index, request in enumerate(requests):
            if isinstance(request, Predict | OipInfer):
                segment.append(index)
                continue
            self._run_segment(requests, segment, results, started)
            segment = []
            results[index] = self.run(request, started)
        self._run_segment(requests, segment, results, started)
        return [self.encode(request, result) for request, result in zip(requests, results, strict=True)]

    def _run_segment(self, requests: Sequence[Decoded], indices: list[int], results: list[Result | None],
                     started: float) -> None:
        """Predict every image of the requests at `indices` in one engine batch."""
        if not indices:
            return
        items = [(i, item) for i in indices for item in _items(requests[i])]
        try:
            answers: list[Prediction | Exception] = self.engine.predict_batch([
                PredictRequest(item.image, item.method, item.options, item.labels, item.top_k, item.seed,
                               self.budget.deadline(item.deadline_ms, start=started))
                for _, item in items
            ])
        except Exception:  # noqa: BLE001 - an engine bug: each request answers alone
            log.exception("batched run failed; running the requests one by one")
            for i in indices:
                results[i] = self.run(requests[i], started)
            return
        per_request: dict[int, list[Prediction]] = {i: [] for i in indices}
        for (i, item), answer in zip(items, answers, strict=True):
            if isinstance(results[i], Failure):
                continue
            if isinstance(answer, Exception):
                if not isinstance(answer, TTAError):
                    log.error("request failed unexpectedly", exc_info=answer)
                results[i] = codec.failure(answer, self.method_of(requests[i]))
                continue
            per_request[i].append(self._finish(item, answer))
        for i in indices:
            if results[i] is None:
                results[i] = per_request[i]
        shared = sum(1 for a in answers if not isinstance(a, Exception) and "batch" in a.extra)
        self.metrics.observe_batch(self.model.name, len(items), shared)

    def method_of(self, request: Decoded) -> str:
        """The method a request runs with (metrics label): its own, else the deployment default."""
        method = request.method
        return method if isinstance(method, str) and method else self.engine.default_method

    # --- running -----------------------------------------------------------------------------------
    def _predict(self, request: Predict, started: float) -> Prediction:
        prediction = self.engine.predict(
            request.image, method=request.method, options=request.options, labels=request.labels,
            top_k=request.top_k, seed=request.seed, deadline=self.budget.deadline(request.deadline_ms, start=started),
        )
        return self._finish(request, prediction)

    def _finish(self, request: Predict, prediction: Prediction) -> Prediction:
        """Request-level timings (decode, total since arrival) and metrics of one answer."""
        timings = {"decode": request.decode_ms, **prediction.timings_ms}
        timings["total"] = (time.perf_counter() - request.started) * 1000.0
        prediction.timings_ms = timings
        self._observe(prediction, custom_labels=request.labels is not None)
        try:
            prediction.answer_id = self._remember(prediction)
        except Exception:  # noqa: BLE001 - bookkeeping for later labels never fails an answer
            log.exception("answer not remembered; it goes out without an id")
        return prediction

    def _remember(self, prediction: Prediction) -> str:
        """Remember what a later label needs (tta.serving.answers); the answer carries the id."""
        labels = prediction.labels
        default = labels is None or labels is self.engine.labels
        feature = None
        if (default and prediction.image_features is not None
                and type(self.engine.method(prediction.method)).learns_from_answers):
            feature = prediction.image_features.detach().float().cpu().contiguous().numpy().tobytes()
        return self.answers.remember(prediction.method, prediction.zeroshot_label, prediction.label,
                                     None if default or labels is None else labels.names, feature)

    def _observe(self, prediction: Prediction, custom_labels: bool) -> None:
        m, name = self.metrics, self.model.name
        m.observe_stages(name, prediction.method, prediction.timings_ms)
        if prediction.extra.get("fallback"):  # deadline, numerical, oom, generation fallbacks: one counter
            m.observe_fallback(name, prediction.method, prediction.extra["fallback"])
        m.observe_prediction(
            name, prediction.method, prediction.label, prediction.probs, prediction.zeroshot_probs,
            prediction.changed_by_adaptation, prediction.drift, custom_labels=custom_labels,
        )
        impl = self.engine.method(prediction.method)
        if impl.scope == "stream":  # the request already caught up with the log: no second round trip
            try:
                m.observe_state(name, prediction.method, impl.local_summary())
            except Exception:  # noqa: BLE001 - a gauge must never turn an answer into a 5xx
                log.exception("%s: state summary failed; cache-fill gauge not updated", prediction.method)
        if "tier" in prediction.extra:
            m.observe_tier(name, prediction.method, str(prediction.extra["tier"]), bool(prediction.extra.get("escalated")))

    def _action(self, request: Action) -> dict[str, Any]:
        method = request.method or self.engine.default_method
        if request.answer_id is not None:  # a label for an earlier answer: counted under that answer's method
            method = self.answers.peek_method(request.answer_id) or method
        outcome, credential = "client_error", None
        try:
            credential = self.admin.authorize(request.action, method, request.headers)
            result = self._run_action(request, method)
            outcome = "ok"
            if isinstance(result.get("state"), Mapping) and request.action != "export":
                self.metrics.observe_state(self.model.name, method, result["state"])
            return result
        finally:
            self.metrics.observe_state_action(self.model.name, method, request.action, outcome)
            if credential is not None:
                self.admin.record(request.action, method, outcome, credential, request.headers)

    def _run_action(self, request: Action, method: str) -> dict[str, Any]:
        engine, action = self.engine, request.action
        base = {"action": action, "method": method, "model": self.model.name, "model_version": self.model.version}
        if action == "state":
            return {**base, "state": engine.state_summary(method)}
        if action == "reset":
            engine.reset_state(method)
            return {**base, "reset": True, "state": engine.state_summary(method)}
        if action == "export":
            return {**base, "state": codec.encode_state(engine.export_state(method))}
        if action == "import":
            engine.import_state(method, request.state or {})
            return {**base, "imported": True, "state": engine.state_summary(method)}
        if request.answer_id is not None:
            return {**base, "feedback": self._label_answer(request, method)}
        assert request.image is not None and request.label is not None  # decode_action guarantees both
        reply = engine.feedback(request.image, request.label, method, seed=request.seed)
        if reply.get("fallback"):  # answered from the last known state (Redis away): counted like predictions
            self.metrics.observe_fallback(self.model.name, method, reply["fallback"])
        return {**base, "feedback": reply}

    def _label_answer(self, request: Action, method: str) -> dict[str, Any]:
        """Count whether zero-shot and the served answer were right; methods that learn from labelled
        answers (GDA) also get the answer's remembered feature."""
        assert request.answer_id is not None and request.label is not None
        if request.method and request.method != method:
            raise BadRequest(f"answer {request.answer_id} was answered by method '{method}', not "
                             f"'{request.method[:40]}'; leave 'method' out to label it", code="unknown_method")
        answer, index, names = self.answers.label(request.answer_id, request.label)
        zeroshot_ok, served_ok = answer.zeroshot == index, answer.served == index
        self.metrics.observe_labelled_answer(self.model.name, answer.method, zeroshot_ok, served_ok)
        reply: dict[str, Any] = {
            "id": request.answer_id, "label": names[index], "served_label": names[answer.served],
            "zeroshot_label": names[answer.zeroshot], "served_correct": served_ok, "zeroshot_correct": zeroshot_ok,
        }
        if answer.feature is not None:
            feature = torch.frombuffer(bytearray(answer.feature), dtype=torch.float32)
            learned = self.engine.feedback_answer(feature, index, answer.method, served_ok)
            if learned.get("fallback"):  # Redis away: applied when it is back, counted like predictions
                self.metrics.observe_fallback(self.model.name, answer.method, learned["fallback"])
            reply["learned"] = learned
        return reply


def _items(request: Decoded) -> list[Predict]:
    """The images a decoded prediction request asks for (one, or an OIP request's list)."""
    return [request] if isinstance(request, Predict) else list(request.items)  # type: ignore[union-attr]


# --- building a worker from a deployment config ------------------------------------------------------
def build_service(config: Mapping[str, Any], *, model_name: str, model_version: str = "1.0",
                  model_dir: Path | str = ".", device: torch.device | None = None,
                  metrics: ServingMetrics | None = None, response_timeout_s: float | None = None,
                  admin: AdminAuth | None = None) -> Service:
    """Load CLIP, the label set and the Engine as the `tta:` section of an archive's config says.

    The same keys serve both servers: TorchServe reads them from the archive's model-config.yaml,
    `tta serve` builds them from its flags. Does not warm up or start an exporter (see `warm_up`,
    `start_exporter`), so an adapter can report "not ready" until both are done.
    """
    from tta.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from tta.models import load_model, resolve_device
    from tta.text import LabelSet, load_labels

    model_dir = Path(model_dir)
    budget = Budget.for_worker(config, response_timeout_s)  # a deadline past the worker timeout loses the batch
    device = device or resolve_device(config.get("device"))
    configure_state(config, model_name)
    if metrics is None:
        metrics = ServingMetrics()
    watch_state_rejections(metrics, model_name)  # before the Engine: the drift reference restores as it is built
    labels_file = config.get("labels_file")
    names = load_labels(model_dir / labels_file) if labels_file else load_labels(config["labels"])
    labels = LabelSet.create(names, templates=config.get("templates", "single"))
    spec = str(config.get("model", "tiny-random"))
    clip = load_model(spec, device=device)
    if config.get("image_encoder_onnx"):  # exported at archive time; used only where measured faster
        from tta.onnx_encoder import enable_if_faster

        enable_if_faster(clip, model_dir / str(config["image_encoder_onnx"]), mode=str(config.get("onnx", "auto")))
    engine = Engine(
        clip, labels,
        default_method=str(config.get("default_method", "zeroshot")),
        method_defaults=config.get("method_defaults") or {},
        max_labels=int(config.get("max_labels", 1000)),
        seed=int(config.get("seed", 0)),
        budget=budget,
        drift=DriftConfig.from_mapping(config),
        max_batch_images=int(config.get("max_batch_images", 256)),
    )
    metrics.observe_worker_start(model_name)
    metrics.known_methods = frozenset(engine.methods) | ({"drift"} if engine.drift is not None else set())
    stream = [name for name in engine.methods if get_method_class(name).scope == "stream"]
    metrics.declare_state_owners(model_name, [*stream, *(["drift"] if engine.drift is not None else [])])
    limits = Limits(max_pixels=int(config.get("max_image_pixels", DEFAULT_MAX_PIXELS)),
                    max_bytes=int(config.get("max_image_bytes", DEFAULT_MAX_BYTES)))
    return Service(engine, metrics, ModelInfo(model_name, model_version, spec), limits, budget=budget,
                   admin=admin or AdminAuth.from_config(config),
                   max_inflight=int(os.environ.get("TTA_MAX_INFLIGHT") or config.get("max_inflight") or 0),
                   answers=AnswerMemory.from_config(config, labels.names))


def watch_state_rejections(metrics: ServingMetrics, model_name: str) -> Callable[[], None]:
    """Count what stream-state validation refuses in this worker (`tta.state.host.on_rejected`) under
    `model_name`; the deployment namespace is the served model's name (`configure_state`)."""
    deployment = tta_state.current_config().deployment

    def count(event: tta_state.Rejection) -> None:
        if event.deployment == deployment:
            metrics.observe_state_rejected(model_name, event.owner, event.source)

    return tta_state.on_rejected(count)


def configure_state(config: Mapping[str, Any], model_name: str) -> None:
    """Stream-method state: namespaced by the served model; backend from the archive config or env.

    TTA_STATE_URL wins over the archive's state_url (a deployment supplies its Redis, e.g. from a
    Secret); the URL is only ever logged masked.
    """
    changes: dict[str, Any] = {"deployment": model_name}
    for key, name in (("state_dir", "directory"), ("state_sync", "sync"), ("state_every", "every"),
                      ("state_url", "url"), ("state_timeout_ms", "timeout_ms")):
        if config.get(key) not in (None, ""):
            changes[name] = config[key]
    if os.environ.get("TTA_STATE_URL"):
        changes["url"] = os.environ["TTA_STATE_URL"]
    tta_state.configure(**changes)
    state = tta_state.current_config()
    log.info("stream state: %s backend%s", state.backend, f" at {tta_state.mask_url(state.url)}" if state.url else "")


def start_exporter(config: Mapping[str, Any], metrics: ServingMetrics) -> Exporter | None:
    """The tta /metrics exporter on TTA_METRICS_PORT (or the config's metrics_port); 0 disables it."""
    port = int(os.environ.get("TTA_METRICS_PORT", config.get("metrics_port", 8083)))
    address = os.environ.get("TTA_METRICS_ADDRESS", config.get("metrics_address", "127.0.0.1"))
    if port <= 0:
        return None
    return Exporter(port, address, registry=metrics.registry).start()


def warm_up(service: Service) -> None:
    """Build the default label set's text features before the first request, not during it."""
    image = torch.full((3, 32, 32), 128, dtype=torch.uint8)
    engine = service.engine
    drift, engine.drift = engine.drift, None  # a grey square is no traffic: keep it out of drift
    try:
        engine.predict(image, method="zeroshot", top_k=1)
    finally:
        engine.drift = drift
