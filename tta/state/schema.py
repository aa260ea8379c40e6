"""Validation of everything that enters stream state: imports, snapshots, and log operations.

Stream state is shared by every replica and outlives every request, so one bad value in it is an
outage, not a bad request. Every owner therefore checks what it is given *before* it changes
anything: a rejected import, snapshot or operation leaves the state bit-identical to before, and
the same content is rejected alike on every replica (the checks depend only on the content and on
the deployment: model, feature size, label set, capacities).

A check failure raises `StateRejected(field, rule)` (a `ValueError`): `field` is the dotted path
of the offending value (``positive.classes``), `rule` says what it broke (``integers in [0, 10)``).
The serving edge turns it into a 400 ``bad_state`` for an import; hosts count a skipped log entry
or a refused snapshot (`tta.state.host.on_rejected`, metric ``tta_state_rejected_total``).

How an owner declares its validation (a new stream method: DPE, DOTA, BoostAdapter, ...)
-----------------------------------------------------------------------------------------
A `StreamStateMixin` method implements two declarations; everything else is automatic
(`apply` validates an operation, `restore`/import validate a whole state, the ``meta`` section is
checked against model, feature size and labels)::

    from tta.state.schema import Bool, Float, Int, Maybe, Opts, Record, Tensor, class_index, unit_rows

    def _state_schema(self) -> Record:          # what `_export_state()` returns, minus "meta"
        return Record(cache=self.cache.schema(score_high=ln_classes),   # a ClassQueues
                      prototypes=Tensor(("C", "d")),                     # float32 [C, d], finite
                      counter=Int(low=0))

    def _op_schemas(self) -> dict[str, Record]:  # one Record per operation kind ("kind" is implied)
        return {"update": Record(cls=class_index(), feature=unit_rows(("d",)), loss=Float(0.0, ln_classes),
                                 probs=Maybe(Tensor(("C",), low=0.0, high=1.0)), opts=Opts(self.defaults))}

Shapes name dimensions: ``"d"`` is the model's `embed_dim`, ``"C"`` the size of the deployment's
label set (both given by the owner's `_schema_dims()`, which a method may extend, e.g. with its
adapter width); any other name (``"n"``) is bound by its first use inside the enclosing `Record`, so
``keys [n, d]``, ``classes [n]`` and ``scores [n]`` of one queue must agree. Defaults are strict on purpose:
tensors must have exactly the declared dtype (float32 unless given), floats must be finite
(tensor and scalar), unknown fields are refused (`Record(..., extra=True)` allows them), and a
`Record` may add cross-field checks (`checks=(fn,)`, fn(value, dims) -> error text or None), as
`ClassQueues.schema` does for sequence numbers and per-class caps. Bounds may be numbers, or
callables of the dims (``lambda dims: math.log(dims["C"])``). A field that is not declared cannot
enter the state, so a new method gets validated by declaring its fields, and gets a clear 400
instead of an outage when it forgets one. A method without the two declarations cannot apply an
operation or import a state at all (NotImplementedError naming them; a stream prediction then
answers zero-shot flagged ``state_invalid``), and the contract test
``tests/unit/test_state_validation.py::test_every_registered_stream_method_declares_what_its_state_may_hold``
fails for it, as does the property test's check that it is in the mutated ``OWNERS``. Values that
must be exact for bit-identical replicas (a queue's ``seqs``, an entry's dtype) are never coerced:
what does not match is refused, not repaired.

Checklist for a new owner: every tensor with its shape in named dims and its dtype; features as
`unit_rows` (CLIP features are normalised, so norm <= 1 also bounds "huge"); every class index
with `class_index`; every score/probability with its range; every counter `Int(low=0)` plus a
`checks` function for relations between counters; request options as `Opts(self.defaults)`.

An owner that is not a `StreamStateMixin` (the drift reference) calls `validate(spec, value, dims)`
itself, first thing in `apply` and `restore`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Dims = dict[str, int]
Bound = float | Callable[[Mapping[str, int]], "float | None"] | None
Check = Callable[[Mapping[str, Any], Mapping[str, int]], "str | None"]
NORM_TOLERANCE = 1e-3  # float32 L2-normalised features have norms within ~1e-6 of 1; this leaves room for fp16 encoders
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "bool": torch.bool}


class StateRejected(ValueError):
    """A value that may not enter stream state: which field, and which rule it broke."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field or 'state'}: {rule}")
        self.field = field or "state"
        self.rule = rule


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _bound(value: Bound, dims: Mapping[str, int]) -> float | None:
    if callable(value):
        value = value(dims)  # None: the dimension it needs is not known (library use before labels)
    return None if value is None else float(value)


