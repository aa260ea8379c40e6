"""A tiny CLIP trained on scikit-learn's handwritten digits, and shifted test streams.

Accuracy tests need a model whose zero-shot predictions mean something; no real CLIP weights can
be downloaded in CI, so we train one: 8x8 digits upsampled to 64x64, classified against the
prompts "a photo of a {name}." with a contrastive (image -> class-text) loss that trains both
towers. Training takes well under a minute on 2 cores and the weights are cached (atomic write)
under ``$TTA_CACHE_DIR`` (default ``~/.cache/clip-tta``).

Training is deterministic on one machine: seeded, one thread (a reduction split over threads
rounds differently with the thread count) and ``torch.use_deterministic_algorithms``. A different
CPU still rounds differently (other SIMD kernels), so its weights differ in the last bits and, after
hundreds of steps, in the predictions of a few borderline images: tests must not depend on exact
weights (see docs/portability.md). The cache key (`cache_key`) hashes everything that changes the
weights: this file, the config, and the torch / torchvision / open_clip / scikit-learn versions and
torch's CPU kernel level, so a stale cache is never loaded.

Two strengths: ``base`` (clean training, the policy/zero-shot model) and ``strong`` (wider,
longer, trained with the same shifts the tests apply: a better teacher/reward model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tta.models import OPENAI_MEAN, OPENAI_STD, ClipModel, _freeze, _tokenizer_for, seeded

log = logging.getLogger(__name__)

DIGIT_CLASSNAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
IMAGE_SIZE = 64
CACHE_VERSION = "v3"  # bump to invalidate every cache by hand; the key also hashes the code (cache_key)
TRAIN_THREADS = 1
SHIFT_KINDS = ("noise", "blur", "contrast", "rotate")

_CONFIGS = {
    "base": dict(width=64, layers=2, epochs=30, shift_augment=False, seed=0, lr=1e-3),
    "strong": dict(width=96, layers=3, epochs=40, shift_augment=True, seed=1, lr=1e-3),
}


def cache_dir() -> Path:
    return Path(os.environ.get("TTA_CACHE_DIR", Path.home() / ".cache" / "clip-tta"))


@lru_cache(maxsize=2)
def _split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train_idx, test_idx = train_test_split(range(len(target)), test_size=0.3, random_state=0, stratify=target)
    return torch.tensor(sorted(train_idx)), torch.tensor(sorted(test_idx))


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.tensor(data.target, dtype=torch.int64)


def digits_split(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 3, 64, 64], int64 labels [N]) of a fixed stratified 70/30 split."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    images, labels = _all_digits()
    idx = _split_indices()[0 if split == "train" else 1]
    return images[idx].clone(), labels[idx].clone()


def shift_images(images: torch.Tensor, kind: str, severity: int = 3, seed: int = 0) -> torch.Tensor:
    """A distribution-shifted copy of uint8 images [N, 3, H, W]: noise, blur, contrast or rotate."""
    if kind not in SHIFT_KINDS:
        raise ValueError(f"kind must be one of {SHIFT_KINDS}")
    gen = torch.Generator().manual_seed(seed)
    x = images.float()
    if kind == "noise":
        x = x + torch.randn(x.shape, generator=gen) * (20.0 * severity)
    elif kind == "blur":
        sigma = 0.6 * severity
        kernel = 2 * round(2 * sigma) + 1
        x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    elif kind == "contrast":
        factor = max(0.05, 1.0 - 0.18 * severity)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factor + mean
    else:  # rotate
        angles = (torch.rand(x.shape[0], generator=gen) * 2 - 1) * (12.0 * severity)
        x = torch.stack([TF.rotate(img, float(a), interpolation=v2.InterpolationMode.BILINEAR)
                         for img, a in zip(x, angles, strict=True)])
    return x.clamp(0, 255).round().to(torch.uint8)


def _normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _augment(images: torch.Tensor, gen: torch.Generator, shifts: bool) -> torch.Tensor:
    """Crops/translations (so crop-based views stay in-distribution) and, for `strong`, the test shifts."""
    crop = v2.RandomResizedCrop(IMAGE_SIZE, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = torch.stack([crop(img) for img in images])
    if shifts:
        kinds = torch.randint(0, len(SHIFT_KINDS) + 1, (1,), generator=gen).item()
        if kinds < len(SHIFT_KINDS):
            sev = int(torch.randint(1, 4, (1,), generator=gen))
            out = shift_images(out, SHIFT_KINDS[kinds], sev, seed=int(torch.randint(0, 10**6, (1,), generator=gen)))
    return out


def build_digits_model(width: int, layers: int) -> torch.nn.Module:
    import open_clip

    return open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=IMAGE_SIZE, layers=layers, width=width, patch_size=16, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )


@contextlib.contextmanager
def deterministic_training(threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the duration; the caller's settings come back."""
    previous_threads = torch.get_num_threads()
    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_det, warn_only=previous_warn)
        torch.set_num_threads(previous_threads)


