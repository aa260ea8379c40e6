"""Plumbing shared by the stream methods (TDA, TFUP, GDA): a `Method` as a state owner.

A method mixes this in before `Method` and implements `_apply_op` (its operations), plus
`_export_state`, `_import_state`, `_clear_state` and `_summary`, and declares what its state and
its operations may hold: `_state_schema()` and `_op_schemas()` (see `tta.state.schema`, whose
docstring says how). Requests build an operation and `self.host.commit(op)` it; the host applies
it (after every earlier operation of every replica) through `apply`, which validates it first.
State belongs to the deployment's label set: a snapshot or import is checked against the method
name, state version, feature size, model and labels, and field by field against the schema,
before anything changes; a rejected one leaves the state as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from tta.state.host import StateHost, open_host
from tta.state.schema import Record, StateRejected, Str, check_meta, validate

log = logging.getLogger(__name__)

STATE_UNAVAILABLE = "state_unavailable"


class StreamStateMixin:
    """Owner protocol (`apply`/`snapshot`/`restore`) and the state actions for a stream `Method`."""

    state_version: int = 1
    name: str
    clip: Any
    defaults: Any

    def _init_stream(self) -> None:
        self._names: tuple[str, ...] | None = None
        self._host: StateHost | None = None
        self._text_provider: Callable[[], torch.Tensor] | None = None
        self._last_text: torch.Tensor | None = None

    @property
    def host(self) -> StateHost:
        """Opened on first use (after the engine bound the deployment's labels), restoring the state."""
        if self._host is None:
            self._host = open_host(self.name, self)
            self._host.start()
        return self._host

    def bind_deployment(self, names: Sequence[str], text: Callable[[], torch.Tensor]) -> None:
        """The deployment's labels and its text classifier (operations from other replicas need it)."""
        self._names = tuple(names)
        self._text_provider = text

    # --- to implement ---
    def _apply_op(self, op: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _export_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _import_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _clear_state(self) -> None:
        raise NotImplementedError

    def _summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def _state_schema(self) -> Record:
        """The fields of `_export_state()` (without ``meta``), as a `tta.state.schema.Record`."""
        raise NotImplementedError(f"{type(self).__name__} declares no _state_schema(): nothing may enter its state "
                                  "unchecked (tta/state/schema.py says how to declare it)")

    def _op_schemas(self) -> dict[str, Record]:
        """One `Record` per operation kind this method commits (the ``kind`` field is implied)."""
        raise NotImplementedError(f"{type(self).__name__} declares no _op_schemas(): nothing may enter its state "
                                  "unchecked (tta/state/schema.py says how to declare it)")

    def _schema_dims(self) -> dict[str, int]:
        """Named dimensions of the schemas: ``d`` (embed_dim) and ``C`` (the deployment's labels)."""
        dims = {"d": int(self.clip.embed_dim)}
        if self._names is not None:
            dims["C"] = len(self._names)
        return dims

    # --- validation (tta.state.schema): before anything changes ---
    def _specs(self) -> tuple[Record, dict[str, Record]]:
        cached = getattr(self, "_spec_cache", None)
        if cached is None:
            state = self._state_schema()
            state = Record({"meta": Record(extra=True), **state.fields}, optional=state.optional, checks=state.checks)
            ops = {kind: Record({"kind": Str((kind,)), **rec.fields}, optional=rec.optional, checks=rec.checks)
                   for kind, rec in self._op_schemas().items()}
            cached = self._spec_cache = (state, ops)
        return cached

    def validate_op(self, op: Mapping[str, Any]) -> None:
        """`StateRejected` unless `op` is one of this method's operations with valid fields."""
        ops = self._specs()[1]
        kind = op.get("kind") if isinstance(op, Mapping) else None
        if not isinstance(kind, str) or kind not in ops:
            raise StateRejected("kind", f"{self.name} has no operation {str(kind)[:40]!r} (known: {sorted(ops)})")
        validate(ops[kind], op, self._schema_dims())

    def validate_state(self, state: Mapping[str, Any]) -> None:
        """`StateRejected` unless `state` is a whole state of this method for this deployment."""
        if not isinstance(state, Mapping):
            raise StateRejected("state", f"must be an object, not {type(state).__name__}")
        check_meta(state, self._meta())
        dims = self._schema_dims()
        labels = state["meta"].get("labels")
        if "C" not in dims and isinstance(labels, list | tuple):
            dims["C"] = len(labels)
        validate(self._specs()[0], state, dims)

    # --- owner protocol (called by the host, in log order) ---
    def apply(self, op: Mapping[str, Any]) -> None:
        self.validate_op(op)
        self._apply_op(op)

    def snapshot(self) -> dict[str, Any]:
        return self._export_with_meta()

    def restore(self, state: Mapping[str, Any] | None) -> None:
        if state is None:
            self._clear_state()
        else:
            self._import_checked(state)

    # --- helpers for the methods ---
    def _deployment_text(self) -> torch.Tensor | None:
        """Text features of the deployment's labels, for refits/rebuilds inside `apply`."""
        if self._text_provider is not None:
            return self._text_provider()
        return self._last_text

    def _opts_delta(self, opts: Any) -> dict[str, Any]:
        """Request options that differ from the deployment's (carried by an operation, as JSON)."""
        base = self.defaults.to_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.to_dict().items() if v != base.get(k)}

    def _options(self, op: Mapping[str, Any]) -> Any:
        """The request options an operation was made with (they shape the state change)."""
        return self.defaults.from_dict(op.get("opts") or None, base=self.defaults)

    @staticmethod
    def _flag(extra: dict[str, Any], available: bool) -> dict[str, Any]:
        """Mark an answer made from the last known state because the state backend was unreachable."""
        if not available:
            extra["fallback"] = STATE_UNAVAILABLE
        return extra

    def _meta(self) -> dict[str, Any]:
        return {"method": self.name, "state_version": self.state_version, "embed_dim": int(self.clip.embed_dim),
                "model": str(self.clip.name), "labels": list(self._names) if self._names is not None else None}

    def _export_with_meta(self) -> dict[str, Any]:
        return {"meta": self._meta(), **self._export_state()}

    def _import_checked(self, state: Mapping[str, Any]) -> None:
        """Validate, then replace; should the import still fail, the previous state is put back."""
        self.validate_state(state)
        labels = state["meta"].get("labels")
        try:
            before: dict[str, Any] | None = self._export_state()
        except Exception:  # noqa: BLE001 - the current state is itself broken: an import is the way out
            log.exception("%s: the current state does not export; replacing it", self.name)
            before = None
        self._clear_state()
        try:
            self._import_state(state)
        except Exception as exc:  # noqa: BLE001 - a gap in the schema: refuse, keep what was there
            self._clear_state()
            if before is not None:
                self._import_state(before)
            raise StateRejected("state", f"could not be applied ({type(exc).__name__}: {str(exc)[:200]})") from exc
        self._names = tuple(labels) if labels else self._names

    def _bind_labels(self, names: tuple[str, ...]) -> None:
        """First request fixes the label set (library use; the engine binds it up front)."""
        if self._names is None:
            self._names = tuple(names)
        elif self._names != tuple(names):
            self.host._warn(f"stream state was built for labels {list(self._names)[:5]}..., the deployment "
                            f"serves {list(names)[:5]}...; starting empty")
            self._names = tuple(names)
            self.host.reset()

    # --- state actions ---
    def reset(self) -> None:
        self.host.reset()

    def state_dict(self) -> dict[str, Any]:
        """The current state, after catching up with the log; file backends also snapshot it."""
        self.host.sync()
        self.host.flush()
        return self._export_with_meta()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from tta.errors import BadRequest

        if not isinstance(state, Mapping):
            raise BadRequest("state must be a JSON object exported by the same method", code="bad_state")
        scratch = type(self)(self.clip, self.defaults)  # validate on a copy: a bad import changes nothing
        scratch._names = self._names
        try:
            scratch._import_checked(state)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError) as exc:
            rejected = exc if isinstance(exc, StateRejected) else StateRejected("state", f"{type(exc).__name__}: {exc}")
            self.host.reject("import", rejected)
            raise BadRequest(f"cannot import {self.name} state: {rejected}", code="bad_state") from exc
        self.host.load(scratch._export_with_meta())

    def local_summary(self) -> dict[str, Any]:
        """This replica's counts as they are, without catching up with the log: right after a
        request (which already synced or committed) they are current, at no extra round trip."""
        return self._summary()

    def state_summary(self) -> dict[str, Any]:
        available = self.host.sync()
        out = self._summary()
        out["persistence"] = self.host.describe()
        return self._flag(out, available)
