"""Decoding request bytes into image tensors, with the checks a public endpoint needs.

Everything that can go wrong with client bytes (empty, not an image, truncated, a
decompression bomb) becomes a `BadRequest` with its own code, so the edge answers 4xx.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tta.errors import BadRequest

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; larger is treated as a decompression bomb
DEFAULT_MAX_BYTES = 20 * 1024 * 1024


def decode_image(
    data: bytes | bytearray | memoryview,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Encoded JPEG/PNG/WebP/... bytes -> uint8 RGB tensor [3, H, W]."""
    data = bytes(data)
    if not data:
        raise BadRequest("empty request body: send an encoded image", code="empty_body")
    if len(data) > max_bytes:
        raise BadRequest(f"image is {len(data)} bytes, more than the limit of {max_bytes}", code="image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadRequest(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
                    code="image_too_large",
                )
            image.load()
    except BadRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadRequest(f"image rejected as a decompression bomb: {exc}", code="image_too_large") from exc
    except UnidentifiedImageError as exc:
        raise BadRequest("body is not a decodable image (JPEG, PNG, WebP, ...)", code="not_an_image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadRequest(f"image is truncated or corrupt: {exc}", code="corrupt_image") from exc
    return pil_to_tensor(upright(image))


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phones store the rotation there, not in the pixels)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        return image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> contiguous uint8 RGB tensor [3, H, W]."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def load_image_file(path: str) -> torch.Tensor:
    """Read and decode an image file (the CLI's path)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise BadRequest(f"cannot read image {path}: {exc.strerror or exc}", code="unreadable_image") from exc
    return decode_image(data)