def cache_key(strength: str) -> str:
    """A digest of everything that changes the trained weights (code, config, library versions, CPU kernels)."""
    import open_clip
    import sklearn
    import torchvision

    parts = {
        "version": CACHE_VERSION,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "config": _CONFIGS[strength],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "open_clip": open_clip.__version__,
        "sklearn": sklearn.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": TRAIN_THREADS,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(strength: str) -> Path:
    return cache_dir() / "digits" / f"digits-clip-{strength}-{cache_key(strength)}.pt"


def train_digits_clip(strength: str = "base") -> torch.nn.Module:
    """Train the tiny digits CLIP from scratch (bit-identical for a given strength on one machine)."""
    with deterministic_training():
        return _train(strength)


def _train(strength: str) -> torch.nn.Module:
    cfg = _CONFIGS[strength]
    tokenizer = _tokenizer_for("ViT-B-32")
    with seeded(cfg["seed"]):
        model = build_digits_model(cfg["width"], cfg["layers"])
    images, labels = digits_split("train")
    tokens = tokenizer([f"a photo of a {name}." for name in DIGIT_CLASSNAMES])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.05)
    gen = torch.Generator().manual_seed(cfg["seed"])
    steps_per_epoch = (len(images) + 63) // 64
    total = cfg["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=total, pct_start=0.15)
    model.train()
    start = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        order = torch.randperm(len(images), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * 64 : (step + 1) * 64]
            batch = _normalize(_augment(images[idx], gen, cfg["shift_augment"]))
            img = F.normalize(model.encode_image(batch), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
        log.info("digits CLIP (%s) epoch %d/%d loss %.3f (%.0f s)", strength, epoch + 1, cfg["epochs"],
                 float(loss.detach()), time.perf_counter() - start)
    return model


def _atomic_save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_digits_clip(strength: str = "base") -> ClipModel:
    """The trained digits CLIP (trains and caches it on first use)."""
    if strength not in _CONFIGS:
        raise ValueError(f"strength must be one of {sorted(_CONFIGS)}")
    cfg = _CONFIGS[strength]
    path = cache_path(strength)
    model = None
    if path.is_file():
        try:
            model = build_digits_model(cfg["width"], cfg["layers"])
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # a corrupt cache is rebuilt, not fatal
            log.warning("digits CLIP cache %s unreadable (%s); retraining", path, exc)
            model = None
    if model is None:
        log.warning("training the digits CLIP (%s) once; cached at %s", strength, path)
        model = train_digits_clip(strength)
        _atomic_save(model.state_dict(), path)
    return ClipModel(model=_freeze(model), tokenizer=_tokenizer_for("ViT-B-32"), name=f"tiny-digits-{strength}",
                     image_size=IMAGE_SIZE, info={"source": "digits", "path": str(path)})
