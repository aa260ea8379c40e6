"""Frozen image encoding shared by every method.

`Engine.predict_batch` encodes the views of a whole batch in shared passes first, then runs each
request's method under `precomputed_features`: when a method asks to encode exactly those views
(bit-identical tensor), it gets the shared result instead of a second forward. Any other call
encodes as usual, so a method never depends on the batch path to be correct.

The same mechanism serves requests that carry a precomputed original-view embedding instead of
pixels (`Engine.predict_features`, `tta eval --features`): `feature_input` makes the embedding the
answer for the original view of a placeholder image and turns every other encoding into
`PixelsRequired`, so the very same method code runs on features, and a method that would need
the pixels (augmented views) fails loudly instead of encoding the placeholder.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from tta.errors import PixelsRequired
from tta.models import ClipModel
from tta.views import base_view, normalize

_PRECOMPUTED: contextvars.ContextVar[Sequence[tuple[torch.Tensor, torch.Tensor]] | None] = (
    contextvars.ContextVar("tta_precomputed_features", default=None)
)
_FEATURES_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("tta_features_only", default=False)


@contextlib.contextmanager
def precomputed_features(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, `encode_images(clip, views)` returns `feats` for (views, feats) pairs."""
    token = _PRECOMPUTED.set(list(pairs))
    try:
        yield
    finally:
        _PRECOMPUTED.reset(token)


_PLACEHOLDERS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _placeholder(clip: ClipModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, its original view), made once per model: feature requests pay no preprocessing."""
    entry = _PLACEHOLDERS.get(clip.model)
    if entry is None or entry[1].device != clip.device or entry[0].shape[-1] != clip.image_size:
        image = torch.zeros(3, clip.image_size, clip.image_size, dtype=torch.uint8)
        view = normalize(base_view(image.to(clip.device), clip.image_size), clip.mean, clip.std).unsqueeze(0)
        entry = (image, view)
        _PLACEHOLDERS[clip.model] = entry
    return entry


def placeholder_image(clip: ClipModel) -> torch.Tensor:
    """The stand-in uint8 image [3, S, S] of a request that carries only an embedding (one object
    per model, never written to)."""
    return _placeholder(clip)[0]


@contextlib.contextmanager
def feature_input(clip: ClipModel, features: torch.Tensor) -> Iterator[torch.Tensor]:
    """Within the block, the original view of `placeholder_image(clip)` encodes to `features`
    ([d], normalised) and any other encoding raises `PixelsRequired` (nested blocks included)."""
    image, view = _placeholder(clip)
    pairs = [(view, features.reshape(1, -1).to(clip.device, torch.float32))]
    strict = _FEATURES_ONLY.set(True)
    try:
        with precomputed_features(pairs):
            yield image
    finally:
        _FEATURES_ONLY.reset(strict)


def _lookup(views: torch.Tensor) -> torch.Tensor | None:
    for known, feats in _PRECOMPUTED.get() or ():
        if known is views or (known.shape == views.shape and known.device == views.device
                              and torch.equal(known, views)):
            return feats
    return None


def original_view(clip: ClipModel, image: torch.Tensor) -> torch.Tensor:
    """The normalised original view [1, 3, S, S] of a uint8 [3, H, W] image (CLIP's eval preprocessing).

    One definition for every single-view encoder and `Method.batch_views`: the shared batch pass
    only replaces an encoding when the tensors are bit-identical.
    """
    if _FEATURES_ONLY.get():
        placeholder, view = _placeholder(clip)
        if image is placeholder:
            return view
    return normalize(base_view(image.to(clip.device), clip.image_size), clip.mean, clip.std).unsqueeze(0)


@torch.no_grad()
def encode_images(clip: ClipModel, views: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Normalised float32 image features [N, d] of normalised views [N, 3, S, S]."""
    views = views.to(clip.device)
    shared = _lookup(views)
    if shared is not None:
        return shared.clone()
    if _FEATURES_ONLY.get():
        raise PixelsRequired(f"this request carries an embedding, but {views.shape[0]} view(s) other than the "
                             "original would have to be encoded from the image; send the image instead")
    encode = clip.image_encoder or clip.model.encode_image
    chunks = [
        F.normalize(encode(views[i : i + batch_size]).float(), dim=-1)
        for i in range(0, views.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def zeroshot_logits(clip: ClipModel, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP's scaled cosine logits."""
    return clip.logit_scale * image_features @ text_features.t()
