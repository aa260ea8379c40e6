"""KServe adapter: a `kserve.Model` over the shared `tta.serving` service, plus the server wiring.

What KServe's Python model server (``kserve`` on PyPI) gives: Open Inference Protocol v2 over
REST and gRPC (server live/ready/metadata, model ready/metadata, infer), the v1 protocol, and a
Prometheus /metrics on the HTTP port. This module adds what the protocol leaves to the model:

- `ClipTTAModel.predict` hands every request form to `Service` (the same decode -> run ->
  encode and error -> status mapping as TorchServe's handler) and answers OIP with an
  `InferResponse`, so REST (JSON or tritonclient's binary tensor extension) and gRPC clients get
  the same tensors; errors keep their status (REST) or map to a gRPC code with the same JSON
  ``{"error", "message"}`` as details.
- Model ready is false until CLIP is loaded and warmed up (loading runs in the background, so
  liveness answers at once); model metadata lists the input/output tensors and, over REST, a
  ``parameters`` object with the label-set size, the methods and the defaults.
- Dynamic batching (`MicroBatcher`, TorchServe's batchSize/maxBatchDelay knobs) and an optional
  bearer token (KServe's model server has no authentication of its own).

Import this module only in the process that serves: importing `kserve` parses ``sys.argv`` and
configures logging (`tta serve` trims argv first).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kserve
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import ModelNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import (
    InferOutput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    to_http_parameters,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from tta.engine import MAX_TOP_K
from tta.errors import BadRequest, TTAError
from tta.metrics import ServingMetrics
from tta.serving import codec
from tta.serving.batching import MicroBatcher, QueueFull
from tta.serving.codec import Decoded, Failure, OipInfer
from tta.serving.service import Reply, Service, build_service, start_exporter, warm_up

log = logging.getLogger(__name__)

GRPC_STATUS = {400: StatusCode.INVALID_ARGUMENT, 401: StatusCode.UNAUTHENTICATED, 403: StatusCode.PERMISSION_DENIED,
               404: StatusCode.NOT_FOUND, 409: StatusCode.ALREADY_EXISTS, 410: StatusCode.NOT_FOUND,
               413: StatusCode.RESOURCE_EXHAUSTED, 503: StatusCode.UNAVAILABLE}
# Probes and Prometheus scrape without a token, as TorchServe's /ping and metrics port do.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024  # TorchServe's max_request_size in config.properties
DEFAULT_MAX_INFLIGHT = 100  # TorchServe's default job_queue_size: requests queued or running per model
PLATFORM = "clip-tta"
TRITON_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}  # OIP datatype -> Triton model-config data_type
OPEN_PATHS = re.compile(r"^/($|metrics$|v2/health/|v2/models/[^/]+(/versions/[^/]+)?/ready$|v1/models/[^/:]+$)")


class ServingError(GrpcException):
    """A `Failure` raised out of `predict`: REST answers its status and JSON, gRPC its code."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        code = GRPC_STATUS.get(failure.status, StatusCode.INVALID_ARGUMENT if failure.status < 500
                               else StatusCode.INTERNAL)
        super().__init__(details=json.dumps(failure.body()), status_code=code)

    def __str__(self) -> str:
        return f"{self.failure.status} {self.failure.code}: {self.failure.message}"


@dataclass
class RawBody:
    """An OIP REST body as received (JSON, or JSON + binary tensors), decoded by the shared codec.

    KServe's own REST decoder turns binary BYTES elements into UTF-8 text, which fails for
    encoded images, so the adapter's infer route passes the bytes through untouched.
    """

    body: bytes
    headers: dict[str, str]

    def __contains__(self, key: object) -> bool:  # kserve's v2 payload validation probes `"inputs" in payload`
        return False


