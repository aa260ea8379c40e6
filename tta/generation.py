"""Diffusion-generated views of one image (DiffTPT's augmentation), bounded for serving.

DiffTPT (Feng et al., ICCV 2023) adds Stable Diffusion image variations of the test image to
TPT's augmented views. The paper generates 63-65 variations per image offline; a server has to
generate them per request, so the pipeline, the number of views, the diffusion steps and a
time budget are deployment parameters held in `GenerationConfig`.

A `ViewGenerator` wraps diffusers' `StableDiffusionImageVariationPipeline` (conditioned on the
CLIP image embedding of the request image). It is loaded once per worker and device
(`get_generator`), remembers how long a view took so a request can be refused *before* it
would blow its budget (`estimate_ms`), and enforces a deadline inside the denoising loop, so
a slow request costs at most the budget plus one UNet step. An optional LRU cache keyed by the
image's hash returns the same variations for a repeated image (off by default).

Pipeline specs: a hub id (default ``lambdalabs/sd-image-variations-diffusers`` at revision
``v2.0``, as in the paper), a local folder written by ``pipeline.save_pretrained(...)``, or
``tiny-random`` (random weights from `tta.testing.tiny_diffusion`, for tests and offline demos),
or ``sd-random`` (the real architecture with random weights, to measure cost on a GPU).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from tta.errors import ModelUnavailable, Unavailable

log = logging.getLogger(__name__)

DEFAULT_PIPELINE = "lambdalabs/sd-image-variations-diffusers"
DEFAULT_REVISION = "v2.0"
TINY_PIPELINE = "tiny-random"
SD_RANDOM_PIPELINE = "sd-random"  # the real architecture, random weights: cost measurements only
MAX_LOADED = 2  # generators kept per worker (one per (pipeline, device, dtype))
ESTIMATE_TTL_S = 60.0  # an older measurement is not trusted: the next request re-measures under its deadline

Dtype = Literal["auto", "float32", "float16", "bfloat16"]


class GenerationBudgetExceeded(Unavailable):
    """Generation was stopped (or refused) because it would not fit the request's time budget."""

    code = "generation_over_budget"


@dataclass(frozen=True)
class GenerationConfig:
    """How a deployment generates views. Defaults follow DiffTPT's generator script
    (image_generator_R.py: lambdalabs v2.0, guidance 3, the pipeline's 50 steps at its native
    512 px, input squashed to 224 and CLIP-normalised), except `n_views`, which the paper sets
    to 63 and a CPU or small-GPU deployment will want far lower."""

    pipeline: str = DEFAULT_PIPELINE
    revision: str | None = DEFAULT_REVISION
    enabled: bool = True
    n_views: int = 63
    max_views: int = 64  # per-request cap, whatever the request asks for
    steps: int = 50
    guidance_scale: float = 3.0
    resolution: int | None = None  # output pixels; None = the pipeline's native size
    dtype: Dtype = "auto"  # auto: float16 on CUDA, float32 elsewhere
    time_budget_ms: float = 60_000.0
    batch_size: int = 8  # views per pipeline call: bounds activation memory
    cache_size: int = 0  # LRU entries of generated views per generator; 0 = no cache

    def validate(self) -> None:
        from tta.methods.base import check

        check(bool(self.pipeline.strip()), "generator pipeline must be a hub id, a local folder or 'tiny-random'")
        check(0 <= self.n_views <= self.max_views, "generated views must be in [0, max_generated]")
        check(1 <= self.max_views <= 512, "max_generated must be in [1, 512]")
        check(1 <= self.steps <= 200, "diffusion steps must be in [1, 200]")
        check(0.0 <= self.guidance_scale <= 50.0, "guidance_scale must be in [0, 50]")
        check(self.resolution is None or (8 <= self.resolution <= 1024 and self.resolution % 8 == 0),
              "generation resolution must be a multiple of 8 in [8, 1024]")
        check(self.time_budget_ms >= 0.0, "generation time budget must be >= 0 ms")
        check(1 <= self.batch_size <= 64, "generation batch_size must be in [1, 64]")
        check(0 <= self.cache_size <= 4096, "generation cache_size must be in [0, 4096]")


