"""Frozen image encoding shared by every method.

`Engine.predict_batch` encodes the views of a whole batch in shared passes first, then runs each
request's method under `precomputed_features`: when a method asks to encode exactly those views
(bit-identical tensor), it gets the shared result instead of a second forward. Any other call
encodes as usual, so a method never depends on the batch path to be correct.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from tta.models import ClipModel
from tta.views import base_view, normalize

_PRECOMPUTED: contextvars.ContextVar[Sequence[tuple[torch.Tensor, torch.Tensor]] | None] = (
    contextvars.ContextVar("tta_precomputed_features", default=None)
)


@contextlib.contextmanager
def precomputed_features(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, `encode_images(clip, views)` returns `feats` for (views, feats) pairs."""
    token = _PRECOMPUTED.set(list(pairs))
    try:
        yield
    finally:
        _PRECOMPUTED.reset(token)


def _lookup(views: torch.Tensor) -> torch.Tensor | None:
    for known, feats in _PRECOMPUTED.get() or ():
        if known.shape == views.shape and known.device == views.device and torch.equal(known, views):
            return feats
    return None


def original_view(clip: ClipModel, image: torch.Tensor) -> torch.Tensor:
    """The normalised original view [1, 3, S, S] of a uint8 [3, H, W] image (CLIP's eval preprocessing).

    One definition for every single-view encoder and `Method.batch_views`: the shared batch pass
    only replaces an encoding when the tensors are bit-identical.
    """
    return normalize(base_view(image.to(clip.device), clip.image_size), clip.mean, clip.std).unsqueeze(0)


@torch.no_grad()
def encode_images(clip: ClipModel, views: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Normalised float32 image features [N, d] of normalised views [N, 3, S, S]."""
    views = views.to(clip.device)
    shared = _lookup(views)
    if shared is not None:
        return shared.clone()
    encode = clip.image_encoder or clip.model.encode_image
    chunks = [
        F.normalize(encode(views[i : i + batch_size]).float(), dim=-1)
        for i in range(0, views.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def zeroshot_logits(clip: ClipModel, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP's scaled cosine logits."""
    return clip.logit_scale * image_features @ text_features.t()