class ClipTTAModel(kserve.Model):
    """The served CLIP: not ready until `build_service` and the warm-up finish."""

    def __init__(self, name: str, config: Mapping[str, Any], *, model_version: str = "1.0",
                 model_dir: Path | str = ".", metrics: ServingMetrics | None = None, token: str | None = None,
                 batch_size: int = 4, max_batch_delay_ms: float = 50.0, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        super().__init__(name)
        self.config = dict(config)
        self.model_version = model_version
        self.model_dir = Path(model_dir)
        self.metrics = metrics
        self.token = token or None
        self.max_request_bytes = max_request_bytes
        self.stop_on_load_error = False  # `serve` sets it: a server whose model cannot load exits
        self.service: Service | None = None
        self.load_error: BaseException | None = None
        self._loading: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batcher: MicroBatcher[Decoded, Reply] = MicroBatcher(
            self._run_batch, max_size=batch_size, max_delay_s=max_batch_delay_ms / 1000.0, max_inflight=max_inflight)

    # --- loading -----------------------------------------------------------------------------------
    def load(self) -> bool:
        """Start loading in the background (once); `ready` turns true when loaded and warmed up.

        KServe also calls this from its infer path for a model that is not ready: it must not block.
        """
        with self._lock:
            if self._loading is None:
                self._loading = threading.Thread(target=self.load_now, name="tta-load", daemon=True)
                self._loading.start()
        return self.ready

    def load_now(self) -> None:
        """Build the worker and warm it up in this thread (what `load` runs in the background)."""
        try:
            service = build_service(self.config, model_name=self.name, model_version=self.model_version,
                                    model_dir=self.model_dir, metrics=self.metrics)
            if self.config.get("warmup", True):
                warm_up(service)
            start_exporter(self.config, service.metrics)
        except Exception as exc:  # noqa: BLE001 - reported, then the server stops (see `serve`)
            self.load_error = exc
            log.error("model %s failed to load: %s", self.name, exc)
            if self.stop_on_load_error:
                os.kill(os.getpid(), signal.SIGTERM)  # KServe's own shutdown; `serve` reports the error
            return
        self.service = service
        self.ready = True
        log.info("model %s ready: clip=%s labels=%d default_method=%s", self.name, service.model.clip,
                 len(service.engine.labels), service.engine.default_method)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        if self._loading is not None:
            self._loading.join(timeout)
        return self.ready

    # --- metadata ----------------------------------------------------------------------------------
    def get_input_types(self) -> list[dict[str, Any]]:
        return [dict(codec.OIP_INPUT)]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [dict(t) for t in codec.OIP_OUTPUT_TENSORS]

    def describe(self) -> dict[str, str | int | float | bool]:
        """The deployment behind the tensors, as OIP metadata ``parameters`` (scalars only: OIP
        allows string, number and boolean values, so lists are comma-separated strings)."""
        out: dict[str, str | int | float | bool] = {
            "ready": self.ready, "request_parameters": ",".join(codec.OIP_PARAMETERS), "max_top_k": MAX_TOP_K,
            "batch_size": self.batcher.max_size, "max_batch_delay_ms": self.batcher.max_delay_s * 1000.0,
            "max_inflight": self.batcher.max_inflight}
        if self.service is not None:
            engine = self.service.engine
            out.update(clip_model=self.service.model.clip, label_set_size=len(engine.labels),
                       default_method=engine.default_method, methods=",".join(engine.methods),
                       max_labels=engine.max_labels)
        return out

    def metadata(self) -> dict[str, Any]:
        """OIP model metadata (REST body; gRPC carries the same but `parameters`, which it has no field for)."""
        return {"name": self.name, "versions": [self.model_version], "platform": PLATFORM,
                "inputs": self.get_input_types(), "outputs": self.get_output_types(), "parameters": self.describe()}

    def model_config(self) -> dict[str, Any]:
        """The model configuration extension (Triton's ``ModelConfig`` as JSON), for Triton's tools.

        ``max_batch_size`` 0: the first dimension of ``image`` is the request's image count, not a
        batch dimension the server splits; dynamic batching across requests is the adapter's own.
        """
        def tensor(t: Mapping[str, Any]) -> dict[str, Any]:
            return {"name": t["name"], "data_type": TRITON_TYPES[t["datatype"]], "dims": list(t["shape"])}

        return {"name": self.name, "platform": PLATFORM, "backend": PLATFORM, "max_batch_size": 0,
                "input": [tensor(codec.OIP_INPUT)], "output": [tensor(t) for t in codec.OIP_OUTPUT_TENSORS],
                "version_policy": {"specific": {"versions": [self.model_version]}}}

    # --- inference ---------------------------------------------------------------------------------
    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Any:
        """Every request form (OIP REST/gRPC, v1 JSON, v1 raw image) through the shared service."""
        headers = {str(k).lower(): v for k, v in (headers or {}).items()}
        self.check_token(headers)
        service = self.service
        if service is None:
            raise ModelNotReady(self.name, "loading" if self.load_error is None else f"failed: {self.load_error}")
        loop = asyncio.get_running_loop()
        if isinstance(payload, InferRequest):
            decoded = await loop.run_in_executor(None, self._decode_infer_request, service, payload, headers)
        elif isinstance(payload, RawBody):
            decoded = await loop.run_in_executor(None, service.decode, payload.body, payload.headers)
        else:  # v1: a JSON object (JSON form, state actions, OIP body) or raw image bytes
            decoded = await loop.run_in_executor(None, service.decode, payload, headers)
        try:
            reply = await self.batcher.submit(decoded)
        except QueueFull as exc:
            raise ServingError(Failure(503, "overloaded", str(exc), getattr(decoded, "method", None),
                                       retry_after=codec.RETRY_AFTER_S)) from None
        if reply.failure is not None:
            raise ServingError(reply.failure)
        if isinstance(decoded, OipInfer) and isinstance(payload, InferRequest | RawBody):
            return self._infer_response(reply, decoded, payload)
        return reply.body

    def _run_batch(self, requests: list[Decoded]) -> list[Reply]:
        assert self.service is not None
        return self.service.run_batch(requests)

    @staticmethod
    def _decode_infer_request(service: Service, request: InferRequest, headers: dict[str, str]) -> Decoded:
        """KServe's parsed InferRequest (gRPC) -> the OIP JSON shape the codec decodes."""
        try:
            inputs = []
            for item in request.inputs:
                raw = getattr(item, "_raw_data", None)  # gRPC raw_input_contents, still serialised
                if item.datatype == "BYTES" and raw is not None:
                    data: Any = codec.split_bytes_tensor(bytes(raw))
                else:
                    data = item.data if isinstance(item.data, list) else []
                inputs.append({"name": item.name, "datatype": item.datatype, "shape": list(item.shape), "data": data})
                if item.parameters:
                    inputs[-1]["parameters"] = dict(item.parameters)
            params = to_http_parameters(request.parameters) if request.parameters else {}
        except BadRequest as exc:
            return codec.failure(exc)
        outputs = [{"name": o.name, "parameters": dict(o.parameters or {})} for o in request.request_outputs or []]
        body: dict[str, Any] = {"id": request.id, "inputs": inputs, "parameters": params}
        if outputs:
            body["outputs"] = outputs
        return service.decode(body, headers)

    def _infer_response(self, reply: Reply, request: OipInfer, payload: InferRequest | RawBody) -> InferResponse:
        outputs = [InferOutput(o["name"], o["shape"], o["datatype"], data=o["data"]) for o in reply.body["outputs"]]
        if isinstance(payload, InferRequest):
            binary, requested, from_grpc = payload.use_binary_outputs, None, payload.from_grpc
        else:
            binary = request.binary_output
            requested = [RequestedOutput(o["name"], o["parameters"]) for o in request.outputs or []] or None
            from_grpc = False
        return InferResponse(response_id=request.id or "", model_name=self.name, model_version=self.model_version,
                             infer_outputs=outputs, from_grpc=from_grpc, use_binary_outputs=binary,
                             requested_outputs=requested, parameters=reply.body.get("parameters"))

    def version_not_found(self, version: str) -> Failure:
        return Failure(404, "version_not_found",
                       f"model {self.name!r} has no version {version!r}; it serves version {self.model_version!r}")

    # --- authentication ----------------------------------------------------------------------------
    def check_token(self, headers: Mapping[str, str]) -> None:
        """With a token configured, infer needs ``Authorization: Bearer <token>`` (REST and gRPC)."""
        if self.token and not token_matches(headers.get("authorization"), self.token):
            raise ServingError(Failure(401, "unauthorized", "missing or wrong bearer token"))


def token_matches(header: str | None, token: str) -> bool:
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


# --- server wiring ---------------------------------------------------------------------------------------
EXTENSIONS = ["binary_tensor_data", "model_configuration"]  # OIP/Triton extensions this server implements
FRAMEWORK_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                   422: "invalid_request"}


