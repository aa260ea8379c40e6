"""ONNX Runtime for the frozen image encoder.

Every method encodes its views with the frozen image tower and no gradient, so that forward pass
can run in ONNX Runtime (CPU execution provider here, CUDA with onnxruntime-gpu) instead of
PyTorch eager. Whether it does is measured on the deployment's device when the model is loaded
(`enable_if_faster`), not assumed: on some CPUs and most GPUs eager PyTorch is as fast or faster.

Typical use:

- at archive time: ``export_image_encoder(clip, "image_encoder.onnx")`` (one file, dynamic batch);
- at load time: ``enable_if_faster(clip, "image_encoder.onnx")`` sets ``clip.image_encoder`` when
  ONNX Runtime wins a short timing on this device; `tta.features.encode_images` then uses it.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tta.models import ClipModel

log = logging.getLogger(__name__)

INPUT_NAME = "pixels"
OUTPUT_NAME = "features"
SINGLE_FILE_LIMIT = 1_900_000_000  # protobuf's 2 GB limit: above it weights go to a side file


def export_image_encoder(clip: ClipModel, path: str | Path, opset: int = 18) -> Path:
    """Export ``clip.model.visual`` (unnormalised features) to ONNX with a dynamic batch axis."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    visual = clip.model.visual.eval()
    size = clip.image_size
    example = torch.zeros(2, 3, size, size, device=clip.device)
    n_bytes = sum(p.numel() * p.element_size() for p in visual.parameters())
    batch = torch.export.Dim("batch", min=1, max=4096)
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            visual, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},), dynamo=True, opset_version=opset,
            external_data=n_bytes > SINGLE_FILE_LIMIT, verbose=False,
        )
    log.info("exported the image encoder of %s to %s in %.1f s", clip.name, path, time.perf_counter() - start)
    return path


def available_providers(device: torch.device) -> list[str]:
    """ONNX Runtime providers for `device`: CUDA first on a GPU when onnxruntime-gpu is installed."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in have:
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxImageEncoder:
    """Callable like ``model.encode_image``: float pixels [N, 3, S, S] -> features [N, d] (torch)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=available_providers(self.device))
        self.providers = self.session.get_providers()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        array = pixels.detach().float().cpu().contiguous().numpy()
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]
        return torch.from_numpy(out).to(pixels.device)

    def __repr__(self) -> str:
        return f"OnnxImageEncoder({self.path.name}, providers={self.providers})"


@dataclass
class EncoderChoice:
    """The outcome of the load-time timing: seconds per batch for each backend and the winner."""

    chosen: str  # "onnx" | "eager"
    eager_s: float
    onnx_s: float
    batch: int
    device: str
    providers: Sequence[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "eager_s": round(self.eager_s, 4), "onnx_s": round(self.onnx_s, 4),
                "batch": self.batch, "device": self.device, "providers": list(self.providers)}


def _median_time(fn: Any, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        fn(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def time_encoders(clip: ClipModel, encoder: OnnxImageEncoder, batch: int = 8, repeats: int = 3) -> EncoderChoice:
    """Time eager PyTorch and ONNX Runtime on the same batch (after one warm-up call each)."""
    size = clip.image_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(clip.device)
    eager = clip.model.encode_image
    eager(x), encoder(x)  # warm-up: allocator, thread pools, ORT's first-run graph work
    eager_s = _median_time(eager, x, repeats)
    onnx_s = _median_time(encoder, x, repeats)
    chosen = "onnx" if onnx_s < eager_s else "eager"
    return EncoderChoice(chosen, eager_s, onnx_s, batch, str(clip.device), encoder.providers)


def check_parity(clip: ClipModel, encoder: OnnxImageEncoder, pixels: torch.Tensor) -> float:
    """Smallest cosine similarity between eager and ONNX features on `pixels` (guards a bad export)."""
    with torch.no_grad():
        a = clip.model.encode_image(pixels.to(clip.device)).float()
        b = encoder(pixels.to(clip.device)).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def enable_if_faster(
    clip: ClipModel,
    path: str | Path,
    mode: str = "auto",
    batch: int = 8,
    repeats: int = 3,
    min_cosine: float = 0.9999,
) -> EncoderChoice | None:
    """Attach the ONNX encoder to `clip` when `mode` is "on", or "auto" and it is faster here.

    Returns the timing (None when `mode` is "off" or the file is missing). The choice is logged
    and stored in ``clip.info["image_encoder"]`` so the server can report it.
    """
    mode = os.environ.get("TTA_ONNX", mode)
    if mode == "off":
        clip.image_encoder = None
        return None
    if not Path(path).is_file():
        log.warning("ONNX image encoder %s not found: using eager PyTorch", path)
        return None
    encoder = OnnxImageEncoder(path, clip.device)
    probe = torch.randn(2, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(1))
    cosine = check_parity(clip, encoder, probe)
    if cosine < min_cosine:
        log.error("ONNX image encoder %s disagrees with the model (cosine %.6f): not used", path, cosine)
        return None
    if mode == "on":
        choice = EncoderChoice("onnx", 0.0, 0.0, 0, str(clip.device), encoder.providers)  # forced: not timed
    else:
        choice = time_encoders(clip, encoder, batch=batch, repeats=repeats)
    clip.image_encoder = encoder if choice.chosen == "onnx" else None
    clip.info["image_encoder"] = choice.to_dict()
    log.info("image encoder: %s (eager %.3f s, onnx %.3f s per batch of %d on %s)", choice.chosen,
             choice.eager_s, choice.onnx_s, choice.batch, choice.device)
    return choice
