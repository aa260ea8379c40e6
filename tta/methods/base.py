"""The method contract and the registry.

Every adaptation method is a `Method` subclass registered by name with `@register`. It declares
its scope (``episodic``: nothing survives a request; ``stream``: state is kept across requests of
one deployment), a frozen options dataclass holding the paper's defaults, and implements
`predict`. The CLI, the handler and the contract tests list methods from the registry, so adding
a method is adding one file under `tta/methods/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

import torch

from tta.errors import BadRequest
from tta.models import ClipModel
from tta.text import LabelSet
from tta.timing import StageTimer

Scope = Literal["episodic", "stream"]


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options. Subclasses are frozen dataclasses with the paper's defaults."""

    def validate(self) -> None:
        """Raise `BadRequest` for out-of-range values (subclasses extend)."""

    @classmethod
    def from_dict(cls, overrides: Mapping[str, Any] | None = None, base: Self | None = None) -> Self:
        """Apply request overrides on top of `base` (or the defaults), checking names and types."""
        base = base if base is not None else cls()
        if not overrides:
            return base
        if not isinstance(overrides, Mapping):
            raise BadRequest("options must be a JSON object", code="bad_options")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise BadRequest(
                f"unknown option(s) {unknown} for this method; known: {sorted(fields)}", code="bad_options"
            )
        hints = typing.get_type_hints(cls)
        values = {name: _coerce(name, value, hints[name]) for name, value in overrides.items()}
        options = dataclasses.replace(base, **values)
        options.validate()
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise TypeError


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError
    out = float(value)
    if out != out or out in (float("inf"), float("-inf")):
        raise TypeError
    return out


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


_SCALARS: dict[Any, Any] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Coerce a JSON value to the field's type, or raise BadRequest naming the option."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal and value not in args:
        raise BadRequest(f"option '{name}' must be one of {list(args)}, got {value!r}", code="bad_options")
    try:
        if hint in _SCALARS:
            return _SCALARS[hint](value)
        if origin is tuple:
            if not isinstance(value, list | tuple):
                raise TypeError
            return tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"option '{name}' must be {getattr(hint, '__name__', hint)}, got {value!r}",
                         code="bad_options") from exc
    return value


def check(condition: bool, message: str) -> None:
    """Validation helper for `MethodOptions.validate`."""
    if not condition:
        raise BadRequest(message, code="bad_options")


@dataclass
class MethodInput:
    """Everything one request gives a method. Built by the `Engine`, never by the method."""

    image: torch.Tensor  # uint8 [3, H, W] on CPU
    labels: LabelSet
    text_features: torch.Tensor  # [C, d] normalised zero-shot classifier on the model device
    options: MethodOptions
    generator: torch.Generator
    timer: StageTimer
    is_default_labels: bool = True  # the deployment's label set (stream state is kept for it only)
    deadline: float | None = None  # absolute time.monotonic() by which the answer is due; None = none


@dataclass
class MethodOutput:
    """What a method returns; the engine turns it into a `Prediction`."""

    probs: torch.Tensor  # [C] final class probabilities
    zeroshot_probs: torch.Tensor  # [C] zero-shot probabilities on the original image
    image_features: torch.Tensor | None = None  # [d] original image feature (drift monitoring)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"fallback": "..."}, {"state": {...}}


