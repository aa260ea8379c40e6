"""Request decoding, response encoding and core error -> HTTP status, for every server adapter.

No server framework is imported here: an adapter hands over the body (bytes, text or an already
parsed JSON object) and lower-cased headers, and gets back one of

- `Predict`: one decoded image plus the request's parameters (raw image bytes or the JSON form
  ``{"image": "<base64>", "method", "top_k", "labels", "options", "seed"}``);
- `OipInfer`: an Open Inference Protocol v2 request (``{"inputs": [...], "parameters": {...}}``),
  one `Predict` per image of its BYTES inputs (base64 text, or raw bytes through tritonclient's
  binary tensor extension);
- `Action`: a stream-state action ``{"action": "state"|"reset"|"export"|"import"|"feedback", ...}``;
  ``feedback`` takes a label with an image (a new labelled example, GDA) or with the ``id`` of an
  earlier answer (counted in ``tta_labelled_answers_total``; see `tta.serving.answers`);
- `Failure`: what to answer instead (status, error code, message), never an exception.

Decoding is a phase of its own (decode -> run -> encode) so a batch of decoded requests can be
run together and admission checks can sit between decoding and running. Encoding turns answers
into the JSON bodies both servers send, and `failure` maps the core's errors to status codes.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tta.admission import DEADLINE_FIELD, DEADLINE_HEADER, parse_deadline_ms
from tta.engine import Prediction
from tta.errors import BadRequest, ModelUnavailable, Unavailable
from tta.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_image
from tta.serving.admin import ADMIN_HEADER, PRIVILEGED, missing_credential

JSON_FIELDS = frozenset({"image", "method", "top_k", "labels", "options", "seed", DEADLINE_FIELD})
OIP_PARAMETERS = ("method", "top_k", "labels", "options", "seed", DEADLINE_FIELD)
# The served model's tensors (what OIP model metadata declares, and what requests are checked against).
OIP_INPUT = {"name": "image", "datatype": "BYTES", "shape": [-1]}  # one encoded image per element
OIP_OUTPUT_TENSORS = ({"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
                      {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]})
# Parameters OIP clients send beyond ours: tritonclient's binary tensor extension. Anything else is
# refused (400 unknown_parameter) rather than ignored, so a typo never falls back to a default.
OIP_BINARY_OUTPUT = "binary_data_output"
# Triton reserves the `triton_` prefix for its own parameters; its clients add some unasked
# (perf_analyzer over gRPC: triton_enable_empty_final_response, a streaming flag). They mean
# nothing here and are ignored, so Triton's tools work; every other unknown parameter is a 400.
TRITON_RESERVED_PREFIX = "triton_"
OIP_REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
OIP_INPUT_FIELDS = frozenset({"name", "shape", "datatype", "parameters", "data"})
OIP_INPUT_PARAMETERS = frozenset({"binary_data_size"})
OIP_OUTPUT_PARAMETERS = frozenset({"binary_data"})
ACTIONS = ("state", "reset", "export", "import", "feedback")
STATUS_BY_CODE = {"image_too_large": 413, "request_too_large": 413, "unauthorized": 401, "forbidden": 403,
                  "over_budget": 422, "answer_unknown": 404, "answer_elsewhere": 404, "already_labelled": 409,
                  "answer_expired": 410, "answer_evicted": 410}
PHRASES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
           410: "Gone", 413: "Payload Too Large", 422: "Unprocessable Content", 500: "Internal Server Error",
           503: "Service Unavailable"}
MAX_ANSWER_ID_CHARS = 64  # issued ids have 37 characters (tta.serving.answers)
MAX_JSON_DEPTH = 32  # deepest request form is ~6 levels (OIP data, exported state); 5,000 levels was a 500
RETRY_AFTER_S = 1  # what a 503 tells a client to wait before retrying
OIP_LENGTH_HEADER = "inference-header-content-length"
OIP_OUTPUTS = tuple(t["name"] for t in OIP_OUTPUT_TENSORS)
TENSOR_TAG = "__tensor__"
DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Limits:
    """Per-deployment input limits, checked while decoding (before any model work)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


DEFAULT_LIMITS = Limits()


