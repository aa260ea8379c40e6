"""A corpus of hostile request bodies, generated (nothing binary is checked in).

Used by the hostile-input tests (tests/unit/test_hostile_codec.py, tests/integration/
test_hostile.py) and by the soak run (bench/soak.py), so the same bodies are checked for
correctness and under load. Every case is a `Case`: a name, the body bytes, the request headers
and what answer is acceptable (``"2xx"``, ``"4xx"`` or ``"any"``; a 5xx is never acceptable).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

JSON = {"Content-Type": "application/json"}
IMAGE = {"Content-Type": "application/octet-stream"}


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    expect: str = "4xx"  # "2xx" | "4xx" | "any" (any but 5xx)


def photo(size: int = 64, seed: int = 0) -> Image.Image:
    """A small RGB image with structure (gradients + noise), not a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1)
    return Image.fromarray((base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=8)
def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid grayscale PNG header of width x height whose IDAT holds `rows` zero rows
    (all of them by default: a real decompression bomb, ~1 kB per 1M pixels)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(1)
    rows = height if rows is None else rows
    block = b"\x00" * (width + 1) * max(1, min(rows, (8 << 20) // (width + 1)))  # ~8 MB of rows at a time
    parts, left = [], (width + 1) * rows
    while left > 0:
        chunk = block[:left]
        parts.append(compressor.compress(chunk))
        left -= len(chunk)
    parts.append(compressor.flush())
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def exif_rotated_jpeg() -> bytes:
    """A JPEG whose EXIF orientation (6: rotate 90° clockwise) differs from its pixel layout."""
    image = photo(48).resize((64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [photo(32, seed=i).convert("P") for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def image_cases() -> list[Case]:
    """Raw-body images: odd but valid ones must be answered (2xx), broken ones refused (4xx)."""
    good = photo()
    jpeg = encode(good, "JPEG", quality=85)
    sixteen = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # mode I;16
    palette = good.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    return [
        Case("jpeg", jpeg, IMAGE, "2xx"),
        Case("png-rgba", encode(good.convert("RGBA"), "PNG"), IMAGE, "2xx"),
        Case("cmyk-jpeg", encode(good.convert("CMYK"), "JPEG"), IMAGE, "2xx"),
        Case("16-bit-png", encode(sixteen, "PNG"), IMAGE, "2xx"),
        Case("palette-png-transparent", encode(palette, "PNG"), IMAGE, "2xx"),
        Case("grayscale-alpha-png", encode(good.convert("LA"), "PNG"), IMAGE, "2xx"),
        Case("animated-gif", animated_gif(), IMAGE, "2xx"),
        Case("animated-webp", _animated_webp(), IMAGE, "2xx"),
        Case("exif-rotated-jpeg", exif_rotated_jpeg(), IMAGE, "2xx"),
        Case("one-pixel", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), IMAGE, "2xx"),
        Case("strip-1x20000", png_bomb(20000, 1), IMAGE, "2xx"),
        Case("strip-20000x1", png_bomb(1, 20000), IMAGE, "2xx"),
        Case("bmp", encode(good, "BMP"), IMAGE, "2xx"),
        Case("tiff", encode(good, "TIFF"), IMAGE, "2xx"),
        Case("png-bomb-64mp", png_bomb(8_000, 8_000), IMAGE, "4xx"),
        Case("huge-dims-tiny-file", png_bomb(60_000, 60_000, rows=2), IMAGE, "4xx"),
        Case("zero-width-png", png_bomb(0, 10, rows=0), IMAGE, "4xx"),
        Case("truncated-jpeg", jpeg[: len(jpeg) // 2], IMAGE, "4xx"),
        Case("truncated-png", encode(good, "PNG")[:60], IMAGE, "4xx"),
        Case("jpeg-header-only", jpeg[:20], IMAGE, "4xx"),
        Case("empty-body", b"", IMAGE, "4xx"),
        Case("random-bytes", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), IMAGE, "4xx"),
        Case("text-body", b"hello, model", {"Content-Type": "text/plain"}, "4xx"),
        Case("url-body", b"http://127.0.0.1:1/image.png", {"Content-Type": "text/plain"}, "4xx"),
        Case("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', IMAGE, "4xx"),
    ]


def _animated_webp() -> bytes:
    frames = [photo(32, seed=i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def nested(depth: int, kind: str = "list") -> str:
    """JSON text nested `depth` levels deep."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def _raw(**fields: str) -> bytes:
    """A JSON object from already-encoded JSON values (for what json.dumps cannot write)."""
    return ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()


def json_cases(image: bytes | None = None) -> list[Case]:
    """JSON bodies of every form (prediction, action, OIP) with bad structure, types and values."""
    image = image or encode(photo(), "JPEG")
    img = b64(image)
    cases: list[tuple[str, object, str]] = [
        ("json-ok", {"image": img, "top_k": 3}, "2xx"),
        ("json-unicode-labels", {"image": img, "labels": ["猫", "🐕 dog", "a\u202eb", "\u0000nul"]}, "2xx"),
        ("json-100kb-label", {"image": img, "labels": ["x" * 100_000, "cat"]}, "4xx"),
        ("json-many-labels", {"image": img, "labels": [f"class {i}" for i in range(5000)]}, "4xx"),
        ("json-empty-labels", {"image": img, "labels": []}, "4xx"),
        ("json-duplicate-labels", {"image": img, "labels": ["cat", "cat"]}, "4xx"),
        ("json-labels-not-list", {"image": img, "labels": "cat,dog"}, "4xx"),
        ("json-nan-option", {"image": img, "method": "tpt", "options": {"lr": float("nan")}}, "4xx"),
        ("json-inf-option", {"image": img, "method": "tpt", "options": {"lr": float("inf")}}, "4xx"),
        ("json-negative-views", {"image": img, "method": "tpt", "options": {"n_views": -4}}, "4xx"),
        ("json-huge-views", {"image": img, "method": "tpt", "options": {"n_views": 10**12}}, "4xx"),
        ("json-huge-steps", {"image": img, "method": "tpt", "options": {"steps": 10**9}}, "4xx"),
        ("json-string-views", {"image": img, "method": "zero", "options": {"n_views": "8"}}, "any"),
        ("json-unknown-option", {"image": img, "method": "tpt", "options": {"evil": 1}}, "4xx"),
        ("json-options-list", {"image": img, "options": [1, 2]}, "4xx"),
        ("json-top-k-zero", {"image": img, "top_k": 0}, "4xx"),
        ("json-top-k-huge", {"image": img, "top_k": 10**20}, "4xx"),
        ("json-top-k-nan", {"image": img, "top_k": float("nan")}, "4xx"),
        ("json-top-k-string", {"image": img, "top_k": "5"}, "4xx"),
        ("json-seed-huge", {"image": img, "seed": 10**30}, "any"),
        ("json-seed-negative", {"image": img, "seed": -5}, "any"),
        ("json-seed-float", {"image": img, "seed": 1.5}, "4xx"),
        ("json-method-unknown", {"image": img, "method": "rm -rf"}, "4xx"),
        ("json-method-number", {"image": img, "method": 3}, "4xx"),
        ("json-image-garbage", {"image": "!!!not base64!!!"}, "4xx"),
        ("json-image-b64-text", {"image": b64(b"hello world, not an image")}, "4xx"),
        ("json-image-empty", {"image": ""}, "4xx"),
        ("json-image-number", {"image": 12}, "4xx"),
        ("json-image-list", {"image": [img]}, "4xx"),
        ("json-image-bomb", {"image": b64(png_bomb(8_000, 8_000))}, "4xx"),
        ("json-data-url", {"image": "data:image/jpeg;base64," + img}, "2xx"),
        ("json-unknown-field", {"image": img, "path": "/etc/passwd"}, "4xx"),
        ("json-no-image", {"method": "zeroshot"}, "4xx"),
        ("json-deadline-negative", {"image": img, "deadline_ms": -1}, "4xx"),
        ("json-deadline-string", {"image": img, "deadline_ms": "soon"}, "4xx"),
        ("action-state", {"action": "state", "method": "tda"}, "2xx"),
        ("action-unknown", {"action": "drop_tables"}, "4xx"),
        ("action-number", {"action": 7}, "4xx"),
        ("action-method-list", {"action": "state", "method": ["tda"]}, "4xx"),
        ("action-import-no-auth", {"action": "import", "method": "tda", "state": {}}, "4xx"),
        ("action-reset-no-auth", {"action": "reset", "method": "tda"}, "4xx"),
        ("action-export-no-auth", {"action": "export", "method": "tda"}, "4xx"),
        ("action-feedback-no-auth", {"action": "feedback", "method": "gda", "label": "cat", "image": img}, "4xx"),
        ("oip-ok", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [img]}]}, "2xx"),
        ("oip-inputs-not-list", {"inputs": {"name": "image"}}, "4xx"),
        ("oip-inputs-empty", {"inputs": []}, "4xx"),
        ("oip-wrong-datatype", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
         "4xx"),
        ("oip-data-garbage", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, "4xx"),
        ("oip-data-number", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": 5}]}, "4xx"),
        ("oip-parameters-list", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [img]}], "parameters": [1]},
         "4xx"),
        ("oip-options-bad-json", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [img]}],
                                  "parameters": {"options": "{not json"}}, "4xx"),
        ("oip-many-images-deep", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                             "data": [[[[["%%"]]]]]}]}, "4xx"),
        ("oip-wrong-input-name", {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": [img]}]},
         "4xx"),
        ("oip-shape-vs-count", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [img]}]}, "4xx"),
        ("oip-shape-huge", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2**62], "data": [img]}]}, "4xx"),
        ("oip-shape-empty", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [], "data": [img]}]}, "4xx"),
        ("oip-extra-input", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [img]},
                                        {"name": "extra", "datatype": "BYTES", "shape": [1], "data": [img]}]}, "4xx"),
        ("oip-unknown-parameter", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [img]}],
                                   "parameters": {"methd": "tpt"}}, "4xx"),
        ("oip-unknown-tensor-parameter", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                      "data": [img], "parameters": {"colour": "rgb"}}]}, "4xx"),
    ]
    out = [Case(name, json.dumps(body).encode(), JSON, expect) for name, body, expect in cases]
    out += [
        Case("json-nested-5000-list", nested(5000).encode(), JSON, "4xx"),
        Case("json-nested-5000-object", nested(5000, "object").encode(), JSON, "4xx"),
        Case("json-nested-900-options", _raw(image=f'"{img}"', options=nested(900, "object")), JSON, "4xx"),
        Case("json-nested-900-import", _raw(action='"import"', method='"tda"', state=nested(900, "object")),
             JSON, "4xx"),
        Case("json-truncated", b'{"image": "' + img[:100].encode(), JSON, "4xx"),
        Case("json-not-utf8", b'{"image": "\xff\xfe"}', JSON, "4xx"),
        Case("json-lone-surrogate-label", _raw(image=f'"{img}"', labels='["\\ud800", "cat"]'), JSON, "any"),
        Case("json-array-top", b"[1, 2, 3]", JSON, "4xx"),
        Case("json-scalar-top", b"42", JSON, "4xx"),
        Case("json-null", b"null", JSON, "4xx"),
        Case("json-duplicate-keys", f'{{"image": "{img}", "image": "!!"}}'.encode(), JSON, "4xx"),
        Case("json-nan-literal", _raw(image=f'"{img}"', top_k="NaN"), JSON, "4xx"),
    ]
    return out


def oip_binary_cases(image: bytes | None = None) -> list[Case]:
    """tritonclient's binary tensor extension: a JSON header, then length-prefixed elements."""
    image = image or encode(photo(), "JPEG")
    element = struct.pack("<I", len(image)) + image

    def body(header: dict, tail: bytes, length: int | str | None = None) -> tuple[bytes, dict[str, str]]:
        raw = json.dumps(header).encode()
        size = str(len(raw) if length is None else length)
        return raw + tail, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": size}

    def header(n: int | str) -> dict:
        return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "parameters": {"binary_data_size": n}}]}

    cases = [
        ("oip-binary-ok", *body(header(len(element)), element), "2xx"),
        ("oip-binary-size-too-big", *body(header(len(element) + 100), element), "4xx"),
        ("oip-binary-size-negative", *body(header(-1), element), "4xx"),
        ("oip-binary-size-string", *body(header("12"), element), "4xx"),
        ("oip-binary-element-overflow", *body(header(8), struct.pack("<I", 2**31) + b"abcd"), "4xx"),
        ("oip-binary-truncated-prefix", *body(header(2), b"\x01\x00"), "4xx"),
        ("oip-binary-header-length-zero", *body(header(len(element)), element, length=0), "4xx"),
        ("oip-binary-header-length-garbage", *body(header(len(element)), element, length="abc"), "4xx"),
        ("oip-binary-header-length-huge", *body(header(len(element)), element, length=10**9), "4xx"),
        ("oip-binary-not-an-image", *body(header(12), struct.pack("<I", 8) + b"\x00" * 8), "4xx"),
    ]
    return [Case(name, raw, headers, expect) for name, raw, headers, expect in cases]


def corpus() -> list[Case]:
    """Every case: images, JSON (all forms), OIP binary."""
    return image_cases() + json_cases() + oip_binary_cases()
