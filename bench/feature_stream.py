"""Drive a method's own `predict` on precomputed CLIP features (no image encoder).

The method sees a `ClipModel` whose image encoder returns the current sample's features: row 0
the original view, rows 1.. its views. Everything else (views of a dummy image, selection, state
operations, the process state host) is the method's real code path, so the answers are exactly
what the method would give for those embeddings.

Also loads the real feature bundles (`../shared/data/clip-vitb16-features`, or
``TTA_FEATURES_DIR``) and makes synthetic views of a feature (f + noise, normalised) where a
check needs views and only the original embedding exists.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tta.methods.base import Method, MethodInput, get_method_class
from tta.models import ClipModel
from tta.text import LabelSet
from tta.timing import StageTimer

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ("caltech101", "dtd", "oxford_flowers", "oxford_pets")


def features_dir() -> Path | None:
    """The real feature bundles: ``TTA_FEATURES_DIR``, else ``../shared/data/clip-vitb16-features``."""
    env = os.environ.get("TTA_FEATURES_DIR")
    candidates = [Path(env)] if env else []
    candidates += [p / "shared" / "data" / "clip-vitb16-features" for p in (ROOT.parent, ROOT.parent.parent)]
    return next((p for p in candidates if (p / "manifest.json").exists()), None)


@dataclass
class Bundle:
    name: str
    test: torch.Tensor  # [N, d] float32, L2-normalised
    test_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    text: torch.Tensor  # [C, d]


def load_bundle(name: str) -> Bundle:
    folder = features_dir()
    if folder is None:
        raise FileNotFoundError("feature bundles not found: set TTA_FEATURES_DIR or put them in ../shared/data/")
    data = np.load(folder / f"{name}_vitb16.npz")

    def feats(key: str) -> torch.Tensor:
        return F.normalize(torch.from_numpy(data[key].astype(np.float32)), dim=-1)

    return Bundle(name, feats("test_features"), torch.from_numpy(data["test_labels"]).long(), feats("val_features"),
                  torch.from_numpy(data["val_labels"]).long(), F.normalize(torch.from_numpy(data["text_weights"]).float(), dim=-1))


def synthetic_views(feature: torch.Tensor, n_views: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """[n_views, d]: the feature itself, then normalize(f + noise * g), g ~ N(0, I / d)."""
    if n_views == 1:
        return feature[None].clone()
    d = feature.shape[-1]
    g = torch.randn(n_views - 1, d, generator=generator) / math.sqrt(d)
    return torch.cat([feature[None], F.normalize(feature[None] + noise * g, dim=-1)])


class _Stub(torch.nn.Module):
    """What `ClipModel` reads from a model: logit scale, embedding size, a device."""

    def __init__(self, dim: int, logit_scale: float) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(logit_scale)), requires_grad=False)
        self.text_projection = torch.nn.Parameter(torch.zeros(1, dim), requires_grad=False)


class QueuedEncoder:
    """The image encoder: returns the current sample's rows, as many as views were asked for."""

    def __init__(self) -> None:
        self.current: torch.Tensor | None = None

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        assert self.current is not None and views.shape[0] <= self.current.shape[0], "no features queued"
        return self.current[: views.shape[0]]


class FeatureDriver:
    """One method instance fed features sample by sample through its own `predict`."""

    def __init__(self, method: str, text: torch.Tensor, options: Mapping[str, Any] | None = None,
                 logit_scale: float = 100.0, image_size: int = 16) -> None:
        self.encoder = QueuedEncoder()
        stub = _Stub(text.shape[1], logit_scale)
        self.clip = ClipModel(model=stub, tokenizer=None, name="features", image_size=image_size,
                              image_encoder=self.encoder)
        cls = get_method_class(method)
        self.method: Method = cls(self.clip, cls.Options.from_dict(dict(options or {})))
        self.labels = LabelSet.create([f"class {i}" for i in range(text.shape[0])])
        self.text = text
        self.image = torch.zeros(3, image_size, image_size, dtype=torch.uint8)
        bind = getattr(self.method, "bind_deployment", None)
        if bind is not None:
            bind(self.labels.names, lambda: self.text)

    def predict(self, feats: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
        """(final probabilities [C], extra) for one sample's features [N, d] (row 0 the original)."""
        self.encoder.current = feats
        request = MethodInput(image=self.image, labels=self.labels, text_features=self.text,
                              options=self.method.defaults, generator=torch.Generator().manual_seed(seed),
                              timer=StageTimer())
        out = self.method.predict(request)
        self.encoder.current = None
        return out.probs, out.extra

    def close(self) -> None:
        host = getattr(self.method, "_host", None)
        if host is not None:
            host.close()
