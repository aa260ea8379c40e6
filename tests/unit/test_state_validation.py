"""Nothing that enters stream state can poison it (tta.state.schema), for every state owner.

Property-based (hypothesis, derandomized, bounded): an exported state of each owner (tda, tfup,
tfup-t, gda, drift), filled by real requests on tiny-random CLIP, is mutated one field at a time
(shape, dtype, NaN, inf, huge, negative, out-of-range class, wrong type, missing, wrong meta,
truncated bytes); so is each owner's real operation, sent through the wire form a replica reads
from the log. Every mutation is refused: the import answers `BadRequest` (400 ``bad_state``)
naming the field, the log entry is skipped and counted, and the state afterwards is bit-identical
to before, so the next predictions answer exactly as before. Every mutation here is invalid by
construction (a rule of the owner's schema forbids it), so a refusal is the only right outcome.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tta.drift import DriftConfig, observe_op
from tta.engine import Engine
from tta.errors import BadRequest
from tta.methods.base import get_method_class, list_methods
from tta.state import StateConfig, configure, dumps, on_rejected
from tta.state.ops import decode, encode
from tta.text import LabelSet

LABELS = ["cat", "dog", "car", "rocket", "cup", "tree"]
OWNERS = ("tda", "tfup", "tfup-t", "gda", "dota", "dpe", "boostadapter", "oga", "drift")
DEFAULTS = {
    "tda": {"neg_entropy": [0.0, 1.0]},  # every sample enters the negative cache too (both caches non-empty)
    "tfup": {"min_buffer": 4, "rebuild_every": 2, "min_shots": 1, "max_shots": 2},
    "tfup-t": {"min_buffer": 4, "rebuild_every": 2, "min_shots": 1, "max_shots": 2, "train_every": 3,
               "train_steps": 2},
    "gda": {"pseudo_labels": True, "pseudo_threshold": 0.0, "alpha": 1.0},
    "dota": {},
    "dpe": {"n_views": 1, "evolve_entropy": 1.0},  # every answer evolves the text prototypes (non-empty)
    "boostadapter": {"n_views": 1, "neg_entropy": [0.0, 1.0]},
    "oga": {},
}
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
IMPORT_SETTINGS = settings(SETTINGS, max_examples=20)  # each example: three imports and a prediction

# Which rules a field has (by its name), so that only mutations its schema forbids are drawn.
NONNEGATIVE = {"scores", "classes", "seqs", "next_seq", "updates", "counters", "values", "shots", "class_counts",
               "count", "labelled", "size", "epoch", "entropy_sum", "confidence_sum", "examples", "feedback",
               "pseudo_since_refit", "rounds", "since_train", "n", "cv_n", "alpha", "cv_accuracy",
               "cls", "loss", "score", "labels", "entropy", "confidence", "probs"}
BOUNDED = {"keys", "scores", "values", "text", "embedding_sum", "fc.0.weight", "fc.2.weight", "text_residual",
           "weights", "bias", "class_counts", "entropy_sum", "confidence_sum", "alpha", "cv_accuracy", "count",
           "labelled", "size", "feature", "feats", "probs", "embedding", "loss", "score", "entropy", "confidence",
           "cls", "labels"}
CLASSES = {"classes", "cls", "labels"}
MAY_BE_ABSENT = {"values", "cache", "fit", "text", "text_residual", "cv_accuracy", "probs", "scored", "refit"}


@pytest.fixture(scope="module")
def engine(tiny_clip) -> Iterator[Engine]:
    previous = configure(StateConfig())  # in-process state: nothing outside this test sees it
    try:
        eng = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=DEFAULTS,
                     drift=DriftConfig(reference_size=4, window=2))
        gen = torch.Generator().manual_seed(0)
        images = [torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=gen) for _ in range(8)]
        for method in ("tda", "tfup", "tfup-t", "gda", "dota", "dpe", "boostadapter", "oga"):
            for image in images:
                eng.predict(image, method=method)
        for i, image in enumerate(images[:4]):
            eng.feedback(image, LABELS[i % 3], "gda")
        yield eng
    finally:
        configure(previous)


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(99))


@pytest.fixture(scope="module")
def rejections() -> Iterator[list]:
    seen: list = []
    remove = on_rejected(seen.append)
    yield seen
    remove()


# --- mutations --------------------------------------------------------------------------------------
def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
        for i, item in enumerate(value):
            yield from _leaves(item, (*path, i))
    yield path, value


def _name(path: tuple) -> str:
    return next((p for p in reversed(path) if isinstance(p, str)), "")


def _set(container: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    """A copy of `container` with the leaf at `path` replaced (or deleted)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = dict(container) if isinstance(container, dict) else list(container)
    if delete and not rest:
        del copy[head]
    else:
        copy[head] = _set(container[head], rest, value, delete)
    return copy