@dataclass
class Predict:
    """One image to classify. `method` None means the deployment's default."""

    image: torch.Tensor
    method: str | None = None
    top_k: Any = DEFAULT_TOP_K  # the Engine checks the range, so its message is the same everywhere
    labels: list[str] | None = None
    options: dict[str, Any] | None = None
    seed: int | None = None
    decode_ms: float = 0.0
    started: float = field(default_factory=time.perf_counter)  # perf_counter() when the request arrived
    deadline_ms: float | None = None  # the request's own (lower) deadline; the deployment's applies anyway
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # lower-case; for checks before `run`


@dataclass
class OipInfer:
    """An OIP v2 infer request: every image of its inputs, sharing the request's parameters."""

    items: list[Predict]
    id: str | None = None
    outputs: list[dict[str, Any]] | None = None  # requested outputs ({"name", "parameters"}); None = all
    binary_output: bool = False  # tritonclient's binary_data_output parameter: answer binary tensors
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def method(self) -> str | None:
        return self.items[0].method if self.items else None


@dataclass
class Action:
    """A stream-state action; `state` (import) and `image` (feedback) are already decoded."""

    action: str
    method: str | None = None
    state: dict[str, Any] | None = None
    label: str | None = None
    image: torch.Tensor | None = None
    seed: int | None = None
    answer_id: str | None = None  # feedback for an earlier answer (instead of an image)
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # e.g. credentials for privileged actions


@dataclass
class Failure:
    """The answer to a request that cannot be served: HTTP status, error code, message."""

    status: int
    code: str
    message: str
    method: str | None = None  # for metrics labels, when the request named one
    retry_after: int | None = None  # seconds, sent as Retry-After (overload, temporarily unavailable)

    @property
    def outcome(self) -> str:
        return "client_error" if self.status < 500 else "server_error"

    @property
    def phrase(self) -> str:
        return PHRASES.get(self.status, "Error")

    def body(self) -> dict[str, str]:
        """OIP's error object: ``error`` is the message a person reads; ``code`` is for programs."""
        return {"error": self.message, "code": self.code}


Request = Predict | OipInfer | Action
Decoded = Request | Failure


# --- errors -> status ----------------------------------------------------------------------------
def failure(exc: BaseException, method: str | None = None) -> Failure:
    """Map a core error to its answer: BadRequest -> 4xx by code, unavailable -> 503, else 500."""
    if isinstance(exc, BadRequest):
        return Failure(STATUS_BY_CODE.get(exc.code, 400), exc.code, str(exc), method)
    if isinstance(exc, ModelUnavailable | Unavailable):
        return Failure(503, getattr(exc, "code", "unavailable"), str(exc), method, retry_after=RETRY_AFTER_S)
    return Failure(500, "internal", "internal error; see the server log", method)


def _bad(message: str, code: str) -> BadRequest:
    return BadRequest(message, code=code)