class Spec:
    """One declared field; `check` raises `StateRejected` or returns None."""

    def check(self, value: Any, path: str, dims: Dims) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Tensor(Spec):
    """A tensor of exactly `dtype` and `shape` (ints, or dimension names); finite; optional bounds.

    `low`/`high` are inclusive for floats; for int64, `high` is exclusive (class indices: [0, C)).
    `max_norm`: every vector along the last dimension has L2 norm at most this (CLIP features: 1).
    `max_abs`: every element's magnitude is at most this.
    """

    shape: tuple[int | str, ...]
    dtype: str = "float32"
    low: Bound = None
    high: Bound = None
    max_norm: float | None = None
    max_abs: float | None = None

    def check(self, value: Any, path: str, dims: Dims) -> None:
        if not isinstance(value, torch.Tensor):
            raise StateRejected(path, f"must be a {self.dtype} tensor of shape {list(self.shape)}, not {type(value).__name__}")
        if value.dtype != _DTYPES[self.dtype]:
            raise StateRejected(path, f"dtype must be {self.dtype}, not {str(value.dtype).removeprefix('torch.')}")
        if value.layout != torch.strided or value.is_quantized:
            raise StateRejected(path, "must be a dense tensor")
        if value.dim() != len(self.shape):
            raise StateRejected(path, f"must have shape {list(self.shape)}, not {list(value.shape)}")
        self._check_shape(value, path, dims)
        if value.numel():
            self._check_values(value, path, dims)

    def _check_shape(self, value: torch.Tensor, path: str, dims: Dims) -> None:
        for axis, (want, got) in enumerate(zip(self.shape, value.shape, strict=True)):
            if isinstance(want, int):
                if got != want:
                    raise StateRejected(path, f"dimension {axis} must be {want}, not {got}")
            elif want in dims:
                if got != dims[want]:
                    raise StateRejected(path, f"dimension {axis} ({want}) must be {dims[want]}, not {got}")
            else:
                dims[want] = int(got)

    def _check_values(self, value: torch.Tensor, path: str, dims: Dims) -> None:
        if value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                raise StateRejected(path, "values must be finite (no NaN or infinity)")
        low, high = _bound(self.low, dims), _bound(self.high, dims)
        if low is not None and bool((value < low).any()):
            raise StateRejected(path, f"values must be >= {low:g}")
        if high is not None:
            integer = self.dtype == "int64"
            if bool(((value >= high) if integer else (value > high)).any()):
                shown = f"[{low:g}, {high:g})" if integer and low is not None else f"{'<' if integer else '<='} {high:g}"
                raise StateRejected(path, f"values must be {'in ' if shown[0] == '[' else ''}{shown}")
        if self.max_abs is not None and bool((value.abs() > self.max_abs).any()):
            raise StateRejected(path, f"magnitudes must be <= {self.max_abs:g}")
        if self.max_norm is not None and value.dim() >= 1:
            limit = self.max_norm * (1.0 + NORM_TOLERANCE)
            if bool((torch.linalg.vector_norm(value.double(), dim=-1) > limit).any()):
                raise StateRejected(path, f"vectors must have L2 norm <= {self.max_norm:g} (normalised CLIP features)")


def unit_rows(shape: tuple[int | str, ...], dtype: str = "float32") -> Tensor:
    """CLIP features (or means of them): finite, every vector of L2 norm <= 1."""
    return Tensor(shape, dtype, max_norm=1.0)


def class_index(shape: tuple[int | str, ...] = ()) -> Spec:
    """Class indices in [0, C): a plain int for `shape=()`, else an int64 tensor."""
    if shape == ():
        return Int(low=0, high=lambda dims: dims["C"] - 1 if "C" in dims else None)
    return Tensor(shape, "int64", low=0, high=lambda dims: dims.get("C"))


@dataclass(frozen=True)
class Int(Spec):
    """A Python int (not a bool, not a float) in [low, high] (inclusive)."""

    low: Bound = None
    high: Bound = None

    def check(self, value: Any, path: str, dims: Dims) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise StateRejected(path, f"must be an integer, not {type(value).__name__}")
        low, high = _bound(self.low, dims), _bound(self.high, dims)
        if (low is not None and value < low) or (high is not None and value > high):
            raise StateRejected(path, f"must be an integer in [{'-inf' if low is None else f'{low:g}'}, "
                                      f"{'inf' if high is None else f'{high:g}'}], not {value}")


@dataclass(frozen=True)
class Float(Spec):
    """A finite number (int or float, not a bool) in [low, high] (inclusive)."""

    low: Bound = None
    high: Bound = None

    def check(self, value: Any, path: str, dims: Dims) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise StateRejected(path, f"must be a number, not {type(value).__name__}")
        if not math.isfinite(value):
            raise StateRejected(path, "must be finite (no NaN or infinity)")
        low, high = _bound(self.low, dims), _bound(self.high, dims)
        if (low is not None and value < low) or (high is not None and value > high):
            raise StateRejected(path, f"must be in [{'-inf' if low is None else f'{low:g}'}, "
                                      f"{'inf' if high is None else f'{high:g}'}], not {value!r}")


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, path: str, dims: Dims) -> None:
        if not isinstance(value, bool):
            raise StateRejected(path, f"must be true or false, not {type(value).__name__}")


