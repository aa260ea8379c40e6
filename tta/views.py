"""Test-time views of one image, built as batched tensor ops on the model's device.

The TPT/ZERO views are the original image (resize + center crop) and N-1 random resized crops
with random horizontal flips; the AugMix variant (TPT's cross-dataset setting) mixes
augmentation chains into each crop. Crop sampling uses a CPU `torch.Generator`, so a seed gives
the same views on CPU and GPU; the crops themselves are one `roi_align` call on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

MAX_SIDE_FACTOR = 4  # images are first downscaled so their short side is at most 4x the model size
MAX_ASPECT = 8  # longer strips are center-cropped first: a 1 x 40,000 image would otherwise resize to 224 x 9e6


@dataclass(frozen=True)
class ViewSpec:
    """What views to make; defaults are TPT's ImageNet setting (crops + flips, no AugMix)."""

    n_views: int = 64
    augmix: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    augmix_severity: int = 1


def limit_resolution(image: torch.Tensor, size: int) -> torch.Tensor:
    """Downscale huge images first so the crop cost does not grow with the upload's megapixels."""
    h, w = image.shape[-2:]
    short = min(h, w)
    if short <= MAX_SIDE_FACTOR * size:
        return image
    return TF.resize(image, [MAX_SIDE_FACTOR * size], antialias=True)


def limit_aspect(image: torch.Tensor, max_aspect: int = MAX_ASPECT) -> torch.Tensor:
    """Center-crop the long side of extreme strips to `max_aspect` x the short side.

    Resizing the short side to the model size scales the long side by the same factor, so a
    tiny-file 1 x 40,000 upload would allocate gigabytes. The center crop every view is taken
    from is far inside the kept strip; images up to `max_aspect`:1 are untouched.
    """
    h, w = image.shape[-2:]
    short, long = min(h, w), max(h, w)
    if long <= max_aspect * short:
        return image
    keep = max_aspect * short
    if h > w:
        return TF.center_crop(image, [keep, w])
    return TF.center_crop(image, [h, keep])


def base_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's eval preprocessing on a uint8 [3, H, W] tensor: bicubic resize + center crop -> float [0, 1]."""
    x = TF.resize(limit_aspect(image), [size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [size, size])
    return x.float().div_(255.0).clamp_(0.0, 1.0)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def sample_crop_boxes(
    n: int, height: int, width: int, spec: ViewSpec, generator: torch.Generator
) -> torch.Tensor:
    """RandomResizedCrop boxes [n, 4] (x1, y1, x2, y2), torchvision's 10-try rule, vectorised."""
    area = height * width
    tries = 10
    target_area = area * torch.empty(n, tries).uniform_(spec.scale[0], spec.scale[1], generator=generator)
    log_ratio = torch.empty(n, tries).uniform_(math.log(spec.ratio[0]), math.log(spec.ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    u = torch.rand(n, tries, 2, generator=generator)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    boxes = torch.empty(n, 4)
    for i in range(n):  # n <= a few hundred: cheap
        j = int(first[i])
        if j >= 0:
            cw, ch = float(w[i, j]), float(h[i, j])
            x1 = math.floor(float(u[i, j, 0]) * (width - cw + 1))
            y1 = math.floor(float(u[i, j, 1]) * (height - ch + 1))
        else:  # fallback: central crop with the ratio clamped, as torchvision does
            in_ratio = width / height
            if in_ratio < spec.ratio[0]:
                cw, ch = width, round(width / spec.ratio[0])
            elif in_ratio > spec.ratio[1]:
                ch, cw = height, round(height * spec.ratio[1])
            else:
                cw, ch = width, height
            x1, y1 = (width - cw) // 2, (height - ch) // 2
        boxes[i] = torch.tensor([x1, y1, x1 + cw, y1 + ch])
    return boxes


def make_views(
    image: torch.Tensor,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    spec: ViewSpec = ViewSpec(),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """uint8 [3, H, W] -> normalised float [n_views, 3, size, size]; view 0 is the original."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = torch.device(device) if device is not None else image.device
    image = limit_aspect(image.to(device))
    original = base_view(image, size)  # exact CLIP preprocessing of the full-resolution upload
    image = limit_resolution(image, size)
    n_aug = spec.n_views - 1
    if n_aug <= 0:
        return normalize(original, mean, std).unsqueeze(0)
    height, width = image.shape[-2:]
    boxes = sample_crop_boxes(n_aug, height, width, spec, generator)
    flips = torch.rand(n_aug, generator=generator) < 0.5 if spec.flip else torch.zeros(n_aug, dtype=torch.bool)
    rois = torch.cat([torch.zeros(n_aug, 1), boxes], dim=1).to(device)
    crops = roi_align(image.float().unsqueeze(0) / 255.0, rois, output_size=(size, size),
                      spatial_scale=1.0, sampling_ratio=-1, aligned=True).clamp_(0.0, 1.0)
    flips = flips.to(device)
    crops = torch.where(flips.view(-1, 1, 1, 1), crops.flip(-1), crops)
    if spec.augmix:
        crops = augmix_views(crops, spec.augmix_severity, generator)
    views = torch.cat([original.unsqueeze(0), crops], dim=0)
    return normalize(views, mean, std)


def augmix_views(crops: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """AugMix (torchvision's implementation, ImageNet-C ops excluded as in TPT) per crop."""
    augmix = v2.AugMix(severity=severity, all_ops=False)
    as_uint8 = (crops * 255.0).round_().to(torch.uint8)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    out = torch.empty_like(crops)
    with torch.random.fork_rng(devices=[]):  # AugMix draws from the global RNG: keep it seeded and local
        torch.manual_seed(seed)
        for i in range(as_uint8.shape[0]):
            out[i] = augmix(as_uint8[i]).float() / 255.0
    return out


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a float batch to size x size (for externally generated views)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