# --- decoding ------------------------------------------------------------------------------------
def decode(body: Any, headers: Mapping[str, str] | None = None, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """Any accepted body -> a typed request, or the `Failure` to answer; bad input never raises.

    `body` is what the server received: bytes/bytearray, text, an already parsed JSON object, or
    None for an empty request. `headers` must have lower-case names.
    """
    started = time.perf_counter()
    method: str | None = None
    headers = dict(headers or {})
    try:
        payload = _parse_body(body, headers, limits)
        if isinstance(payload, torch.Tensor):
            request: Request = Predict(payload, decode_ms=(time.perf_counter() - started) * 1000.0, started=started)
        else:
            method = _method_hint(payload)
            if "inputs" in payload:
                request = decode_oip(payload, limits, started=started)
            elif "action" in payload:
                action = payload.get("action")
                if isinstance(action, str) and action in PRIVILEGED and not headers.get(ADMIN_HEADER, "").strip():
                    raise missing_credential(action, payload.get("method"), headers)  # before decoding it
                request = decode_action(payload, limits)
            else:
                request = decode_json(payload, limits, started=started)
        header_deadline = headers.get(DEADLINE_HEADER)
        if header_deadline is not None and not isinstance(request, Action):
            ms = parse_deadline_ms(header_deadline)
            for item in request.items if isinstance(request, OipInfer) else [request]:
                item.deadline_ms = ms if item.deadline_ms is None else min(ms, item.deadline_ms)
    except BadRequest as exc:
        return failure(exc, method)
    request.headers = headers
    return request


def _method_hint(payload: Mapping[str, Any]) -> str | None:
    """The method a JSON request names (for metrics labels even when it fails to decode)."""
    params = payload.get("parameters") if "inputs" in payload else payload
    value = params.get("method") if isinstance(params, Mapping) else None
    return str(value) if value else None


def _parse_body(body: Any, headers: Mapping[str, str], limits: Limits) -> Any:
    """Body -> a decoded image tensor (raw image bytes) or a JSON object."""
    if body is None:
        raise _bad("empty request body: send an image or a JSON object", code="empty_body")
    if isinstance(body, bytes | bytearray) and OIP_LENGTH_HEADER in headers:
        return decode_oip_binary(bytes(body), headers[OIP_LENGTH_HEADER])
    if isinstance(body, bytes | bytearray):
        content_type = headers.get("content-type", "")
        if "json" in content_type or bytes(body[:64]).lstrip()[:1] in (b"{", b"["):
            body = parse_json(bytes(body))
        else:
            return decode_image(body, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes)
    if isinstance(body, str):
        body = parse_json(body.encode("utf-8"))
    if not isinstance(body, dict):
        raise _bad("expected an image or a JSON object", code="bad_json")
    check_depth(body)  # TorchServe may have parsed the JSON already
    return body


def parse_json(raw: bytes) -> Any:
    """JSON text -> a value no deeper than `MAX_JSON_DEPTH`, or BadRequest (never RecursionError)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise _bad(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"malformed JSON: {exc}", code="malformed_json") from exc
    check_depth(value)
    return value


def check_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse containers nested deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            raise _bad(f"JSON nested deeper than {limit} levels", code="json_too_deep")
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list | tuple))


def decode_base64_image(value: Any, limits: Limits) -> tuple[torch.Tensor, float]:
    """The JSON form's 'image' (base64, or a data: URL) -> uint8 [3, H, W] and its decode time in ms."""
    start = time.perf_counter()
    if not isinstance(value, str | bytes) or not value:
        raise _bad("'image' must be a non-empty base64 string", code="empty_body")
    if isinstance(value, str) and value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]  # data URLs from browsers
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"'image' is not valid base64: {exc}", code="bad_base64") from exc
    image = decode_image(raw, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes)
    return image, (time.perf_counter() - start) * 1000.0


def decode_image_element(value: Any, limits: Limits) -> tuple[torch.Tensor, float]:
    """One element of an OIP BYTES tensor: base64 text (JSON, or bytes of it) or raw image bytes.

    Encoded images are never valid base64 (their magic numbers hold non-base64 bytes), so bytes
    that are base64 are base64 text: decoded once here, the raw image bytes otherwise.
    """
    if isinstance(value, bytes | bytearray) and value:
        start = time.perf_counter()
        raw = bytes(value)
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            pass  # not base64: the encoded image itself
        image = decode_image(raw, max_pixels=limits.max_pixels, max_bytes=limits.max_bytes)
        return image, (time.perf_counter() - start) * 1000.0
    return decode_base64_image(value, limits)


def _check_parameters(request: Mapping[str, Any]) -> dict[str, Any]:
    """Type checks shared by the JSON form and OIP parameters; ranges are the Engine's."""
    method = request.get("method")
    if method is not None and not isinstance(method, str):
        raise _bad("'method' must be a string", code="unknown_method")
    labels = request.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise _bad("'labels' must be a list of strings", code="bad_labels")
    options = request.get("options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'options' must be a JSON object", code="bad_options")
    seed = request.get("seed")
    if seed is not None and not _valid_seed(seed):
        raise _bad("'seed' must be an integer in [-2**63, 2**64)", code="bad_options")
    top_k = request.get("top_k")
    deadline = request.get(DEADLINE_FIELD)
    return {"method": method or None, "labels": labels, "options": options, "seed": seed,
            "top_k": DEFAULT_TOP_K if top_k is None else top_k,
            "deadline_ms": None if deadline is None else parse_deadline_ms(deadline)}


def _valid_seed(seed: Any) -> bool:
    """What torch.Generator.manual_seed accepts (a larger int overflows inside torch: a 500)."""
    return isinstance(seed, int) and not isinstance(seed, bool) and -(2**63) <= seed < 2**64


