"""TorchServe handler: decode -> `tta.Engine` -> encode, and core errors -> HTTP codes.

Thin on purpose: the model math, label sets and method options live in `tta`, so the same core
can move under another server (KServe, LitServe, FastAPI) without change. This file only knows
TorchServe's request/context shapes.

Request forms on ``POST /predictions/{model}`` (one answer per request of a TorchServe batch;
a failing request never fails its neighbours):
- raw image bytes (JPEG/PNG/WebP/...), answered with the deployment's default method;
- JSON ``{"image": "<base64>", "method", "top_k", "labels", "options", "seed"}``;
- JSON ``{"action": "state"|"reset"|"export"|"import"|"feedback", "method": ..., ...}`` for
  stream-method state;
- Open Inference Protocol v2 bodies (``{"inputs": [...]}``, also through
  ``POST /v2/models/{model}/infer``), with the image base64 in a BYTES input or, with
  tritonclient's binary tensor extension, as raw bytes after the JSON header.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import struct
import sys
import tempfile
import time
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

from tta import state as tta_state  # noqa: E402
from tta.engine import Engine, Prediction  # noqa: E402
from tta.errors import BadRequest, ModelUnavailable, Unavailable  # noqa: E402
from tta.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_image  # noqa: E402
from tta.metrics import Exporter, ServingMetrics  # noqa: E402
from tta.models import load_model, resolve_device  # noqa: E402
from tta.text import LabelSet, load_labels  # noqa: E402

log = logging.getLogger(__name__)

JSON_FIELDS = frozenset({"image", "method", "top_k", "labels", "options", "seed"})
ACTIONS = ("state", "reset", "export", "import", "feedback")
STATUS_BY_CODE = {"image_too_large": 413, "request_too_large": 413}
PHRASES = {400: "Bad Request", 413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}
OIP_LENGTH_HEADER = "inference-header-content-length"


def _bad(message: str, code: str) -> BadRequest:
    return BadRequest(message, code=code)


# TorchServe requires exactly one class in this module: helpers are functions.
class ClipTTAHandler(BaseHandler):
    """One worker: a frozen CLIP, the deployment's labels and method defaults, an exporter."""

    def initialize(self, context: Any) -> None:
        config = dict((getattr(context, "model_yaml_config", None) or {}).get("tta") or {})
        properties = context.system_properties
        model_dir = Path(properties.get("model_dir") or ".")
        gpu_id = properties.get("gpu_id")
        self.device = resolve_device(config.get("device"), gpu_id=int(gpu_id) if gpu_id is not None else None)
        if self.device.type == "cuda" and gpu_id is None:
            self.device = torch.device("cpu")  # the frontend gave this worker no GPU
        self.model_name = str(context.model_name)
        manifest_model = (context.manifest or {}).get("model", {})
        self.model_version = str(manifest_model.get("modelVersion", "1.0"))
        self.max_pixels = int(config.get("max_image_pixels", DEFAULT_MAX_PIXELS))
        self.max_bytes = int(config.get("max_image_bytes", DEFAULT_MAX_BYTES))
        self.spec = str(config.get("model", "tiny-random"))

        self._configure_state(config)
        labels_file = config.get("labels_file")
        names = load_labels(model_dir / labels_file) if labels_file else load_labels(config["labels"])
        labels = LabelSet.create(names, templates=config.get("templates", "single"))
        clip = load_model(self.spec, device=self.device)
        if config.get("image_encoder_onnx"):  # exported at archive time; used only where measured faster
            from tta.onnx_encoder import enable_if_faster

            enable_if_faster(clip, model_dir / str(config["image_encoder_onnx"]), mode=str(config.get("onnx", "auto")))
        self.engine = Engine(
            clip, labels,
            default_method=str(config.get("default_method", "zeroshot")),
            method_defaults=config.get("method_defaults") or {},
            max_labels=int(config.get("max_labels", 1000)),
            seed=int(config.get("seed", 0)),
        )
        self.metrics = ServingMetrics(drift_reference_size=int(config.get("drift_reference_size", 256)))
        self.exporter = self._start_exporter(config)
        if config.get("warmup", True):
            self._warm_up()
        self.context = context
        self.initialized = True
        log.info("clip-tta worker ready: model=%s clip=%s device=%s labels=%d default_method=%s",
                 self.model_name, self.spec, self.device, len(labels), self.engine.default_method)

    def _configure_state(self, config: Mapping[str, Any]) -> None:
        """Stream-method state: namespaced by the served model; backend from the archive config or env.

        TTA_STATE_URL wins over the archive's state_url (a deployment supplies its Redis, e.g. from
        a Secret); the URL is only ever logged masked.
        """
        changes: dict[str, Any] = {"deployment": self.model_name}
        for key, field in (("state_dir", "directory"), ("state_sync", "sync"), ("state_every", "every"),
                           ("state_url", "url"), ("state_timeout_ms", "timeout_ms")):
            if config.get(key) not in (None, ""):
                changes[field] = config[key]
        if os.environ.get("TTA_STATE_URL"):
            changes["url"] = os.environ["TTA_STATE_URL"]
        tta_state.configure(**changes)
        state = tta_state.current_config()
        log.info("stream state: %s backend%s", state.backend,
                 f" at {tta_state.mask_url(state.url)}" if state.url else "")

    def _start_exporter(self, config: Mapping[str, Any]) -> Exporter | None:
        port = int(os.environ.get("TTA_METRICS_PORT", config.get("metrics_port", 8083)))
        address = os.environ.get("TTA_METRICS_ADDRESS", config.get("metrics_address", "127.0.0.1"))
        if port <= 0:
            return None
        return Exporter(port, address, registry=self.metrics.registry).start()

    def _warm_up(self) -> None:
        """Build the default label set's text features before the first request, not during it."""
        image = torch.full((3, 32, 32), 128, dtype=torch.uint8)
        self.engine.predict(image, method="zeroshot", top_k=1)

    # --- TorchServe entry point --------------------------------------------------------------
    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        """One JSON string per request; errors set that request's status only."""
        if len(data) > 1:
            log.info("batch of %d requests", len(data))
        return [self._handle_one(idx, row, context) for idx, row in enumerate(data)]

    def _handle_one(self, idx: int, row: Mapping[str, Any], context: Any) -> str:
        start = time.perf_counter()
        method = self.engine.default_method
        context.set_response_content_type(idx, "application/json")
        try:
            headers = _lower_headers(context, idx)
            body = _payload(row)
            payload, decode_ms = self._decode(body, headers)
            if isinstance(payload, dict) and "inputs" in payload:
                method = str((payload.get("parameters") or {}).get("method") or method)
                result, outcome = self._oip(payload, start, decode_ms)
            elif isinstance(payload, dict) and "action" in payload:
                method = str(payload.get("method") or method)
                result, outcome = self._action(payload), None
            else:
                if isinstance(payload, dict):
                    method = str(payload.get("method") or method)
                result, outcome = self._predict_request(payload, start, decode_ms)
        except (BadRequest, ModelUnavailable, Unavailable) as exc:
            return self._error(idx, context, method, exc)
        except Exception:  # never let one request take its batch neighbours down
            log.exception("request %s failed unexpectedly", context.get_request_id(idx))
            context.set_response_status(500, PHRASES[500], idx)
            self.metrics.observe_outcome(self.model_name, method, "server_error")
            return json.dumps({"error": "internal", "message": "internal error; see the server log"})
        if outcome is not None:
            self.metrics.observe_outcome(self.model_name, method, outcome)
        return json.dumps(result, default=_json_default)

    def _error(self, idx: int, context: Any, method: str, exc: Exception) -> str:
        if isinstance(exc, BadRequest):
            status, code, message = STATUS_BY_CODE.get(exc.code, 400), exc.code, str(exc)
        else:
            status, code, message = 503, getattr(exc, "code", "unavailable"), str(exc)
        context.set_response_status(status, PHRASES.get(status, "Error"), idx)
        outcome = "client_error" if status < 500 else "server_error"
        self.metrics.observe_outcome(self.model_name, method, outcome)
        log.info("request %s -> %d %s: %s", context.get_request_id(idx), status, code, message)
        return json.dumps({"error": code, "message": message})

    # --- decoding ----------------------------------------------------------------------------
    def _decode(self, body: Any, headers: Mapping[str, str]) -> tuple[Any, float]:
        """Body -> raw image tensor, or a JSON object; times the image decode."""
        start = time.perf_counter()
        if isinstance(body, bytes | bytearray) and OIP_LENGTH_HEADER in headers:
            return self._oip_binary(bytes(body), headers[OIP_LENGTH_HEADER]), 0.0
        if isinstance(body, bytes | bytearray):
            content_type = headers.get("content-type", "")
            if "json" in content_type or bytes(body[:64]).lstrip()[:1] in (b"{", b"["):
                body = _parse_json(bytes(body))
            else:
                image = decode_image(body, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
                return image, (time.perf_counter() - start) * 1000.0
        if isinstance(body, str):
            body = _parse_json(body.encode("utf-8"))
        if not isinstance(body, dict):
            raise _bad("expected an image or a JSON object", code="bad_json")
        return body, 0.0

    def _image_field(self, value: Any) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        if not isinstance(value, str | bytes) or not value:
            raise _bad("'image' must be a non-empty base64 string", code="empty_body")
        if isinstance(value, str) and value.startswith("data:") and "," in value:
            value = value.split(",", 1)[1]  # data URLs from browsers
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad(f"'image' is not valid base64: {exc}", code="bad_base64") from exc
        image = decode_image(raw, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        return image, (time.perf_counter() - start) * 1000.0

    # --- predictions -------------------------------------------------------------------------
    def _predict_request(self, payload: Any, start: float, decode_ms: float) -> tuple[dict[str, Any], str]:
        if isinstance(payload, torch.Tensor):
            return self._predict(payload, {}, start, decode_ms)
        unknown = sorted(set(payload) - JSON_FIELDS)
        if unknown:
            raise _bad(f"unknown field(s) {unknown}; known: {sorted(JSON_FIELDS)}", code="unknown_field")
        if "image" not in payload:
            raise _bad("JSON requests need an 'image' field (base64)", code="empty_body")
        image, decode_ms = self._image_field(payload["image"])
        return self._predict(image, payload, start, decode_ms)

    def _predict(self, image: torch.Tensor, request: Mapping[str, Any], start: float,
                 decode_ms: float) -> tuple[dict[str, Any], str]:
        method = request.get("method") or self.engine.default_method
        if not isinstance(method, str):
            raise _bad("'method' must be a string", code="unknown_method")
        labels = request.get("labels")
        if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
            raise _bad("'labels' must be a list of strings", code="bad_labels")
        options = request.get("options")
        if options is not None and not isinstance(options, dict):
            raise _bad("'options' must be a JSON object", code="bad_options")
        seed = request.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _bad("'seed' must be an integer", code="bad_options")
        prediction = self.engine.predict(
            image, method=method, options=options, labels=labels, top_k=request.get("top_k", 5), seed=seed,
        )
        timings = {"decode": decode_ms, **prediction.timings_ms}
        timings["total"] = (time.perf_counter() - start) * 1000.0
        prediction.timings_ms = timings
        outcome = "fallback" if prediction.extra.get("fallback") else "ok"
        self._observe(prediction, custom_labels=labels is not None)
        return self._response(prediction), outcome

    def _observe(self, prediction: Prediction, custom_labels: bool) -> None:
        m = self.metrics
        m.observe_stages(self.model_name, prediction.method, prediction.timings_ms)
        m.observe_prediction(
            self.model_name, prediction.method, prediction.label, prediction.probs, prediction.zeroshot_probs,
            prediction.changed_by_adaptation, prediction.image_features, custom_labels=custom_labels,
        )
        if self.engine.method(prediction.method).scope == "stream":
            m.observe_state(self.model_name, prediction.method, self.engine.state_summary(prediction.method))
        if prediction.extra.get("fallback") == tta_state.STATE_UNAVAILABLE:
            m.observe_state_unavailable(self.model_name, prediction.method)

    def _response(self, prediction: Prediction) -> dict[str, Any]:
        return {**prediction.to_dict(), "model": self.model_name, "model_version": self.model_version,
                "clip_model": self.spec}

    # --- stream-state actions ----------------------------------------------------------------
    def _action(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        action = payload.get("action")
        method = payload.get("method") or self.engine.default_method
        if action not in ACTIONS:
            raise _bad(f"unknown action {action!r}; known: {list(ACTIONS)}", code="unknown_action")
        if not isinstance(method, str):
            raise _bad("'method' must be a string", code="unknown_method")
        outcome = "client_error"
        try:
            result = self._run_action(str(action), method, payload)
            outcome = "ok"
            if isinstance(result.get("state"), Mapping) and action != "export":
                self.metrics.observe_state(self.model_name, method, result["state"])
            return result
        finally:
            self.metrics.state_actions.labels(self.model_name, method, str(action), outcome).inc()

    def _run_action(self, action: str, method: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        engine = self.engine
        base = {"action": action, "method": method, "model": self.model_name, "model_version": self.model_version}
        if action == "state":
            return {**base, "state": engine.state_summary(method)}
        if action == "reset":
            engine.reset_state(method)
            return {**base, "reset": True, "state": engine.state_summary(method)}
        if action == "export":
            return {**base, "state": _encode_state(engine.export_state(method))}
        if action == "import":
            state = payload.get("state")
            if not isinstance(state, dict):
                raise _bad("'state' must be the JSON object an 'export' returned", code="bad_state")
            engine.import_state(method, _decode_state(state))
            return {**base, "imported": True, "state": engine.state_summary(method)}
        label = payload.get("label")
        if not isinstance(label, str):
            raise _bad("feedback needs 'label' (a class of the deployment's label set)", code="bad_labels")
        image, _ = self._image_field(payload.get("image"))
        seed = payload.get("seed")
        reply = engine.feedback(image, label, method, seed=seed if isinstance(seed, int) else None)
        if reply.get("fallback") == tta_state.STATE_UNAVAILABLE:
            self.metrics.observe_state_unavailable(self.model_name, method)
        return {**base, "feedback": reply}

    # --- Open Inference Protocol v2 -----------------------------------------------------------
    def _oip(self, payload: Mapping[str, Any], start: float, decode_ms: float) -> tuple[dict[str, Any], str]:
        """Classify every image of the BYTES inputs; answer `labels` and `probabilities` [n, k]."""
        params = payload.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad("'parameters' must be an object", code="bad_json")
        options = params.get("options")
        if isinstance(options, str):
            options = _parse_json(options.encode("utf-8"))
        request = {"method": params.get("method"), "top_k": params.get("top_k", 5), "seed": params.get("seed"),
                   "options": options}
        inputs = payload.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise _bad("OIP 'inputs' must be a non-empty list", code="bad_json")
        images = [image for item in inputs for image in self._oip_images(item)]
        if not images:
            raise _bad("no image in the OIP inputs", code="empty_body")
        labels, probs, outcome = [], [], "ok"
        for image in images:
            prediction_start = time.perf_counter()
            if isinstance(image, torch.Tensor):
                tensor = image
            else:
                tensor, decode_ms = self._image_field(image)
            answer, status = self._predict(tensor, request, prediction_start, decode_ms)
            outcome = "fallback" if status == "fallback" else outcome
            labels.append([t["label"] for t in answer["top_k"]])
            probs.append([t["score"] for t in answer["top_k"]])
        k = len(labels[0])
        response = {
            "model_name": self.model_name, "model_version": self.model_version,
            "outputs": [
                {"name": "labels", "datatype": "BYTES", "shape": [len(labels), k], "data": sum(labels, [])},
                {"name": "probabilities", "datatype": "FP32", "shape": [len(probs), k], "data": sum(probs, [])},
            ],
        }
        if payload.get("id"):
            response["id"] = str(payload["id"])
        return response, outcome

    def _oip_images(self, item: Any) -> list[Any]:
        if not isinstance(item, dict) or item.get("datatype") != "BYTES":
            raise _bad("OIP inputs must be BYTES tensors holding encoded images (base64)", code="bad_json")
        if "_images" in item:
            return list(item["_images"])
        data = item.get("data")
        if isinstance(data, str):
            data = [data]
        if not isinstance(data, list):
            raise _bad("OIP input 'data' must be a list of base64 strings", code="bad_json")
        flat: list[Any] = []
        stack = list(reversed(data))
        while stack:  # row-major, possibly nested
            value = stack.pop()
            if isinstance(value, list):
                stack.extend(reversed(value))
            else:
                flat.append(value)
        return flat

    def _oip_binary(self, body: bytes, header_length: str) -> dict[str, Any]:
        """tritonclient's binary tensor extension: a JSON header, then each input's raw bytes."""
        try:
            size = int(header_length)
        except ValueError:
            raise _bad("Inference-Header-Content-Length must be an integer", code="bad_json") from None
        if not 0 < size <= len(body):
            raise _bad("Inference-Header-Content-Length is outside the body", code="bad_json")
        payload = _parse_json(body[:size])
        if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
            raise _bad("OIP header must be a JSON object with 'inputs'", code="bad_json")
        offset = size
        for item in payload["inputs"]:
            if not isinstance(item, dict):
                raise _bad("OIP inputs must be objects", code="bad_json")
            n = (item.get("parameters") or {}).get("binary_data_size")
            if n is None:
                continue
            if item.get("datatype") != "BYTES" or not isinstance(n, int) or offset + n > len(body):
                raise _bad("binary OIP input must be BYTES with a binary_data_size inside the body",
                           code="bad_json")
            item["_images"] = [self._decode_binary_image(raw) for raw in _split_bytes_tensor(body[offset:offset + n])]
            offset += n
        return payload

    def _decode_binary_image(self, raw: bytes) -> Any:
        """Elements are encoded image bytes, or base64 text of them (encoded images are never valid base64)."""
        if _looks_base64(raw):
            return raw.decode("ascii")
        return decode_image(raw, max_pixels=self.max_pixels, max_bytes=self.max_bytes)


def _split_bytes_tensor(blob: bytes) -> list[bytes]:
    """Triton's BYTES serialisation: each element is a 4-byte little-endian length + its bytes."""
    out, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise _bad("truncated BYTES tensor", code="bad_json")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise _bad("truncated BYTES tensor", code="bad_json")
        out.append(blob[offset:offset + length])
        offset += length
    return out


def _looks_base64(raw: bytes) -> bool:
    try:
        base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _payload(row: Mapping[str, Any]) -> Any:
    """TorchServe puts the body under 'data' or 'body' (or a multipart field name)."""
    for key in ("data", "body"):
        if key in row and row[key] is not None:
            return row[key]
    values = [v for v in row.values() if v is not None]
    if not values:
        raise _bad("empty request body: send an image or a JSON object", code="empty_body")
    return values[0]


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"malformed JSON: {exc}", code="malformed_json") from exc


def _lower_headers(context: Any, idx: int) -> dict[str, str]:
    try:
        headers = context.get_all_request_header(idx) or {}
    except (AttributeError, IndexError, TypeError):
        return {}
    return {str(k).lower(): v for k, v in headers.items() if isinstance(v, str)}


TENSOR_TAG = "__tensor__"


def _encode_state(value: Any) -> Any:
    """Exported state as JSON: tensors become {"__tensor__": dtype, "shape", "b64"}, bit-exact."""
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().contiguous().numpy()
        return {TENSOR_TAG: str(array.dtype), "shape": list(array.shape),
                "b64": base64.b64encode(array.tobytes()).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(k): _encode_state(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode_state(v) for v in value]
    return value


def _decode_state(value: Any) -> Any:
    """Inverse of `_encode_state` for an 'import' request; malformed tensors are the caller's error."""
    if isinstance(value, dict) and TENSOR_TAG in value:
        import numpy as np

        try:
            array = np.frombuffer(base64.b64decode(value["b64"], validate=True), dtype=np.dtype(value[TENSOR_TAG]))
            return torch.from_numpy(array.reshape(value["shape"]).copy())
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise _bad(f"malformed tensor in 'state': {exc}", code="bad_state") from exc
    if isinstance(value, dict):
        return {k: _decode_state(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_state(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, set | tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