def served_model(dataplane: DataPlane, name: str, version: str | None = None) -> ClipTTAModel:
    """The registered model `name` (at `version`, when the path names one), else a 404 `ServingError`."""
    model = dataplane.model_registry.get_model(name)
    if not isinstance(model, ClipTTAModel):
        raise ServingError(Failure(404, "model_not_found", f"no model named {name!r} is served"))
    if version is not None and version != model.model_version:
        raise ServingError(model.version_not_found(version))
    return model


def all_ready(dataplane: DataPlane) -> bool:
    """OIP server ready: every model is ready (and there is at least one)."""
    models = list(dataplane.model_registry.get_models().values())
    return bool(models) and all(m.ready for m in models)


def not_ready(what: str) -> ServingError:
    """OIP health answers false with a 4xx (not 503): 400, with the OIP error body."""
    return ServingError(Failure(400, "not_ready", f"{what} is not ready (loading); retry later"))


async def serving_error(_: Request, exc: Exception) -> Response:
    """A `ServingError` (or any core error) as its status, the OIP error body and its headers."""
    failure = exc.failure if isinstance(exc, ServingError) else codec.failure(exc)
    headers = {"WWW-Authenticate": "Bearer"} if failure.status == 401 else {}
    if failure.retry_after is not None:  # overload / unavailable: when to try again
        headers["Retry-After"] = str(failure.retry_after)
    return JSONResponse(status_code=failure.status, content=failure.body(), headers=headers or None)