def decode_json(payload: Mapping[str, Any], limits: Limits, started: float | None = None) -> Predict:
    """The JSON form ``{"image": base64, "method", "top_k", "labels", "options", "seed"}``."""
    started = time.perf_counter() if started is None else started
    unknown = sorted(set(payload) - JSON_FIELDS)
    if unknown:
        raise _bad(f"unknown field(s) {unknown}; known: {sorted(JSON_FIELDS)}", code="unknown_field")
    if "image" not in payload:
        raise _bad("JSON requests need an 'image' field (base64)", code="empty_body")
    image, decode_ms = decode_base64_image(payload["image"], limits)
    return Predict(image, decode_ms=decode_ms, started=started, **_check_parameters(payload))


def decode_action(payload: Mapping[str, Any], limits: Limits) -> Action:
    """``{"action": ..., "method": ...}`` plus 'state' (import) or 'label' + 'image' or 'id' (feedback)."""
    action = payload.get("action")
    method = payload.get("method") or None
    if action not in ACTIONS:
        raise _bad(f"unknown action {action!r}; known: {list(ACTIONS)}", code="unknown_action")
    if method is not None and not isinstance(method, str):
        raise _bad("'method' must be a string", code="unknown_method")
    request = Action(str(action), method)
    if action == "import":
        state = payload.get("state")
        if not isinstance(state, dict):
            raise _bad("'state' must be the JSON object an 'export' returned", code="bad_state")
        request.state = decode_state(state)
    elif action == "feedback":
        label = payload.get("label")
        if not isinstance(label, str):
            raise _bad("feedback needs 'label' (a class of the deployment's label set, or of the labelled "
                       "answer's)", code="bad_labels")
        request.label = label
        if "id" in payload:
            answer_id = payload["id"]
            if not isinstance(answer_id, str) or not 0 < len(answer_id) <= MAX_ANSWER_ID_CHARS:
                raise _bad("'id' must be the 'id' of an earlier answer (a string)", code="bad_id")
            if "image" in payload:
                raise _bad("feedback takes 'id' (label an earlier answer) or 'image' (a new labelled example), "
                           "not both", code="bad_json")
            request.answer_id = answer_id
            return request
        request.image, _ = decode_base64_image(payload.get("image"), limits)
        seed = payload.get("seed")
        request.seed = seed if _valid_seed(seed) else None
    return request


def decode_oip(payload: Mapping[str, Any], limits: Limits, started: float | None = None) -> OipInfer:
    """OIP v2 JSON, checked against the model metadata: one BYTES input ``image`` of shape [n]
    holding n encoded images (base64 text, or raw bytes through the binary extension); the
    request's parameters apply to every image. Unknown fields and parameters are refused."""
    started = time.perf_counter() if started is None else started
    unknown = sorted(set(payload) - OIP_REQUEST_FIELDS)
    if unknown:
        raise _bad(f"unknown OIP request field(s) {unknown}; known: {sorted(OIP_REQUEST_FIELDS)}",
                   code="unknown_field")
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object", code="bad_json")
    unknown = sorted(k for k in set(params) - set(OIP_PARAMETERS) - {OIP_BINARY_OUTPUT}
                     if not str(k).startswith(TRITON_RESERVED_PREFIX))
    if unknown:
        raise _bad(f"unknown request parameter(s) {unknown}; known: {[*OIP_PARAMETERS, OIP_BINARY_OUTPUT]}",
                   code="unknown_parameter")
    binary_output = params.get(OIP_BINARY_OUTPUT, False)
    if not isinstance(binary_output, bool):
        raise _bad(f"'{OIP_BINARY_OUTPUT}' must be a boolean", code="bad_json")
    params = {k: params.get(k) for k in OIP_PARAMETERS}
    if isinstance(params["options"], str):  # tritonclient parameters are scalars: options come as JSON text
        params["options"] = parse_json(params["options"].encode("utf-8"))
    if isinstance(params["labels"], str):
        params["labels"] = parse_json(params["labels"].encode("utf-8"))
    checked = _check_parameters(params)
    outputs = _requested_outputs(payload.get("outputs"))
    elements = oip_input_elements(payload.get("inputs"))
    items = []
    for element in elements:
        item_start = time.perf_counter() if items else started
        image, decode_ms = decode_image_element(element, limits)
        items.append(Predict(image, decode_ms=decode_ms, started=item_start, **checked))
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("OIP 'id' must be a string", code="bad_json")
    return OipInfer(items, request_id or None, outputs, binary_output)


