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

from tta.engine import MAX_TOP_K
from tta.errors import BadRequest, TTAError
from tta.metrics import ServingMetrics
from tta.serving import codec
from tta.serving.batching import MicroBatcher
from tta.serving.codec import Decoded, Failure, OipInfer
from tta.serving.service import Reply, Service, build_service, start_exporter, warm_up

log = logging.getLogger(__name__)

GRPC_STATUS = {400: StatusCode.INVALID_ARGUMENT, 401: StatusCode.UNAUTHENTICATED, 404: StatusCode.NOT_FOUND,
               409: StatusCode.ALREADY_EXISTS, 410: StatusCode.NOT_FOUND, 413: StatusCode.RESOURCE_EXHAUSTED,
               503: StatusCode.UNAVAILABLE}
# Probes and Prometheus scrape without a token, as TorchServe's /ping and metrics port do.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024  # TorchServe's max_request_size in config.properties
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
                 batch_size: int = 4, max_batch_delay_ms: float = 50.0,
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
            self._run_batch, max_size=batch_size, max_delay_s=max_batch_delay_ms / 1000.0)

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
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [{"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]}]

    def describe(self) -> dict[str, Any]:
        """The deployment behind the tensors: what OIP metadata has no field for (REST `parameters`)."""
        out: dict[str, Any] = {"ready": self.ready, "request_parameters": list(codec.OIP_PARAMETERS),
                               "max_top_k": MAX_TOP_K}
        if self.service is not None:
            engine = self.service.engine
            out.update(clip_model=self.service.model.clip, label_set_size=len(engine.labels),
                       default_method=engine.default_method, methods=engine.methods, max_labels=engine.max_labels)
        return out

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
        reply = await self.batcher.submit(decoded)
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

    # --- authentication ----------------------------------------------------------------------------
    def check_token(self, headers: Mapping[str, str]) -> None:
        """With a token configured, infer needs ``Authorization: Bearer <token>`` (REST and gRPC)."""
        if self.token and not token_matches(headers.get("authorization"), self.token):
            raise ServingError(Failure(401, "unauthorized", "missing or wrong bearer token"))


def token_matches(header: str | None, token: str) -> bool:
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


# --- server wiring ---------------------------------------------------------------------------------------
def install(app: FastAPI, dataplane: DataPlane, model: ClipTTAModel) -> None:
    """Routes, error handler and token check on KServe's FastAPI app; call before the server starts.

    Routes added here are matched before KServe's own (registered at start), so they take over
    the OIP infer and model-metadata paths.
    """

    async def serving_error(_: Request, exc: Exception) -> Response:
        failure = exc.failure if isinstance(exc, ServingError) else codec.failure(exc)
        headers = {"WWW-Authenticate": "Bearer"} if failure.status == 401 else {}
        if failure.retry_after is not None:  # overload / unavailable: when to try again
            headers["Retry-After"] = str(failure.retry_after)
        return JSONResponse(status_code=failure.status, content=failure.body(), headers=headers or None)

    async def infer(model_name: str, request: Request) -> Response:
        if not await dataplane.model_ready(model_name, True):
            raise ModelNotReady(model_name)
        headers = dict(request.headers)
        body = await read_capped(request, model.max_request_bytes)
        response, response_headers = await dataplane.infer(model_name, RawBody(body, headers), headers)
        body, encoded_headers = dataplane.encode(model_name, response, headers, {})
        response_headers.update(encoded_headers)
        if isinstance(body, bytes):
            response_headers["content-type"] = "application/octet-stream"
            return Response(body, headers=response_headers)
        return JSONResponse(body, headers=response_headers)

    async def metadata(model_name: str) -> dict[str, Any]:
        meta = await dataplane.model_metadata(model_name)
        registered = dataplane.get_model_from_registry(model_name)
        if isinstance(registered, ClipTTAModel):
            meta.update(platform="clip-tta", versions=[registered.model_version], parameters=registered.describe())
        return meta

    async def guard(request: Request, call_next: Any) -> Response:
        """Refuse over-long bodies (413) and, with a token configured, unauthenticated calls (401)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > model.max_request_bytes:
            return await serving_error(request, ServingError(too_large(model.max_request_bytes)))
        if model.token and not OPEN_PATHS.match(request.url.path):
            if not token_matches(request.headers.get("authorization"), model.token):
                return await serving_error(request, ServingError(Failure(401, "unauthorized",
                                                                         "missing or wrong bearer token")))
        return await call_next(request)

    app.add_exception_handler(ServingError, serving_error)
    app.add_api_route("/v2/models/{model_name}/infer", infer, methods=["POST"], response_model=None)
    app.add_api_route("/v2/models/{model_name}", metadata, methods=["GET"], response_model=None)
    app.middleware("http")(guard)


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

    server = kserve.ModelServer(http_port=http_port, grpc_port=grpc_port, enable_grpc=grpc, workers=1)
    install(model_server.app, server.dataplane, model)
    server.register_model(model)
    model.stop_on_load_error = True
    model.load()
    server.start([])
    if model.load_error is not None:
        raise TTAError(f"model {model.name} failed to load: {model.load_error}") from model.load_error
