"""Operations: the unit of change of stream state, and their compact wire form.

An operation is a flat dict: ``{"kind": str, ...}`` whose values are JSON values, tensors, or
bytes. Owners apply operations deterministically, so the same operations in the same order give
bit-identical state on every replica. Two kinds belong to the host and are never passed to an
owner's `apply`: ``reset`` (back to empty) and ``import`` (``state``: snapshot bytes).

Wire form (for the Redis stream): a 4-byte little-endian header length, a JSON header that holds
the plain values and, per tensor/bytes value, its dtype, shape and byte range, then the raw bytes.
Floats survive exactly (JSON writes the shortest repr that round-trips; tensors go as raw bytes),
and decoding never runs code. Encoding a TDA operation at ImageNet size (a 512-d feature and
1000 probabilities) takes a few microseconds; `torch.save` would take hundreds.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import torch

Op = dict[str, Any]
RESET = "reset"
IMPORT = "import"
HOST_KINDS = (RESET, IMPORT)
_LEN = struct.Struct("<I")
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                                     torch.int64, torch.int32, torch.uint8, torch.bool)}


def encode(op: Mapping[str, Any]) -> bytes:
    """Operation -> bytes (see the module docstring)."""
    plain: dict[str, Any] = {}
    blobs: dict[str, list[Any]] = {}
    chunks: list[bytes] = []
    offset = 0
    for key, value in op.items():
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            blobs[key] = [str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, len(raw)]
        elif isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            blobs[key] = ["bytes", None, offset, len(raw)]
        else:
            plain[key] = value
            continue
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps({"v": plain, "b": blobs}, separators=(",", ":"), allow_nan=False).encode()
    return _LEN.pack(len(header)) + header + b"".join(chunks)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a value an operation may carry")  # encode never writes NaN/Infinity


def decode(data: bytes) -> Op:
    """Inverse of `encode`; ValueError on anything malformed."""
    try:
        (length,) = _LEN.unpack_from(data)
        header = json.loads(data[_LEN.size:_LEN.size + length], parse_constant=_no_constant)
        body = memoryview(data)[_LEN.size + length:]
        op: Op = dict(header["v"])
        for key, (dtype, shape, start, size) in header["b"].items():
            raw = body[start:start + size]
            if len(raw) != size:
                raise ValueError(f"operation field {key!r} is truncated")
            if dtype == "bytes":
                op[key] = bytes(raw)
            elif size == 0:
                op[key] = torch.empty(shape, dtype=_DTYPES[dtype])
            else:
                op[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(_DTYPES[dtype]).reshape(shape)
    except (struct.error, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"malformed state operation: {exc}") from exc
    if not isinstance(op.get("kind"), str):
        raise ValueError("malformed state operation: no 'kind'")
    return op