def _poke(tensor: torch.Tensor, value: float) -> torch.Tensor:
    out = tensor.clone()
    out.view(-1)[0] = value
    return out


def mutations(path: tuple, value: Any, classes: int) -> Iterator[tuple[str, Any]]:
    """(name, mutated value) for every mutation the field's rules forbid; "DELETE" removes the field."""
    name = _name(path)
    if path and path[0] == "meta":
        yield "wrong meta", "poison" if not isinstance(value, str) else value + "-other"
        return
    if name == "kind":
        yield "unknown kind", "poison"
        return
    if path and isinstance(path[-1], str) and name not in MAY_BE_ABSENT and "opts" not in path[:-1]:
        yield "missing", "DELETE"
    if isinstance(value, dict) or value is None:
        if value is not None:
            yield "wrong type", "poison"
        return
    yield "wrong type", "poison"
    if isinstance(value, torch.Tensor):
        yield from _tensor_mutations(name, value, classes)
    else:
        yield from _scalar_mutations(name, value, classes)


def _scalar_mutations(name: str, value: Any, classes: int) -> Iterator[tuple[str, Any]]:
    if isinstance(value, bool):
        yield "bool as int", int(value)
    elif isinstance(value, int):
        yield "float for an int", value + 0.5
        if name in NONNEGATIVE:
            yield "negative", -5
        if name in CLASSES:
            yield "out-of-range class", classes
            yield "huge class", 1_000_000
        elif name in BOUNDED:
            yield "huge", 10**12
    elif isinstance(value, float):
        yield "NaN", math.nan
        yield "inf", math.inf
        if name in NONNEGATIVE:
            yield "negative", -1.0
        if name in BOUNDED:
            yield "huge", 1e30


def _tensor_mutations(name: str, value: torch.Tensor, classes: int) -> Iterator[tuple[str, Any]]:
    other = {torch.float32: torch.float64, torch.float64: torch.float32, torch.int64: torch.int32}
    yield "dtype", value.to(other.get(value.dtype, torch.float32))
    if value.dim() >= 2:
        yield "flattened shape", value.reshape(-1)
    if value.dim() >= 1 and value.shape[0] >= 1:
        yield "one row short", value[:-1].clone()
        yield "one row extra", torch.cat([value, value[-1:]])
    if not value.numel():
        return
    if value.is_floating_point():
        yield "NaN", _poke(value, math.nan)
        yield "inf", _poke(value, math.inf)
        yield "-inf", _poke(value, -math.inf)
        if name in BOUNDED:
            yield "huge", _poke(value, 1e30)
    if name in NONNEGATIVE:
        yield "negative", _poke(value, -5)
    if name in CLASSES:
        yield "out-of-range class", _poke(value, classes)
        yield "huge class", _poke(value, 1_000_000)


def _cases(value: dict, classes: int) -> list[tuple[tuple, str, Any]]:
    return [(path, kind, mutated) for path, leaf in _leaves(value) if path
            for kind, mutated in mutations(path, leaf, classes)]


def _apply_mutation(value: dict, case: tuple[tuple, str, Any]) -> dict:
    path, _kind, mutated = case
    return _set(value, path, None, delete=True) if isinstance(mutated, str) and mutated == "DELETE" else \
        _set(value, path, mutated)


