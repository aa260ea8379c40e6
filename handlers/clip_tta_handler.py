"""TorchServe adapter: TorchServe's request rows/context in, `tta.serving` service, status codes out.

Thin on purpose: request formats, the core-error -> status mapping and metrics live in
`tta.serving` (codec + service), shared with the KServe adapter, so both servers answer alike.
This file only knows TorchServe's shapes: the per-worker context, the rows of a batch, headers
and per-request status codes. One answer per request of a TorchServe batch; a failing request
never fails its neighbours. Request forms are documented in `tta.serving.codec`.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The archive ships the `tta` package next to this file; prefer it over any installed copy so
# the code that runs is the code that was archived.
_HERE = Path(__file__).resolve().parent
if (_HERE / "tta" / "__init__.py").is_file() and str(_HERE) not in sys.path[:1]:
    sys.path.insert(0, str(_HERE))

# prometheus-client picks single- or multi-process storage when it is first imported, so the
# shared directory must be known before tta.metrics is. One directory per TorchServe frontend.
os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", os.path.join(tempfile.gettempdir(), f"clip_tta_metrics_{os.getppid()}")
)
Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)

import torch  # noqa: E402
from ts.torch_handler.base_handler import BaseHandler  # noqa: E402

from tta.models import resolve_device  # noqa: E402
from tta.serving.admin import AdminAuth, torchserve_key_file  # noqa: E402
from tta.serving.service import Reply, build_service, start_exporter, warm_up  # noqa: E402

log = logging.getLogger(__name__)


# TorchServe requires exactly one class in this module: helpers are functions.
class ClipTTAHandler(BaseHandler):
    """One worker: a `tta.serving.Service` (CLIP, labels, Engine, metrics) and an exporter."""

    def initialize(self, context: Any) -> None:
        config = dict((getattr(context, "model_yaml_config", None) or {}).get("tta") or {})
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        device = resolve_device(config.get("device"), gpu_id=int(gpu_id) if gpu_id is not None else None)
        if device.type == "cuda" and gpu_id is None:
            device = torch.device("cpu")  # the frontend gave this worker no GPU
        manifest_model = (context.manifest or {}).get("model", {})
        self.service = build_service(
            config, model_name=str(context.model_name), model_version=str(manifest_model.get("modelVersion", "1.0")),
            model_dir=Path(properties.get("model_dir") or "."), device=device,
            response_timeout_s=(getattr(context, "model_yaml_config", None) or {}).get("responseTimeout"),
            admin=AdminAuth.from_config(config, key_file=torchserve_key_file()),  # the management key
        )
        self.engine, self.metrics = self.service.engine, self.service.metrics
        self.exporter = start_exporter(config, self.metrics)
        if config.get("warmup", True):
            warm_up(self.service)
        self.context = context
        self.initialized = True
        log.info("clip-tta worker ready: model=%s clip=%s device=%s labels=%d default_method=%s",
                 self.service.model.name, self.service.model.clip, device, len(self.engine.labels),
                 self.engine.default_method)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        """One JSON string per request; errors set that request's status only."""
        if len(data) > 1:
            log.info("batch of %d requests", len(data))
        with self.metrics.track_in_flight(self.service.model.name, len(data)):
            replies = self.service.handle_batch([(_body(row), _lower_headers(context, i)) for i, row in enumerate(data)])
            return [_answer(context, i, reply) for i, reply in enumerate(replies)]


def _answer(context: Any, idx: int, reply: Reply) -> str:
    context.set_response_content_type(idx, "application/json")
    for name, value in reply.headers.items():
        context.set_response_header(idx, name, value)
    if reply.failure is not None:
        context.set_response_status(reply.status, reply.failure.phrase, idx)
        log.info("request %s -> %d", context.get_request_id(idx), reply.status)
    return reply.text()


def _body(row: Mapping[str, Any]) -> Any:
    """TorchServe puts the body under 'data' or 'body' (or a multipart field name); None if empty."""
    for key in ("data", "body"):
        if key in row and row[key] is not None:
            return row[key]
    return next((v for v in row.values() if v is not None), None)


def _lower_headers(context: Any, idx: int) -> dict[str, str]:
    try:
        headers = context.get_all_request_header(idx) or {}
    except (AttributeError, IndexError, TypeError):
        return {}
    return {str(k).lower(): v for k, v in headers.items() if isinstance(v, str)}