async def framework_error(request: Request, exc: Exception) -> Response:
    """Starlette's and FastAPI's own errors (404 path, 405 method, 400 body parse, 422
    validation) with the OIP body instead of ``{"detail": ...}``."""
    headers = None
    if isinstance(exc, RequestValidationError):
        status = 422
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
                            for e in exc.errors())
    else:
        assert isinstance(exc, StarletteHTTPException)
        status, headers, message = exc.status_code, dict(exc.headers or {}) or None, str(exc.detail)
        if status == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        elif status == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
    code = FRAMEWORK_CODES.get(status, "client_error" if status < 500 else "internal")
    return JSONResponse(status_code=status, content={"error": message or "error", "code": code}, headers=headers)


class OipRoutes:
    """The OIP REST endpoints over KServe's data plane (paths in `install`)."""

    def __init__(self, dataplane: DataPlane, model: ClipTTAModel) -> None:
        self.dataplane = dataplane
        self.model = model

    def served(self, request: Request, model_name: str) -> ClipTTAModel:
        return served_model(self.dataplane, model_name, request.path_params.get("model_version"))

    async def server_metadata(self) -> dict[str, Any]:
        meta = self.dataplane.metadata()
        return {**meta, "extensions": sorted({*meta.get("extensions", []), *EXTENSIONS})}

    async def server_live(self) -> dict[str, Any]:
        return {"live": True}

    async def server_ready(self) -> dict[str, Any]:
        if not all_ready(self.dataplane):
            raise not_ready("the server (a model)")
        return {"ready": True}

    async def model_metadata(self, model_name: str, request: Request) -> dict[str, Any]:
        return self.served(request, model_name).metadata()

    async def model_ready(self, model_name: str, request: Request) -> dict[str, Any]:
        if not self.served(request, model_name).ready:
            raise not_ready(f"model {model_name!r}")
        return {"name": model_name, "ready": True}

    async def model_config(self, model_name: str, request: Request) -> dict[str, Any]:
        return self.served(request, model_name).model_config()

    async def infer(self, model_name: str, request: Request) -> Response:
        served = self.served(request, model_name)
        if not served.ready:
            raise ServingError(Failure(503, "model_not_ready", f"model {model_name!r} is loading; retry later",
                                       retry_after=codec.RETRY_AFTER_S))
        headers = dict(request.headers)
        body = await read_capped(request, served.max_request_bytes)
        response, response_headers = await self.dataplane.infer(model_name, RawBody(body, headers), headers)
        body, encoded_headers = self.dataplane.encode(model_name, response, headers, {})
        response_headers.update(encoded_headers)
        if isinstance(body, bytes):
            response_headers["content-type"] = "application/octet-stream"
            return Response(body, headers=response_headers)
        if isinstance(body, dict) and not body.get("id"):
            body.pop("id", None)  # OIP: "the id given in the request, if any"
        return JSONResponse(body, headers=response_headers)

    async def guard(self, request: Request, call_next: Any) -> Response:
        """Refuse over-long bodies (413) and, with a token configured, unauthenticated calls (401)."""
        model = self.model
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > model.max_request_bytes:
            return await serving_error(request, ServingError(too_large(model.max_request_bytes)))
        if model.token and not OPEN_PATHS.match(request.url.path):
            if not token_matches(request.headers.get("authorization"), model.token):
                return await serving_error(request, ServingError(Failure(401, "unauthorized",
                                                                         "missing or wrong bearer token")))
        return await call_next(request)