def same(a: Any, b: Any) -> bool:
    """Bit-identical: tensors equal in dtype, shape and every bit (NaN included), everything else ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _answer(engine: Engine, method: str, probe: torch.Tensor) -> tuple:
    if method == "drift":
        return (engine.state_summary("drift")["reference"],)
    before = engine.export_state(method)
    prediction = engine.predict(probe, method=method)
    engine.import_state(method, before)  # the probe's own update is not part of the comparison
    return prediction.label, prediction.probs.clone(), prediction.extra.get("fallback")


# --- the cases -----------------------------------------------------------------------------------------
ALL_STATE_CASES: dict[str, list] = {}


def _state_cases(engine: Engine, owner: str) -> list:
    if owner not in ALL_STATE_CASES:
        ALL_STATE_CASES[owner] = _cases(engine.export_state(owner), len(LABELS))
    return ALL_STATE_CASES[owner]


STREAM_METHODS = [name for name in list_methods() if get_method_class(name).scope == "stream"]


@pytest.mark.parametrize("method", STREAM_METHODS)
def test_every_registered_stream_method_declares_what_its_state_may_hold(engine: Engine, method: str) -> None:
    """A new stream method gets validated by declaring its fields; its own export must pass them."""
    impl = engine.method(method)
    exported = engine.export_state(method)
    impl.validate_state(exported)  # NotImplementedError names the missing declaration
    assert impl._op_schemas(), f"{method} declares no operations"
    engine.import_state(method, exported)
    assert same(engine.export_state(method), exported)


def test_every_stream_method_is_mutated_here() -> None:
    assert set(STREAM_METHODS) <= set(OWNERS), "add the new stream method to OWNERS, DEFAULTS and _real_op"


@pytest.mark.parametrize("owner", OWNERS)
def test_every_owner_has_non_empty_state_to_mutate(engine: Engine, owner: str) -> None:
    exported = engine.export_state(owner)
    tensors = [leaf for _, leaf in _leaves(exported) if isinstance(leaf, torch.Tensor)]
    assert tensors and all(t.numel() for t in tensors), f"{owner}: an empty part would leave mutations untried"
    assert len(_state_cases(engine, owner)) >= 20


@pytest.mark.parametrize("owner", OWNERS)
@IMPORT_SETTINGS
@given(data=st.data())
def test_a_mutated_import_is_refused_and_changes_nothing(engine: Engine, probe: torch.Tensor, rejections: list,
                                                         owner: str, data: st.DataObject) -> None:
    cases = _state_cases(engine, owner)
    case = data.draw(st.sampled_from(cases), label="mutation")
    before = engine.export_state(owner)
    answer = _answer(engine, owner, probe)
    count = len(rejections)
    with pytest.raises(BadRequest) as refused:
        engine.import_state(owner, _apply_mutation(before, case))
    field = ".".join(str(p) for p in case[0] if isinstance(p, str))
    assert refused.value.code == "bad_state" and field.split(".")[0] in str(refused.value), (case[:2], refused.value)
    assert len(rejections) == count + 1 and rejections[-1].source == "import"
    assert same(engine.export_state(owner), before), f"{case[:2]} changed the state"
    again = _answer(engine, owner, probe)
    assert same(list(again), list(answer)), f"{case[:2]}: answers changed"


def _real_op(engine: Engine, owner: str) -> dict:
    """The operation a request of `owner` commits, as the method builds it."""
    gen = torch.Generator().manual_seed(5)
    feature = torch.nn.functional.normalize(torch.randn(engine.clip.embed_dim, generator=gen), dim=0)
    probs = torch.softmax(torch.randn(len(LABELS), generator=gen), 0)
    impl = engine.state_owner(owner)
    if owner == "tda":
        op = impl.update_op(feature, 1, 1.0, probs, impl.defaults)
        assert op["neg"]
        return op
    if owner in ("tfup", "tfup-t"):
        return {"kind": "observe", "cls": 2, "feature": feature, "opts": {"rebuild_every": 3}}
    if owner == "gda":
        return impl._op("support", impl.defaults, feats=feature[None, None], labels=[1], refit=True, scored=True)
    if owner == "dota":
        return impl.update_op(feature[None], probs[None])
    if owner == "oga":
        return impl.update_op(feature, probs)
    if owner == "dpe":
        return {"kind": "cache", "cls": 1, "score": 0.3, "feature": feature}
    if owner == "boostadapter":
        op = impl.update_op(feature, 1, 1.0, probs, impl.defaults)
        assert op["neg"]
        return op
    return observe_op(feature.double(), 1, 0.5, 0.7)


def _hand_written(op: dict, path: tuple, value: float) -> bytes:
    """`op` on the wire with a NaN/Infinity JSON token at `path` (what `encode` itself never writes)."""
    placeholder = 123456.789
    data = encode(_set(op, path, placeholder))
    (length,) = struct.unpack_from("<I", data)
    header = data[4:4 + length].decode().replace(repr(placeholder), "NaN" if math.isnan(value) else
                                                  ("Infinity" if value > 0 else "-Infinity"))
    return struct.pack("<I", len(header)) + header.encode() + data[4 + length:]


@pytest.mark.parametrize("owner", OWNERS)
def test_the_real_operation_is_valid(engine: Engine, owner: str) -> None:
    engine.state_owner(owner).validate_op(decode(encode(_real_op(engine, owner))))


@pytest.mark.parametrize("owner", OWNERS)
@SETTINGS
@given(data=st.data())
def test_a_mutated_log_entry_is_skipped_and_changes_nothing(engine: Engine, rejections: list, owner: str,
                                                            data: st.DataObject) -> None:
    impl = engine.state_owner(owner)
    op = _real_op(engine, owner)
    extra = [((), "truncated bytes", k) for k in (1, 7, 64)] + [((), "truncated snapshot", k) for k in (1, 100)]
    case = data.draw(st.sampled_from(_cases(op, len(LABELS)) + extra), label="mutation")
    before = engine.export_state(owner)
    count = len(rejections)
    if case[1] == "truncated bytes":  # the Redis replica's path: a payload that does not decode is skipped
        with pytest.raises(ValueError, match="malformed"):
            decode(encode(op)[:-case[2]])
        return
    mutated = _apply_mutation(op, case) if case[1] != "truncated snapshot" else None
    if isinstance(case[2], float) and not math.isfinite(case[2]):  # encode refuses these: write them by hand
        with pytest.raises(ValueError, match="not a value an operation may carry"):
            decode(_hand_written(mutated, case[0], case[2]))
        return
    if case[1] == "truncated snapshot":
        entry = {"kind": "import", "state": dumps(before)[:-case[2]]}
    else:
        entry = decode(encode(mutated))  # through the wire form, as a replica reads it
    assert impl.host._apply(entry, "log", "1700000000000-0") is False, case[:2]
    assert len(rejections) == count + 1 and rejections[-1].source == "log"
    assert rejections[-1].entry == "1700000000000-0"
    assert same(engine.export_state(owner), before), f"{case[:2]} changed the state"


def test_a_refused_operation_of_this_replica_is_not_applied(engine: Engine, rejections: list) -> None:
    """A request whose features are non-finite (a broken model) commits nothing."""
    impl = engine.method("tda")
    before = engine.export_state("tda")
    op = _real_op(engine, "tda")
    op["feature"] = torch.full_like(op["feature"], math.nan)
    count = len(rejections)
    assert impl.host.commit(op)
    assert rejections[count].source == "request" and rejections[count].field == "feature"
    assert same(engine.export_state("tda"), before)


def test_a_stream_method_failing_on_its_state_answers_zero_shot_flagged(engine: Engine, probe: torch.Tensor,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Belt and braces behind validation: state broken from inside (no import path allows it)."""
    impl = engine.method("tda")
    before = engine.export_state("tda")
    try:
        entry = next(iter(impl.pos._queues.values()))[0]
        entry.key = torch.zeros(3)  # a key of the wrong size, put there behind the validation's back
        impl.pos._stacked = None
        with caplog.at_level("ERROR"):
            answer = engine.predict(probe, method="tda")
        assert answer.extra["fallback"] == "state_invalid" and torch.isfinite(answer.probs).all()
        zeroshot = engine.predict(probe, method="zeroshot")
        assert answer.label == zeroshot.label and torch.allclose(answer.probs, zeroshot.probs)
        assert "raised while answering from its stream state" in caplog.text
    finally:
        impl.pos.clear()
        engine.import_state("tda", before)


