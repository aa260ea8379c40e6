"""The façade the edges call: one `Engine` per worker binds a frozen CLIP, the deployment's label
set and method defaults, and answers `predict(image, method=..., options=...)`.

The CLI and the TorchServe handler both use it, so a different server can wrap the same core
by decoding requests and calling `Engine.predict`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tta.drift import DriftConfig, DriftMonitor, DriftSignals
from tta.errors import BadRequest
from tta.methods.base import Method, MethodInput, get_method_class, list_methods
from tta.models import ClipModel
from tta.text import LabelSet, TextFeatureCache
from tta.timing import StageTimer

log = logging.getLogger(__name__)

MAX_TOP_K = 100


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

    def to_dict(self) -> dict[str, Any]:
        out = {
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
    ) -> None:
        self.clip = clip
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
                impl = cls(self.clip, defaults)
                bind = getattr(impl, "bind_deployment", None)
                if bind is not None:  # stream state: the deployment's labels, and its classifier for replayed ops
                    bind(self.labels.names, lambda: self.text_cache.get(self.clip, self.labels))
                self._methods[name] = impl
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
    ) -> Prediction:
        """Classify one decoded image (uint8 [3, H, W]) with `method`, adapting as it does."""
        start = time.perf_counter()
        name = method or self.default_method
        impl = self.method(name)
        opts = impl.parse_options(options)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise BadRequest(f"top_k must be an integer in [1, {MAX_TOP_K}]", code="bad_options")
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise BadRequest("image must be a uint8 RGB tensor [3, H, W]", code="not_an_image")
        label_set = self.resolve_labels(labels)
        timer = StageTimer(self.clip.device)
        generator = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
        with self._lock:  # one request at a time per worker: methods share prompts and caches
            with timer.stage("text"):
                text_features = self.text_cache.get(self.clip, label_set)
            request = MethodInput(
                image=image, labels=label_set, text_features=text_features, options=opts,
                generator=generator, timer=timer, is_default_labels=label_set is self.labels,
            )
            output = impl.predict(request)
        timer.add("total", (time.perf_counter() - start) * 1000.0)
        prediction = self._to_prediction(name, label_set, output, top_k, timer)
        self.observe_drift(prediction, default_labels=label_set is self.labels)
        return prediction

    def observe_drift(self, prediction: Prediction, default_labels: bool) -> None:
        """Feed one answer to the drift monitor (monitoring never fails a request: errors are logged)."""
        if self.drift is None:
            return
        try:
            prediction.drift = self.drift.observe(prediction.image_features, prediction.zeroshot_probs, default_labels)
        except Exception:
            log.exception("drift monitoring failed for one request; the answer is unaffected")

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

    def feedback(self, image: torch.Tensor, label: str, method: str, seed: int | None = None) -> dict[str, Any]:
        """A labelled example for `method` (GDA support set, online accuracy); unknown labels are 4xx."""
        if label not in self.labels.names:
            raise BadRequest(f"unknown label '{label}': not in the deployment's label set", code="unknown_label")
        impl = self.method(method)
        timer = StageTimer(self.clip.device)
        generator = torch.Generator().manual_seed(self.seed if seed is None else int(seed))
        with self._lock:
            text_features = self.text_cache.get(self.clip, self.labels)
            request = MethodInput(image=image, labels=self.labels, text_features=text_features,
                                  options=impl.defaults, generator=generator, timer=timer)
            return impl.feedback(request, self.labels.names.index(label))

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
            image_features=feats, extra=dict(output.extra),
        )