def install(app: FastAPI, dataplane: DataPlane, model: ClipTTAModel) -> None:
    """OIP routes, error handlers and the token check on KServe's FastAPI app; call before the
    server starts.

    Routes added here are matched before KServe's own (registered at start), so every OIP route
    (server and model metadata, health, infer, versioned or not, and the model configuration
    extension) is answered here; KServe keeps its v1 routes, /metrics and repository routes.
    """
    oip = OipRoutes(dataplane, model)
    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(StarletteHTTPException, framework_error)
    app.add_exception_handler(RequestValidationError, framework_error)
    routes: list[tuple[str, Any, str]] = [("/v2", oip.server_metadata, "GET"),
                                          ("/v2/health/live", oip.server_live, "GET"),
                                          ("/v2/health/ready", oip.server_ready, "GET")]
    for base in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        routes += [(base, oip.model_metadata, "GET"), (f"{base}/ready", oip.model_ready, "GET"),
                   (f"{base}/config", oip.model_config, "GET"), (f"{base}/infer", oip.infer, "POST")]
    for path, endpoint, method in routes:
        app.add_api_route(path, endpoint, methods=[method], response_model=None)
    app.middleware("http")(oip.guard)


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (chunked bodies carry no length)."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise ServingError(too_large(limit))
    return bytes(body)


def too_large(limit: int) -> Failure:
    return Failure(413, "request_too_large", f"request body over {limit} bytes")


def serve(model: ClipTTAModel, http_port: int, grpc_port: int, grpc: bool = True) -> None:
    """Register the model (not yet ready), start loading it, serve until SIGINT/SIGTERM.

    A model that cannot load (no weights offline, bad labels file) stops the server and raises
    `TTAError`, so the process exits non-zero instead of staying live but never ready.
    """
    from kserve import model_server

    from tta.serving.kserve_grpc import OipModelServer

    server = OipModelServer(http_port=http_port, grpc_port=grpc_port, enable_grpc=grpc, workers=1)
    install(model_server.app, server.dataplane, model)
    server.register_model(model)
    model.stop_on_load_error = True
    model.load()
    server.start([])
    if model.load_error is not None:
        raise TTAError(f"model {model.name} failed to load: {model.load_error}") from model.load_error