def resolve_dtype(dtype: Dtype, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _unavailable(config: GenerationConfig, cause: BaseException | str) -> ModelUnavailable:
    where = f"'{config.pipeline}'" + (f" (revision {config.revision})" if config.revision else "")
    return ModelUnavailable(
        f"cannot load the image-variation pipeline {where}: {str(cause).splitlines()[0][:300]}. "
        "Offline, point the DiffTPT option 'generator' at a local folder written by "
        "StableDiffusionImageVariationPipeline.save_pretrained(...) (or pre-populate HF_HOME), "
        "use generator 'tiny-random' for smoke tests, or set 'generation' to false to serve plain TPT views."
    )


def load_pipeline(config: GenerationConfig, device: torch.device) -> Any:
    """The diffusers pipeline on `device`, from the local cache or folder first; ModelUnavailable if absent."""
    dtype = resolve_dtype(config.dtype, device)
    if config.pipeline in (TINY_PIPELINE, SD_RANDOM_PIPELINE):
        from tta.testing.tiny_diffusion import build_sd_variation_random, build_tiny_variation_pipeline

        pipe = build_tiny_variation_pipeline() if config.pipeline == TINY_PIPELINE else build_sd_variation_random()
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        from diffusers import StableDiffusionImageVariationPipeline

        from tta.models import hub_reachable

        local = Path(config.pipeline).expanduser()
        kwargs: dict[str, Any] = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
        try:
            if local.is_dir():
                pipe = StableDiffusionImageVariationPipeline.from_pretrained(str(local), **kwargs)
            elif config.pipeline.startswith(("/", "./", "~")):
                raise FileNotFoundError(f"{local} is not a folder")
            else:
                pipe = StableDiffusionImageVariationPipeline.from_pretrained(
                    config.pipeline, revision=config.revision, local_files_only=not hub_reachable(), **kwargs
                )
        except (OSError, ValueError, RuntimeError) as exc:
            raise _unavailable(config, exc) from exc
        pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class ViewGenerator:
    """One loaded pipeline on one device; generates variations of a uint8 image under a deadline."""

    def __init__(self, pipe: Any, config: GenerationConfig, device: torch.device) -> None:
        self.pipe = pipe
        self.config = config
        self.device = device
        self.dtype = resolve_dtype(config.dtype, device)
        processor = pipe.feature_extractor
        crop = processor.crop_size  # a dict or transformers' SizeDict, or an int in old configs
        self.input_size = int(crop if isinstance(crop, int) else crop["height"])
        self.input_mean = tuple(processor.image_mean)
        self.input_std = tuple(processor.image_std)
        self.native_resolution = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
        self.ms_per_view_step: float | None = None  # last measurement; drives the budget check
        self.measured_at = 0.0  # time.monotonic() of that measurement
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    # --- budget --------------------------------------------------------------------------
    def estimate_ms(self, n_views: int, steps: int) -> float | None:
        """Expected generation time from the last measured request; None before the first or
        when it is older than `ESTIMATE_TTL_S`, so one slow outlier cannot refuse generation
        forever (refused requests measure nothing): the next request runs under its deadline."""
        if self.ms_per_view_step is None or time.monotonic() - self.measured_at > ESTIMATE_TTL_S:
            return None
        return self.ms_per_view_step * n_views * steps

    def _measured(self, ms_per_view_step: float) -> None:
        self.ms_per_view_step = ms_per_view_step
        self.measured_at = time.monotonic()

    # --- cache ---------------------------------------------------------------------------
    @staticmethod
    def image_key(image: torch.Tensor) -> str:
        data = image.detach().to("cpu").contiguous()
        digest = hashlib.sha256(data.numpy().tobytes())
        digest.update(str(tuple(data.shape)).encode())
        return digest.hexdigest()

    def cached(self, key: tuple) -> torch.Tensor | None:
        if self.config.cache_size <= 0:
            return None
        with self._lock:
            views = self._cache.get(key)
            if views is None:
                self.cache_misses += 1
                return None
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return views

    def _store(self, key: tuple, views: torch.Tensor) -> None:
        if self.config.cache_size <= 0:
            return
        with self._lock:
            self._cache[key] = views
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    # --- generation ----------------------------------------------------------------------
    def _condition(self, image: torch.Tensor) -> torch.Tensor:
        """The paper's pipeline input: squash to the encoder's size (bicubic), CLIP-normalise."""
        x = image.to(self.device).float().div(255.0).unsqueeze(0)
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        mean = torch.tensor(self.input_mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.input_std, device=self.device).view(1, -1, 1, 1)
        return ((x.clamp(0.0, 1.0) - mean) / std).to(self.dtype)

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        n_views: int,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        out_size: int | None = None,
        deadline: float | None = None,
    ) -> torch.Tensor:
        """uint8 [n, 3, S, S] variations of a uint8 [3, H, W] image (S = out_size or the native size).

        `deadline` is a `time.perf_counter()` instant; past it, generation stops inside the
        denoising loop with `GenerationBudgetExceeded`. Views are quantised to 8 bits like the
        paper's saved images, which also keeps cached entries small.
        """
        steps = steps or self.config.steps
        guidance = self.config.guidance_scale if guidance_scale is None else guidance_scale
        resolution = self.config.resolution or self.native_resolution
        key = (self.image_key(image), n_views, steps, guidance, resolution, out_size)
        hit = self.cached(key)
        if hit is not None:
            return hit
        condition = self._condition(image)
        generator = torch.Generator(device=self.device).manual_seed(int(seed))

        start = time.perf_counter()
        view_steps = 0  # denoising steps done x views in the batch: the unit of the estimate
        batch = 0

        def check_deadline(*_: Any) -> None:
            nonlocal view_steps
            if _:  # called by the pipeline after a denoising step
                view_steps += batch
            if deadline is not None and time.perf_counter() > deadline:
                elapsed = (time.perf_counter() - start) * 1000.0
                # an aborted run still measures the current speed (a lower bound when no step finished)
                self._measured(elapsed / max(view_steps, 1))
                raise GenerationBudgetExceeded("generation passed its deadline")

        chunks = []
        done = 0
        while done < n_views:
            check_deadline()
            batch = min(self.config.batch_size, n_views - done)
            images = self.pipe(
                condition, height=resolution, width=resolution, num_inference_steps=steps,
                guidance_scale=guidance, num_images_per_prompt=batch, generator=generator,
                output_type="pt", callback=check_deadline, callback_steps=1,
            ).images
            images = images.float()
            if out_size is not None and out_size != resolution:
                images = F.interpolate(images, size=(out_size, out_size), mode="bicubic", align_corners=False,
                                       antialias=True)
            chunks.append(images.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8).cpu())
            done += batch
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        if n_views > 0:
            self._measured(elapsed_ms / (n_views * steps))
        views = torch.cat(chunks) if chunks else torch.empty(0, 3, out_size or resolution, out_size or resolution,
                                                             dtype=torch.uint8)
        self._store(key, views)
        return views


_LOADED: OrderedDict[tuple, ViewGenerator] = OrderedDict()
_LOAD_LOCK = threading.Lock()


def get_generator(config: GenerationConfig, device: torch.device | str) -> ViewGenerator:
    """The worker's generator for this pipeline and device, loaded on first use and then shared."""
    device = torch.device(device)
    key = (config.pipeline, config.revision, config.dtype, str(device))
    with _LOAD_LOCK:
        gen = _LOADED.get(key)
        if gen is not None:
            _LOADED.move_to_end(key)
            if gen.config != config:  # same weights, other knobs (steps, cache): keep the measurements
                gen.config = config
            return gen
        start = time.perf_counter()
        pipe = load_pipeline(config, device)
        gen = ViewGenerator(pipe, config, device)
        _LOADED[key] = gen
        while len(_LOADED) > MAX_LOADED:
            _LOADED.popitem(last=False)
        log.info("loaded image-variation pipeline %s on %s in %.1f s", config.pipeline, device,
                 time.perf_counter() - start)
        return gen
