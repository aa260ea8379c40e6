"""Frozen image encoding shared by every method."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tta.models import ClipModel


@torch.no_grad()
def encode_images(clip: ClipModel, views: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Normalised float32 image features [N, d] of normalised views [N, 3, S, S]."""
    views = views.to(clip.device)
    encode = clip.image_encoder or clip.model.encode_image
    chunks = [
        F.normalize(encode(views[i : i + batch_size]).float(), dim=-1)
        for i in range(0, views.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def zeroshot_logits(clip: ClipModel, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP's scaled cosine logits."""
    return clip.logit_scale * image_features @ text_features.t()