def test_the_serving_edge_answers_400_naming_field_and_rule_and_counts_it(engine: Engine, probe: torch.Tensor) -> None:
    """Through the real Service (JSON codec, admin credential, error mapping, metrics)."""
    import json

    from prometheus_client import CollectorRegistry

    from tta.metrics import ServingMetrics, sample_values
    from tta.serving import codec
    from tta.serving.admin import AdminAuth
    from tta.serving.codec import ModelInfo
    from tta.serving.service import Service, watch_state_rejections

    metrics = ServingMetrics(CollectorRegistry())
    unwatch = watch_state_rejections(metrics, "m")
    service = Service(engine, metrics, ModelInfo("m", "1.0", "tiny-random"), admin=AdminAuth(token="t" * 24))
    headers = {"content-type": "application/json", "x-tta-admin-token": "t" * 24}
    try:
        exported = codec.encode_state(engine.export_state("tda"))
        keys = exported["positive"]["keys"]
        for bad, field in (({**keys, "shape": [-1, keys["shape"][1]]}, "positive.keys"),
                           ({**keys, "__tensor__": "object"}, "positive.keys")):
            state = {**exported, "positive": {**exported["positive"], "keys": bad}}
            reply = service.handle(json.dumps({"action": "import", "method": "tda", "state": state}).encode(), headers)
            assert reply.status == 400 and reply.body["code"] == "bad_state" and field in reply.body["error"]
        nan_scores = codec.encode_state(torch.full_like(engine.export_state("tda")["positive"]["scores"], math.nan))
        state = {**exported, "positive": {**exported["positive"], "scores": nan_scores}}
        reply = service.handle(json.dumps({"action": "import", "method": "tda", "state": state}).encode(), headers)
        assert reply.status == 400 and reply.body["error"] == (
            "cannot import tda state: positive.scores: values must be finite (no NaN or infinity)")
        text = metrics.render().decode()
        assert sum(sample_values(text, "tta_state_rejected_total", {"method": "tda", "source": "import"})) == 1
        import base64

        from tta.testing.hostile import encode as encode_image
        from tta.testing.hostile import photo

        before = engine.export_state("tda")
        answer = service.handle(json.dumps({"image": base64.b64encode(encode_image(photo(), "JPEG")).decode(),
                                            "method": "tda"}).encode(), headers)
        assert answer.status == 200 and "fallback" not in answer.body
        engine.import_state("tda", before)
    finally:
        unwatch()