class Method(ABC):
    """One adaptation method bound to one frozen CLIP (per worker)."""

    name: ClassVar[str]
    scope: ClassVar[Scope]
    Options: ClassVar[type[MethodOptions]]
    description: ClassVar[str] = ""
    # What the frozen image encoder sees before any state is read, so `Engine.predict_batch` can
    # encode a whole batch in shared passes: "original" (the resize + center-crop view),
    # "views" (`make_views` with the options' n_views/augmix and the request's seed), or "none".
    batch_encoding: ClassVar[Literal["none", "original", "views"]] = "none"
    # True: a label sent later for one of its answers (by answer id) can teach it, given that answer's
    # original-view image feature, so the server remembers that feature with the answer (4*d bytes).
    learns_from_answers: ClassVar[bool] = False
    # True when the method handles `MethodInput.deadline` itself (zero-shot is the fallback; `auto`
    # stops escalating); otherwise the engine answers zero-shot once the deadline has passed.
    manages_own_deadline: ClassVar[bool] = False
    # Hyper-parameter candidates an offline evaluation may choose from on a validation split
    # (`tta eval --features ... --tune`), option name -> values; never chosen on test.
    val_grid: ClassVar[Mapping[str, Sequence[Any]]] = {}
    # Options over the defaults under which a method whose defaults need pixels can answer from the
    # original view's embedding (`tta eval --features`), and what running that way leaves out; an
    # evaluation on embeddings uses them and prints the note beside its figures.
    feature_options: ClassVar[Mapping[str, Any]] = {}
    feature_options_note: ClassVar[str] = ""

    def __init__(self, clip: ClipModel, defaults: MethodOptions | None = None) -> None:
        self.clip = clip
        self.defaults = defaults if defaults is not None else self.Options()
        self.defaults.validate()

    def parse_options(self, overrides: Mapping[str, Any] | None) -> MethodOptions:
        return self.Options.from_dict(overrides, base=self.defaults)

    @abstractmethod
    def predict(self, request: MethodInput) -> MethodOutput:
        """Adapt (if the method does) and classify one image."""

    def batch_views(self, request: MethodInput) -> torch.Tensor | None:
        """The exact views [N, 3, S, S] `predict` will encode first, or None when they cannot be
        known in advance. The request's generator is not advanced (a copy is used)."""
        from tta.features import original_view

        if self.batch_encoding == "original":
            return original_view(self.clip, request.image)
        if self.batch_encoding == "views":
            return self._first_views(request, request.options, torch.Generator().set_state(request.generator.get_state()))
        return None

    def _first_views(self, request: MethodInput, opts: MethodOptions, generator: torch.Generator) -> torch.Tensor:
        """A "views" method's first views: `make_views` with the options' n_views and augmix, or the
        original view alone when n_views == 1 (so a batch pass shares it with "original" methods)."""
        from tta.features import original_view
        from tta.views import ViewSpec, make_views

        clip = self.clip
        n_views = int(getattr(opts, "n_views", 1))
        if n_views == 1:
            return original_view(clip, request.image)
        return make_views(request.image, clip.image_size, clip.mean, clip.std,
                          ViewSpec(n_views=n_views, augmix=bool(getattr(opts, "augmix", False))),
                          generator=generator, device=clip.device)

    def encode_views(self, request: MethodInput, opts: MethodOptions) -> torch.Tensor:
        """Features [N, d] of a "views" method's first views (`_first_views`), under the augment and
        encode stages. The request's generator advances, so `batch_views` (a copy) saw the same views."""
        from tta.features import encode_images

        with request.timer.stage("augment"):
            views = self._first_views(request, opts, request.generator)
        with request.timer.stage("encode"):
            return encode_images(self.clip, views)

    def feature_input_reason(self, options: MethodOptions) -> str | None:
        """Why this method cannot answer from the original view's embedding alone (None: it can).

        Derived from `batch_encoding`; a method whose first views are not all it encodes overrides it.
        """
        if self.batch_encoding == "original":
            return None
        n_views = int(getattr(options, "n_views", 1))
        if self.batch_encoding == "views" and n_views == 1:
            return None
        if self.batch_encoding == "views":
            return f"{self.name} encodes {n_views} augmented views of the pixels (n_views > 1)"
        return f"{self.name} needs the image's pixels (it encodes views or generated images of it)"

    def bind_engine(self, lookup: Callable[[str], Method]) -> None:
        """Hook: the engine's method lookup, for a method that runs others (`auto`'s stream tier)."""

    def bind_deployment(self, names: Sequence[str], text: Callable[[], torch.Tensor]) -> None:
        """Hook: the deployment's labels and text classifier (stream state replays operations with them)."""

    def reset(self) -> None:
        """Return to the initial state (episodic methods have none to drop)."""

    def state_dict(self) -> dict[str, Any]:
        """Stream state to snapshot; episodic methods have none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output."""

    def state_summary(self) -> dict[str, Any]:
        """How full the method's state is (entries per class, capacity); {} for episodic methods."""
        return {}

    def feedback(self, request: MethodInput, label_index: int) -> dict[str, Any]:
        """Learn from a labelled example (e.g. GDA's support set); most methods take none."""
        raise BadRequest(f"method '{self.name}' does not learn from labelled feedback", code="feedback_unsupported")

    def feedback_many(self, requests: Sequence[MethodInput], label_indices: Sequence[int],
                      scope: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None) -> dict[str, Any]:
        """Many labelled examples at once (a support set, a labelled cache); one reply for all.

        `scope(i)` is the context in which example i is encoded (for an example that carries an
        embedding instead of pixels, `tta.features.feature_input`). The default is `feedback` one
        example at a time; a method whose feedback refits (GDA) overrides it to refit once.
        """
        if len(requests) != len(label_indices):
            raise BadRequest("one label per example", code="bad_feedback")
        correct = 0
        for i, (request, label) in enumerate(zip(requests, label_indices, strict=True)):
            with scope(i) if scope is not None else contextlib.nullcontext():
                reply = self.feedback(request, int(label))
            correct += bool(reply.get("correct", False))
        return {"method": self.name, "examples": len(requests), "correct_before": correct}

    def feedback_answer(self, feature: torch.Tensor, label_index: int, labels: LabelSet, text_features: torch.Tensor,
                        served_correct: bool) -> dict[str, Any]:
        """Learn from the label of an earlier answer: `feature` [d] is the original view that answer
        encoded. Only methods with `learns_from_answers` take it."""
        raise BadRequest(f"method '{self.name}' does not learn from labelled answers", code="feedback_unsupported")


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method selectable by `cls.name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    import tta.methods  # noqa: F401  (imports every method module, which registers it)


def list_methods() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BadRequest(f"unknown method '{name}'; available: {', '.join(sorted(_REGISTRY))}",
                         code="unknown_method") from None
