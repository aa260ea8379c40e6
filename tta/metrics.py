"""Every Prometheus instrument of the serving layer, named in one place.

The math code never imports this module: methods record stage times in a `StageTimer` and return
probabilities and features; the edge (the TorchServe handler today, any server tomorrow) feeds
them to `ServingMetrics`. Instruments follow prometheus-client naming: seconds for time,
`_total` counters, and buckets chosen for this workload (a few ms for zero-shot on a GPU up to
tens of seconds for TPT with many views on a CPU).

Across processes (TorchServe runs one Python worker per model copy) the values live in
prometheus-client's multiprocess mode: every worker writes memory-mapped files under
``PROMETHEUS_MULTIPROC_DIR`` and one exporter, started by whichever worker binds the port first,
serves the merged view. That environment variable must be set before `prometheus_client` is
first imported, so the serving edge sets it (the handler defaults it to a directory keyed by the
TorchServe frontend's process id, shared by that server's workers and by no other server).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)

if TYPE_CHECKING:  # torch is imported where tensors are handled, so exporters stay light
    import torch

    from tta.drift import DriftSignals

log = logging.getLogger(__name__)

# 2.5 ms ... 60 s: zero-shot ViT-B/16 on a GPU sits in the first buckets, TPT/DiffTPT on a CPU in the last.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)
# Normalised entropy (H / log C) and top-1 probability both live in [0, 1].
UNIT_BUCKETS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))
CONFIDENCE_BUCKETS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Cosine distance lies in [0, 2]; in-distribution CLIP images stay well below 0.5 from their mean.
SHIFT_BUCKETS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0)

STAGES: tuple[str, ...] = ("decode", "text", "augment", "generate", "encode", "adapt", "predict", "total")
OUTCOMES: tuple[str, ...] = ("ok", "client_error", "server_error", "fallback")
# Why an answer fell back to a cheaper path. A fixed set keeps the label bounded: methods report
# free text in the response's "fallback" field, the metric maps anything unknown to "other".
FALLBACK_REASONS: tuple[str, ...] = (
    "deadline", "state_unavailable", "numerical", "over_budget", "generator_unavailable", "generation_disabled",
    "oom", "state_invalid", "other",
)
# Where a value refused at the door of stream state came from (tta.state.host.REJECTION_SOURCES).
STATE_REJECTION_SOURCES: tuple[str, ...] = ("request", "log", "snapshot", "import")
_FALLBACK_ALIASES = {"deadline_exceeded": "deadline"}
UNKNOWN_METHOD = "__unknown__"  # method label of requests that named a method the server does not have
CUSTOM_LABELS = "__request_labels__"  # class label used when a request brought its own label set
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LAZY_LOCK = threading.Lock()


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def fallback_reason(value: object) -> str:
    """A response's `fallback` value as one of `FALLBACK_REASONS` (never a request-derived string)."""
    reason = _FALLBACK_ALIASES.get(str(value), str(value))
    return reason if reason in FALLBACK_REASONS else "other"


def normalized_entropy(probs: torch.Tensor) -> float:
    """Entropy over log(C): 0 = one-hot, 1 = uniform; comparable across label-set sizes."""
    p = probs.detach().float().clamp_min(1e-12)
    classes = p.shape[-1]
    if classes < 2:
        return 0.0
    return float(-(p * p.log()).sum() / math.log(classes))


