"""The Open Inference Protocol (KServe predict API v2) as test data: its REST paths and the JSON
Schemas of its objects, written down here from the protocol's text (required_api.md, and the
model configuration extension of Triton that its tools rely on), not copied from any file.

What the protocol says, in short:
- health (server live, server ready, model ready) answers 200 for true and a 4xx for false;
- every failed request has an HTTP error status and the body ``{"error": <descriptive message>}``;
- parameters are ``name: string | number | boolean`` pairs;
- a shape is a list of integers (metadata: -1 for a variable dimension; tensors: >= 0);
- the model paths may carry ``/versions/{version}``.
"""

from __future__ import annotations

from typing import Any

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES"]
TRITON_DATA_TYPES = [f"TYPE_{t}" for t in ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                                           "INT64", "FP16", "FP32", "FP64", "STRING", "BF16")]

_string = {"type": "string"}
_parameter_value = {"type": ["string", "number", "boolean"]}
_parameters = {"type": "object", "additionalProperties": _parameter_value}
_tensor_data: dict[str, Any] = {"type": "array", "items": {"anyOf": [
    {"$ref": "#/$defs/tensor_data"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"}]}}


def _object(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": sorted(required)}


def _shape(minimum: int) -> dict[str, Any]:
    return {"type": "array", "items": {"type": "integer", "minimum": minimum}}


DEFS: dict[str, Any] = {
    "tensor_data": _tensor_data,
    "parameters": _parameters,
    "metadata_tensor": _object({"name": _string, "datatype": {"enum": DATATYPES}, "shape": _shape(-1)}),
}
_ref = {name: {"$ref": f"#/$defs/{name}"} for name in DEFS}

SCHEMAS: dict[str, dict[str, Any]] = {
    "error": _object({"error": {"type": "string", "minLength": 1}}),
    "server_metadata": _object({"name": _string, "version": _string,
                                "extensions": {"type": "array", "items": _string}}),
    "model_metadata": _object(
        {"name": _string, "platform": _string, "inputs": {"type": "array", "items": _ref["metadata_tensor"]},
         "outputs": {"type": "array", "items": _ref["metadata_tensor"]}},
        {"versions": {"type": "array", "items": _string}, "parameters": _ref["parameters"]}),
    "inference_request": _object(
        {"inputs": {"type": "array", "items": _object(
            {"name": _string, "shape": _shape(0), "datatype": {"enum": DATATYPES}, "data": _ref["tensor_data"]},
            {"parameters": _ref["parameters"]})}},
        {"id": _string, "parameters": _ref["parameters"],
         "outputs": {"type": "array", "items": _object({"name": _string}, {"parameters": _ref["parameters"]})}}),
    "inference_response": _object(
        {"model_name": _string, "outputs": {"type": "array", "items": _object(
            {"name": _string, "shape": _shape(0), "datatype": {"enum": DATATYPES}, "data": _ref["tensor_data"]},
            {"parameters": _ref["parameters"]})}},
        {"model_version": _string, "id": _string, "parameters": _ref["parameters"]}),
    # Triton's model configuration extension (GET .../config): ModelConfig as JSON.
    "model_config": _object(
        {"name": _string, "max_batch_size": {"type": "integer", "minimum": 0},
         "input": {"type": "array", "items": _object({"name": _string, "data_type": {"enum": TRITON_DATA_TYPES},
                                                      "dims": _shape(-1)})},
         "output": {"type": "array", "items": _object({"name": _string, "data_type": {"enum": TRITON_DATA_TYPES},
                                                       "dims": _shape(-1)})}},
        {"platform": _string, "backend": _string}),
}
for _schema in SCHEMAS.values():
    _schema["$defs"] = DEFS

# (method, path template, schema of a 200 answer or None where the protocol fixes no body)
MODEL = "/v2/models/{model}"
VERSIONED = "/v2/models/{model}/versions/{version}"
PATHS: list[tuple[str, str, str | None]] = [
    ("GET", "/v2/health/live", None),
    ("GET", "/v2/health/ready", None),
    ("GET", "/v2", "server_metadata"),
    *[(m, base + tail, schema) for base in (MODEL, VERSIONED) for m, tail, schema in (
        ("GET", "/ready", None), ("GET", "", "model_metadata"), ("POST", "/infer", "inference_response"),
        ("GET", "/config", "model_config"))],
]
