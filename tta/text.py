"""Classifier text side: label sets, prompt templates and cached normalised class embeddings.

A *label set* is the list of class names a request is classified into. Zero-shot class
embeddings depend only on (model, label set, templates), so they are computed once and kept in
a small LRU cache: per-request label sets in the serving layer reuse them across requests.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tta.errors import BadRequest
from tta.models import ClipModel

SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)
MAX_LABELS = 5000
MAX_LABEL_CHARS = 200


def imagenet_templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet prompt templates, as shipped with open_clip."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    # open_clip stores them as callables (lambda c: f"... {c}.")
    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def imagenet_classnames() -> tuple[str, ...]:
    """ImageNet-1k class names as curated by open_clip (CLIP paper naming)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES)
    # CLIP's list names two pairs of distinct classes alike; label sets must be unique
    renames = {744: ("missile", "projectile"), 837: ("sunglasses", "dark glasses")}
    for index, (old, new) in renames.items():
        if names[index] == old and names.count(old) > 1:
            names[index] = new
    return tuple(names)


def resolve_templates(templates: str | Sequence[str] | None) -> tuple[str, ...]:
    """'single' | 'imagenet' | an explicit list of '{}' templates -> tuple of templates."""
    if templates is None or templates == "single":
        return SINGLE_TEMPLATE
    if templates in ("imagenet", "ensemble"):
        return imagenet_templates()
    if isinstance(templates, str):
        templates = [templates]
    out = tuple(str(t) for t in templates)
    if not out or any("{}" not in t for t in out):
        raise BadRequest("every prompt template must contain '{}' where the class name goes", code="bad_templates")
    return out


def validate_labels(labels: Sequence[str], max_labels: int = MAX_LABELS) -> tuple[str, ...]:
    """Clean a label list; empty, duplicate-only, or oversized lists are the caller's error."""
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise BadRequest("labels must be a list of class names", code="bad_labels")
    cleaned = tuple(str(label).strip() for label in labels if str(label).strip())
    if not cleaned:
        raise BadRequest("the label list is empty: give at least one class name", code="empty_labels")
    if len(cleaned) > max_labels:
        raise BadRequest(f"too many labels: {len(cleaned)} > {max_labels}", code="too_many_labels")
    if any(len(label) > MAX_LABEL_CHARS for label in cleaned):
        raise BadRequest(f"a label is longer than {MAX_LABEL_CHARS} characters", code="bad_labels")
    if len(set(cleaned)) != len(cleaned):
        raise BadRequest("the label list contains duplicates", code="bad_labels")
    return cleaned


def load_labels(source: str | Path | Sequence[str]) -> tuple[str, ...]:
    """Labels from a list, a comma string, or a file (one per line, a JSON list, or JSON {idx: name})."""
    if isinstance(source, Path) or (isinstance(source, str) and Path(source).is_file()):
        text = Path(source).read_text(encoding="utf-8")
        stripped = text.strip()
        if stripped.startswith(("[", "{")):
            try:
                data = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise BadRequest(f"label file {source} is not valid JSON: {exc}", code="bad_labels") from exc
            if isinstance(data, dict):  # index_to_name.json style: {"0": "cat", ...} or {"0": ["id", "cat"]}
                items = sorted(data.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else str(kv[0]))
                data = [v[-1] if isinstance(v, list) else v for _, v in items]
            return validate_labels(data)
        return validate_labels([line for line in text.splitlines() if not line.startswith("#")])
    if isinstance(source, str):
        return validate_labels(source.split(","))
    return validate_labels(list(source))


@dataclass(frozen=True)
class LabelSet:
    """Class names plus how each is turned into text (templates, or per-class descriptions)."""

    names: tuple[str, ...]
    templates: tuple[str, ...] = SINGLE_TEMPLATE
    descriptions: tuple[tuple[str, ...], ...] | None = None  # per class, overrides templates

    @classmethod
    def create(
        cls,
        names: Sequence[str],
        templates: str | Sequence[str] | None = None,
        descriptions: dict[str, Sequence[str]] | None = None,
    ) -> LabelSet:
        clean = validate_labels(names)
        desc = None
        if descriptions:
            missing = [n for n in clean if not descriptions.get(n)]
            if missing:
                raise BadRequest(f"no description for classes: {missing[:5]}", code="bad_labels")
            desc = tuple(tuple(str(d) for d in descriptions[n]) for n in clean)
        return cls(names=clean, templates=resolve_templates(templates), descriptions=desc)

    def __len__(self) -> int:
        return len(self.names)

    def prompts_for(self, index: int) -> tuple[str, ...]:
        if self.descriptions is not None:
            return self.descriptions[index]
        return tuple(t.format(self.names[index]) for t in self.templates)


def _encode_tokens(clip: ClipModel, tokens: torch.Tensor) -> torch.Tensor:
    """`encode_text`, run only up to the batch's last end-of-text token when the text tower is
    open_clip's causal CLIP transformer (positions after EOT cannot change the EOT feature)."""
    model = clip.model
    causal_argmax = (getattr(model, "text_pool_type", None) == "argmax" and getattr(model, "attn_mask", None) is not None
                     and hasattr(model, "token_embedding"))
    if not causal_argmax:
        return model.encode_text(tokens)
    from tta.prompts import encode_text_embeddings

    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    return encode_text_embeddings(clip, model.token_embedding(tokens[:, :length]), eot)


@torch.no_grad()
def encode_prompts(clip: ClipModel, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Normalised text features of raw prompt strings (frozen text encoder)."""
    device = clip.device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = clip.tokenizer(list(prompts[start : start + batch_size])).to(device)
        chunks.append(F.normalize(_encode_tokens(clip, tokens).float(), dim=-1))
    return torch.cat(chunks)


@torch.no_grad()
def class_embeddings(clip: ClipModel, labels: LabelSet) -> torch.Tensor:
    """[C, d] zero-shot classifier: per class, mean of normalised prompt features, re-normalised."""
    per_class = [labels.prompts_for(i) for i in range(len(labels))]
    flat = [p for prompts in per_class for p in prompts]
    feats = encode_prompts(clip, flat)
    out, start = [], 0
    for prompts in per_class:
        out.append(F.normalize(feats[start : start + len(prompts)].mean(0), dim=-1))
        start += len(prompts)
    return torch.stack(out)


class TextFeatureCache:
    """Bounded LRU of class embeddings per (model, label set), safe to share between threads."""

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, clip: ClipModel, labels: LabelSet) -> torch.Tensor:
        key = (id(clip.model), str(clip.device), labels)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
        feats = class_embeddings(clip, labels)
        with self._lock:
            self.misses += 1
            self._entries[key] = feats
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return feats

    def put(self, clip: ClipModel, labels: LabelSet, features: torch.Tensor) -> None:
        """Use given class embeddings [C, d] for `labels` (e.g. a stored zero-shot classifier)."""
        if features.ndim != 2 or features.shape[0] != len(labels):
            raise ValueError(f"text features must be [{len(labels)}, d], got {list(features.shape)}")
        feats = torch.nn.functional.normalize(features.detach().float(), dim=-1).to(clip.device)
        with self._lock:
            self._entries[(id(clip.model), str(clip.device), labels)] = feats
            self._entries.move_to_end((id(clip.model), str(clip.device), labels))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def contains(self, clip: ClipModel, labels: LabelSet) -> bool:
        """Whether `get` would be a cache hit (admission prices a miss)."""
        with self._lock:
            return (id(clip.model), str(clip.device), labels) in self._entries

    def __len__(self) -> int:
        return len(self._entries)