def oip_input_elements(inputs: Any) -> list[Any]:
    """The elements of the request's one input, checked against `OIP_INPUT` (name, datatype,
    rank, shape against element count, tensor parameters)."""
    if not isinstance(inputs, list) or not inputs:
        raise _bad("OIP 'inputs' must be a non-empty list", code="bad_json")
    if not all(isinstance(item, dict) for item in inputs):
        raise _bad("OIP inputs must be objects", code="bad_json")
    name = OIP_INPUT["name"]
    names = [item.get("name") for item in inputs]
    if names != [name]:
        raise _bad(f"OIP inputs {names}: this model takes exactly one input, {name!r} "
                   f"({OIP_INPUT['datatype']}, shape {OIP_INPUT['shape']})", code="bad_input")
    item = inputs[0]
    unknown = sorted(set(item) - OIP_INPUT_FIELDS)
    if unknown:
        raise _bad(f"unknown field(s) {unknown} in input {name!r}", code="unknown_field")
    if item.get("datatype") != OIP_INPUT["datatype"]:
        raise _bad(f"input {name!r} must be {OIP_INPUT['datatype']} (encoded images), "
                   f"got {item.get('datatype')!r}", code="bad_datatype")
    tensor_params = item.get("parameters") or {}
    if not isinstance(tensor_params, dict):
        raise _bad(f"input {name!r} 'parameters' must be an object", code="bad_json")
    unknown = sorted(set(tensor_params) - OIP_INPUT_PARAMETERS)
    if unknown:
        raise _bad(f"unknown parameter(s) {unknown} of input {name!r}; known: {sorted(OIP_INPUT_PARAMETERS)}",
                   code="unknown_parameter")
    elements = oip_elements(item)
    shape = item.get("shape")
    if (not isinstance(shape, list) or len(shape) != len(OIP_INPUT["shape"])
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise _bad(f"input {name!r} needs shape [n] (n images), got {shape!r}", code="bad_shape")
    if shape[0] != len(elements):
        raise _bad(f"input {name!r} has shape {shape} but {len(elements)} element(s)", code="bad_shape")
    if not elements:
        raise _bad("no image in the OIP inputs", code="empty_body")
    return elements


def _requested_outputs(outputs: Any) -> list[dict[str, Any]] | None:
    """OIP 'outputs': which of `labels` / `probabilities` to answer (all when absent)."""
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise _bad("OIP 'outputs' must be a list of objects with a 'name'", code="bad_json")
    unknown = sorted({o["name"] for o in outputs} - set(OIP_OUTPUTS))
    if unknown:
        raise _bad(f"unknown output(s) {unknown}; known: {list(OIP_OUTPUTS)}", code="bad_output")
    for o in outputs:
        params = o.get("parameters") or {}
        if not isinstance(params, dict) or set(params) - OIP_OUTPUT_PARAMETERS:
            raise _bad(f"output {o['name']!r}: parameters must be an object with at most "
                       f"{sorted(OIP_OUTPUT_PARAMETERS)}", code="unknown_parameter")
    return [{"name": o["name"], "parameters": dict(o.get("parameters") or {})} for o in outputs]


def oip_elements(item: Any) -> list[Any]:
    """The elements of one OIP input, row-major (nested lists flattened)."""
    if not isinstance(item, dict) or item.get("datatype") != "BYTES":
        raise _bad("OIP inputs must be BYTES tensors holding encoded images (base64)", code="bad_json")
    data = item.get("data")
    if isinstance(data, str | bytes):
        data = [data]
    if not isinstance(data, list):
        raise _bad("OIP input 'data' must be a list of base64 strings", code="bad_json")
    flat: list[Any] = []
    stack = list(reversed(data))
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(reversed(value))
        else:
            flat.append(value)
    return flat


def decode_oip_binary(body: bytes, header_length: str) -> dict[str, Any]:
    """tritonclient's binary tensor extension: a JSON header, then each input's raw bytes.

    Binary inputs get their elements (still encoded bytes) as 'data'; `decode_oip` decodes them.
    """
    try:
        size = int(header_length)
    except ValueError:
        raise _bad("Inference-Header-Content-Length must be an integer", code="bad_json") from None
    if not 0 < size <= len(body):
        raise _bad("Inference-Header-Content-Length is outside the body", code="bad_json")
    payload = parse_json(body[:size])
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise _bad("OIP header must be a JSON object with 'inputs'", code="bad_json")
    offset = size
    for item in payload["inputs"]:
        if not isinstance(item, dict):
            raise _bad("OIP inputs must be objects", code="bad_json")
        n = (item.get("parameters") or {}).get("binary_data_size")
        if n is None:
            continue
        if item.get("datatype") != "BYTES" or not isinstance(n, int) or n < 0 or offset + n > len(body):
            raise _bad("binary OIP input must be BYTES with a binary_data_size inside the body", code="bad_json")
        item["data"] = split_bytes_tensor(body[offset:offset + n])
        offset += n
    return payload


def split_bytes_tensor(blob: bytes) -> list[bytes]:
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


# --- state (export/import) -------------------------------------------------------------------------
def encode_state(value: Any) -> Any:
    """Exported state as JSON: tensors become {"__tensor__": dtype, "shape", "b64"}, bit-exact."""
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().contiguous().numpy()
        return {TENSOR_TAG: str(array.dtype), "shape": list(array.shape),
                "b64": base64.b64encode(array.tobytes()).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(k): encode_state(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode_state(v) for v in value]
    return value


STATE_DTYPES = frozenset({"float16", "float32", "float64", "int32", "int64", "uint8", "bool"})


def decode_state(value: Any, path: str = "") -> Any:
    """Inverse of `encode_state` for an 'import' request; a malformed tensor is a 400 naming its field.

    The declared shape must be the tensor's own (non-negative sizes whose product is the byte
    count: no -1 left for numpy to infer) and the dtype one a state holds; what the values may be
    is the owner's schema's business (`tta.state.schema`)."""
    if isinstance(value, dict) and TENSOR_TAG in value:
        import numpy as np

        where = path or "state"
        try:
            dtype, shape = value[TENSOR_TAG], value["shape"]
            if dtype not in STATE_DTYPES:
                raise ValueError(f"dtype {str(dtype)[:20]!r} is not one of {sorted(STATE_DTYPES)}")
            if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                       for n in shape):
                raise ValueError("shape must be a list of non-negative integers")
            array = np.frombuffer(base64.b64decode(value["b64"], validate=True), dtype=np.dtype(dtype))
            return torch.from_numpy(array.reshape(shape).copy())
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise _bad(f"malformed tensor in 'state' at {where}: {exc}", code="bad_state") from exc
    if isinstance(value, dict):
        return {k: decode_state(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_state(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


# --- encoding ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What every answer names: the served model, its version, the CLIP behind it."""

    name: str
    version: str
    clip: str


def encode_prediction(prediction: Prediction, model: ModelInfo) -> dict[str, Any]:
    """The JSON form's answer (`Prediction.to_dict` plus the model it came from)."""
    return {**prediction.to_dict(), "model": model.name, "model_version": model.version, "clip_model": model.clip}


def encode_oip(predictions: list[Prediction], model: ModelInfo, request_id: str | None = None,
               outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """OIP v2 answer: `labels` (BYTES) and `probabilities` (FP32), both [images, k], best first.

    `outputs` (the request's requested outputs) limits the answer to the named ones, in order.
    Each image's answer id (for a label sent later) is in the response parameter ``answer_ids``:
    one string, the ids in image order joined by commas (a string, so gRPC carries it as well).
    """
    labels = [[t["label"] for t in p.top_k] for p in predictions]
    probs = [[t["score"] for t in p.top_k] for p in predictions]
    k = len(labels[0]) if labels else 0
    response: dict[str, Any] = {
        "model_name": model.name, "model_version": model.version,
        "outputs": [
            {"name": "labels", "datatype": "BYTES", "shape": [len(labels), k], "data": sum(labels, [])},
            {"name": "probabilities", "datatype": "FP32", "shape": [len(probs), k], "data": sum(probs, [])},
        ],
    }
    if outputs is not None:
        by_name = {o["name"]: o for o in response["outputs"]}
        response["outputs"] = [by_name[o["name"]] for o in outputs]
    if request_id:
        response["id"] = request_id
    ids = [p.answer_id for p in predictions if p.answer_id is not None]
    if ids:
        response["parameters"] = {"answer_ids": ",".join(ids)}
    return response


def dumps(body: Any) -> str:
    """JSON text of an answer (tensors, bytes and numpy scalars included)."""
    return json.dumps(body, default=_json_default)


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