class ServingMetrics:
    """The handler-side instruments. One instance per process; registry defaults to a private one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram(
            "tta_stage_duration_seconds",
            "Time per request stage (decode, text, augment, generate, encode, adapt, predict, total)",
            ["model", "method", "stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "tta_requests", "Requests by outcome (ok, client_error, server_error, fallback)",
            ["model", "method", "outcome"], registry=r,
        )
        self.entropy = Histogram(
            "tta_prediction_entropy_ratio",
            "Prediction entropy divided by log(#classes), zero-shot and adapted",
            ["model", "method", "kind"], buckets=UNIT_BUCKETS, registry=r,
        )
        self.confidence = Histogram(
            "tta_prediction_confidence", "Top-1 probability, zero-shot and adapted",
            ["model", "method", "kind"], buckets=CONFIDENCE_BUCKETS, registry=r,
        )
        self.predictions = Counter(
            "tta_predictions", "Predicted top-1 class (deployment label set; request label sets pooled)",
            ["model", "method", "label"], registry=r,
        )
        self.changed = Counter(
            "tta_adaptation_changed", "Predictions where adaptation changed the zero-shot top-1 answer",
            ["model", "method"], registry=r,
        )
        self.embedding_shift = Histogram(
            "tta_embedding_shift_cosine_distance",
            "Cosine distance of each image feature to the deployment's drift reference mean (tta.drift)",
            ["model"], buckets=SHIFT_BUCKETS, registry=r,
        )
        # Drift gauges (tta.drift): each worker measures its own sliding window against the shared
        # reference; the freshest worker's value is the deployment's (livemostrecent), so an idle
        # worker's old window never masks or fakes a shift. NaN = not measurable yet.
        def drift_gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["model"], registry=r, multiprocess_mode="livemostrecent")

        self.drift_gauges = {
            "embedding_shift": drift_gauge(
                "tta_drift_embedding_shift", "Cosine distance of the sliding window's mean image embedding to the reference mean"),
            "embedding_shift_expected": drift_gauge(
                "tta_drift_embedding_shift_expected", "Embedding shift expected from sampling noise alone (no drift)"),
            "class_divergence": drift_gauge(
                "tta_drift_class_divergence", "Jensen-Shannon divergence (bits) of window vs reference zero-shot predicted classes"),
            "class_divergence_expected": drift_gauge(
                "tta_drift_class_divergence_expected", "Class-mix divergence expected from sampling noise alone (no drift)"),
            "entropy_shift": drift_gauge(
                "tta_drift_entropy_shift", "Window minus reference mean zero-shot entropy / log(#classes) (positive: less sure)"),
            "confidence_shift": drift_gauge(
                "tta_drift_confidence_shift", "Reference minus window mean zero-shot top-1 probability (positive: less sure)"),
            "window_samples": drift_gauge("tta_drift_window_samples", "Answered images in the worker's drift window"),
            "reference_samples": drift_gauge("tta_drift_reference_samples", "Images captured into the drift reference"),
            "reference_ready": drift_gauge("tta_drift_reference_ready", "1 once the drift reference is captured and frozen"),
        }
        self._lazy_instruments: dict[str, Any] = {}  # see `_lazy`
        self._declared: set[tuple[str, str]] = set()  # (model, method) with zero-initialised counters
        # The server's method names (the registry, plus "drift"): a request naming anything else is
        # counted under UNKNOWN_METHOD, so no label value comes from request data. None = trust callers.
        self.known_methods: frozenset[str] | None = None
        self.worker_starts = Counter(
            "tta_worker_starts", "Worker processes started (TorchServe restarts dead workers: increase() counts restarts)",
            ["model"], registry=r,
        )
        self.state_unavailable = Counter(
            "tta_state_unavailable", "Requests whose stream state could not be reached (refused, or answered by a fallback)",
            ["model", "method"], registry=r,
        )
        self.fallbacks = Counter(
            "tta_fallbacks", "Answers that fell back to a cheaper path, by reason (" + ", ".join(FALLBACK_REASONS) + ")",
            ["model", "method", "reason"], registry=r,
        )
        self.state_actions = Counter(
            "tta_state_actions", "Stream-state operations (state, reset, export, import, feedback) by outcome",
            ["model", "method", "action", "outcome"], registry=r,
        )
        self.state_rejected = Counter(
            "tta_state_rejected", "Operations, log entries, snapshots and imports refused by stream-state validation, "
            "by source (" + ", ".join(STATE_REJECTION_SOURCES) + "); the state is unchanged by each",
            ["model", "method", "source"], registry=r,
        )
        self.labelled_answers = Counter(
            "tta_labelled_answers",
            "Earlier answers labelled by a client later: whether zero-shot and the served answer were right",
            ["model", "method", "zeroshot_correct", "served_correct"], registry=r,
        )
        self.state_entries = Gauge(
            "tta_stream_state_entries", "Entries held by a stream method's state (cache, buffer, support set)",
            ["model", "method"], registry=r, multiprocess_mode="max",
        )
        self.in_flight = Gauge(
            "tta_requests_in_flight", "Requests a worker is processing now (a batch counts each of its requests)",
            ["model"], registry=r, multiprocess_mode="livesum",  # a dead worker's requests stop counting
        )

    @contextlib.contextmanager
    def track_in_flight(self, model: str, count: int = 1) -> Iterator[None]:
        """Count `count` requests as in flight for the block: a pod's preStop drain waits for zero."""
        gauge = self.in_flight.labels(model)
        gauge.inc(count)
        try:
            yield
        finally:
            gauge.dec(count)

    def observe_state(self, model: str, method: str, summary: Mapping[str, object]) -> None:
        """Cache fill of a stream method, from its `state_summary()`."""
        total = summary.get("total")
        if isinstance(total, int | float):
            self.state_entries.labels(model, method).set(float(total))

    def observe_fallback(self, model: str, method: str, reason: object) -> None:
        """One answer served by a fallback path; `reason` is mapped onto `FALLBACK_REASONS`."""
        reason = fallback_reason(reason)
        self.fallbacks.labels(model, method, reason).inc()
        if reason == "state_unavailable":
            self.state_unavailable.labels(model, method).inc()

    def declare_state_owners(self, model: str, owners: Iterable[str]) -> None:
        """Zeros for every stream-state owner's rejection counter, so the first refusal is an increase."""
        for owner in owners:
            for source in STATE_REJECTION_SOURCES:
                self.state_rejected.labels(model, owner, source)

    def observe_state_rejected(self, model: str, method: str, source: str) -> None:
        """One refusal by stream-state validation (`tta.state.host.on_rejected`)."""
        source = source if source in STATE_REJECTION_SOURCES else "log"
        self.state_rejected.labels(model, self.method_label(method), source).inc()

    def observe_worker_start(self, model: str) -> None:
        self.worker_starts.labels(model).inc()

    def observe_state_unavailable(self, model: str, method: str) -> None:
        """A request refused because its stream state is out of reach (503)."""
        self.state_unavailable.labels(model, self.method_label(method)).inc()

    def observe_state_action(self, model: str, method: str, action: str, outcome: str) -> None:
        self.state_actions.labels(model, self.method_label(method), action, outcome).inc()

    def observe_labelled_answer(self, model: str, method: str, zeroshot_correct: bool, served_correct: bool) -> None:
        """A label that arrived for an earlier answer (the alert compares the discordant pairs)."""
        self.labelled_answers.labels(model, self.method_label(method), "true" if zeroshot_correct else "false",
                                     "true" if served_correct else "false").inc()

    def method_label(self, method: str) -> str:
        """`method` when the server has it, else UNKNOWN_METHOD (bounded label values)."""
        if self.known_methods is None or method in self.known_methods:
            return method
        return UNKNOWN_METHOD

    def observe_drift(self, model: str, signals: DriftSignals | None) -> None:
        """The drift gauges after one answer (`Prediction.drift`); None = this worker has no reading."""
        if signals is None:
            return
        for name, gauge in self.drift_gauges.items():
            value = getattr(signals, name)
            gauge.labels(model).set(math.nan if value is None else float(value))
        if signals.sample_distance is not None:
            self.embedding_shift.labels(model).observe(signals.sample_distance)

    def observe_stages(self, model: str, method: str, timings_ms: Mapping[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage_seconds.labels(model, method, stage).observe(max(ms, 0.0) / 1000.0)

    def observe_outcome(self, model: str, method: str, outcome: str) -> None:
        method = self.method_label(method)
        self.requests.labels(model, method, outcome).inc()
        if (model, method) not in self._declared:
            self._declare(model, method)

    def _declare(self, model: str, method: str) -> None:
        """Export zeros for the rare counters, so rate() sees their first increment (a series that
        appears at 1 has no earlier sample to rise from) and ratios have a 0 to show."""
        self._declared.add((model, method))
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(model, method, reason)
        self.state_unavailable.labels(model, method)
        for source in STATE_REJECTION_SOURCES:
            self.state_rejected.labels(model, method, source)
        for zeroshot in ("true", "false"):  # zeros before the first label arrives (rate() and the alert)
            for served in ("true", "false"):
                self.labelled_answers.labels(model, method, zeroshot, served)
        self.embedding_shift.labels(model)  # empty until the drift reference is captured

    def observe_prediction(
        self,
        model: str,
        method: str,
        label: str,
        probs: torch.Tensor,
        zeroshot_probs: torch.Tensor,
        changed: bool,
        drift: DriftSignals | None = None,
        custom_labels: bool = False,
    ) -> None:
        """Confidence, class and adaptation signals of one answered request (+ drift gauges)."""
        for kind, p in (("adapted", probs), ("zeroshot", zeroshot_probs)):
            self.entropy.labels(model, method, kind).observe(normalized_entropy(p))
            self.confidence.labels(model, method, kind).observe(float(p.max()))
        self.predictions.labels(model, method, CUSTOM_LABELS if custom_labels else label).inc()
        if changed:
            self.changed.labels(model, method).inc()
        else:
            self.changed.labels(model, method)  # export the zero so rate() has a series
        self.observe_drift(model, drift)

    def observe_tier(self, model: str, method: str, tier: str, escalated: bool) -> None:
        """Which tier of an escalating method (`auto`) answered: the dashboard's escalation rate is
        sum(rate(...{escalated="true"})) / sum(rate(...))."""
        counter = self._lazy("tier_answers", lambda: Counter(
            "tta_tier_answers", "Answers of an escalating method (auto) by the tier that answered",
            ["model", "method", "tier", "escalated"], registry=self.registry,
        ))
        counter.labels(model, method, tier, "true" if escalated else "false").inc()

    def observe_batch(self, model: str, requests: int, shared: int) -> None:
        """One served batch: how many requests it held and how many shared an encoder pass."""
        histogram = self._lazy("batch_requests", lambda: Histogram(
            "tta_batch_requests", "Requests per served batch", ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry,
        ))
        counter = self._lazy("batch_shared", lambda: Counter(
            "tta_batch_shared_encoding_requests", "Requests whose images were encoded in a pass shared with others",
            ["model"], registry=self.registry,
        ))
        histogram.labels(model).observe(requests)
        counter.labels(model).inc(shared)

    def _lazy(self, name: str, make: Callable[[], Any]) -> Any:
        """Instruments added after the constructor's set, created on first use (one per registry)."""
        with _LAZY_LOCK:
            if name not in self._lazy_instruments:
                self._lazy_instruments[name] = make()
            return self._lazy_instruments[name]

    def render(self) -> bytes:
        """Text exposition of this process (or, in multiprocess mode, of all workers)."""
        return generate_latest(scrape_registry(self.registry))


def scrape_registry(local: CollectorRegistry) -> CollectorRegistry:
    """What an exporter serves: the merged files of all workers in multiprocess mode, else `local`."""
    if not multiprocess_enabled():
        return local
    registry = CollectorRegistry()
    LiveMultiProcessCollector(registry)
    return registry


class LiveMultiProcessCollector(multiprocess.MultiProcessCollector):
    """The merged view, after dropping the `live*` gauges of worker processes that have exited.

    prometheus-client only forgets a dead process's live gauges when someone calls
    `mark_process_dead`; TorchServe restarts crashed workers without telling us, so the exporter
    checks at each scrape (pids of one server's directory; a reused pid keeps a stale value at worst).
    """

    _LIVE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")

    def collect(self):  # type: ignore[no-untyped-def]
        for entry in os.listdir(self._path):
            match = self._LIVE_FILE.match(entry)
            if match and not _alive(int(match.group(1))):
                multiprocess.mark_process_dead(int(match.group(1)), self._path)
        return super().collect()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Exporter:
    """Serve /metrics on `address:port` from whichever worker binds it; the others keep trying.

    TorchServe restarts dead workers, so the worker holding the port can disappear; retrying every
    `retry_s` seconds lets a surviving worker take the port over.
    """

    def __init__(self, port: int, address: str = "127.0.0.1", registry: CollectorRegistry | None = None,
                 retry_s: float = 5.0) -> None:
        self.port = port
        self.address = address
        self.registry = scrape_registry(registry or CollectorRegistry())
        self.retry_s = retry_s
        self.serving = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Exporter:
        if self.try_bind():
            return self
        self._thread = threading.Thread(target=self._retry, name="tta-metrics-exporter", daemon=True)
        self._thread.start()
        return self

    def try_bind(self) -> bool:
        try:
            start_http_server(self.port, addr=self.address, registry=self.registry)
        except OSError as exc:
            log.debug("metrics port %s:%s busy (%s); another worker serves it", self.address, self.port, exc)
            return False
        self.serving.set()
        log.info("serving tta metrics on http://%s:%s/metrics", self.address, self.port)
        return True

    def _retry(self) -> None:
        while not self._stop.wait(self.retry_s):
            if self.try_bind():
                return

    def stop(self) -> None:
        self._stop.set()


def prepare_multiprocess_dir(path: str | os.PathLike[str], wipe: bool = False) -> Path:
    """Create the shared directory; `wipe` drops files of a previous server (do it once, at start)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    if wipe:
        for item in directory.glob("*.db"):
            item.unlink(missing_ok=True)
    return directory


def sample_values(text: str, name: str, labels: Mapping[str, str] | None = None) -> Iterable[float]:
    """Values of samples called `name` whose labels include `labels` (for tests and debugging)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = dict(labels or {})
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in wanted.items()):
                yield sample.value