@dataclass(frozen=True)
class Str(Spec):
    choices: tuple[str, ...]

    def check(self, value: Any, path: str, dims: Dims) -> None:
        if value not in self.choices:
            raise StateRejected(path, f"must be one of {list(self.choices)}")


@dataclass(frozen=True)
class Maybe(Spec):
    """`spec`, or None."""

    spec: Spec

    def check(self, value: Any, path: str, dims: Dims) -> None:
        if value is not None:
            self.spec.check(value, path, dims)


@dataclass(frozen=True)
class ListOf(Spec):
    """A list (or tuple) of `items`; `length` an int or a dimension name; at most `max_length`."""

    items: Spec
    length: int | str | None = None
    max_length: int | None = None

    def check(self, value: Any, path: str, dims: Dims) -> None:
        if not isinstance(value, list | tuple):
            raise StateRejected(path, f"must be a list, not {type(value).__name__}")
        want = self.length
        if isinstance(want, str):
            if want not in dims:
                dims[want] = len(value)
            want = dims[want]
        if want is not None and len(value) != want:
            raise StateRejected(path, f"must have {want} items, not {len(value)}")
        if self.max_length is not None and len(value) > self.max_length:
            raise StateRejected(path, f"must have at most {self.max_length} items, not {len(value)}")
        for i, item in enumerate(value):
            self.items.check(item, _join(path, i), dims)


@dataclass(frozen=True)
class AnyOf(Spec):
    """The first of `specs` that fits (e.g. an empty [0] tensor or a [n, d] one); else the first's error."""

    specs: tuple[Spec, ...]

    def check(self, value: Any, path: str, dims: Dims) -> None:
        first: StateRejected | None = None
        for spec in self.specs:
            trial = dict(dims)
            try:
                spec.check(value, path, trial)
            except StateRejected as exc:
                first = first or exc
                continue
            dims.update(trial)
            return
        assert first is not None
        raise first


@dataclass(frozen=True)
class Opts(Spec):
    """Request options carried by an operation: must parse and validate as the method's options."""

    defaults: Any

    def check(self, value: Any, path: str, dims: Dims) -> None:
        if value is None:
            return
        if not isinstance(value, Mapping):
            raise StateRejected(path, "must be an object of method options")
        try:
            self.defaults.from_dict(value, base=self.defaults)
        except Exception as exc:  # noqa: BLE001 - BadRequest/ValueError/TypeError: the options do not parse
            raise StateRejected(path, f"invalid options ({exc})") from exc


@dataclass(frozen=True)
class Record(Spec):
    """A mapping with exactly these fields (each required unless its spec is `Maybe` or listed in `optional`)."""

    fields: Mapping[str, Spec]
    optional: tuple[str, ...] = ()
    extra: bool = False
    checks: tuple[Check, ...] = field(default=())

    def __init__(self, fields: Mapping[str, Spec] | None = None, *, optional: Sequence[str] = (), extra: bool = False,
                 checks: Sequence[Check] = (), **named: Spec) -> None:
        object.__setattr__(self, "fields", {**(fields or {}), **named})
        object.__setattr__(self, "optional", tuple(optional))
        object.__setattr__(self, "extra", extra)
        object.__setattr__(self, "checks", tuple(checks))

    def check(self, value: Any, path: str, dims: Dims) -> None:
        dims = dict(dims)  # names bound inside a record (a queue's "n") stay local to it
        if not isinstance(value, Mapping):
            raise StateRejected(path, f"must be an object, not {type(value).__name__}")
        if not self.extra:
            unknown = sorted(str(k) for k in value if k not in self.fields)
            if unknown:
                raise StateRejected(_join(path, unknown[0]), "unknown field")
        for key, spec in self.fields.items():
            if key not in value:
                if isinstance(spec, Maybe) or key in self.optional:
                    continue
                raise StateRejected(_join(path, key), "missing")
            spec.check(value[key], _join(path, key), dims)
        for check in self.checks:
            problem = check(value, dims)
            if problem:
                raise StateRejected(path, problem)


def validate(spec: Spec, value: Any, dims: Mapping[str, int] | None = None, path: str = "") -> None:
    """Check `value` against `spec` with the named dimensions `dims`; raises `StateRejected`."""
    spec.check(value, path, dict(dims or {}))


def check_meta(state: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """The state's ``meta`` section against this owner's (`None` values are not checked)."""
    meta = state.get("meta") if isinstance(state, Mapping) else None
    if not isinstance(meta, Mapping):
        raise StateRejected("meta", "missing: state has no 'meta' section")
    for key, value in expected.items():
        if value is None:
            continue
        got = meta.get(key)
        if isinstance(value, tuple | list):
            got = tuple(got) if isinstance(got, list | tuple) else got
            value = tuple(value)
        if got != value:
            shown = value if not isinstance(value, tuple) or len(value) <= 5 else f"{list(value[:5])}... ({len(value)})"
            raise StateRejected(f"meta.{key}", f"must be {shown!r} (this deployment), not {str(got)[:200]}")
