"""Property-based hostile input on the shared serving layer (codec + service + engine).

Hypothesis generates bodies of every request form — raw bytes, the JSON form, state actions,
OIP v2 JSON and OIP binary — with wrong types in every field, NaN/negative/huge numbers, odd
unicode and nesting. For each: the answer is a 2xx, or a 4xx/503 with exactly
``{"error": message, "code": code}``; never a 5xx otherwise, never a NaN in the JSON, within a bounded time.
The generated corpus (tta.testing.hostile) runs through the same check.
"""

from __future__ import annotations

import base64
import json
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from tta.admission import Budget
from tta.engine import Engine
from tta.metrics import ServingMetrics
from tta.serving.admin import AdminAuth
from tta.serving.codec import ModelInfo
from tta.serving.service import Service
from tta.testing import hostile
from tta.text import LabelSet

LABELS = ["cat", "dog", "car", "rocket", "cup"]
TOKEN = "hypothesis-admin-token"
MAX_SECONDS = 10.0  # one request, any body
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
IMAGE_B64 = base64.b64encode(hostile.encode(hostile.photo(32), "JPEG")).decode()
IMAGE_BYTES = hostile.encode(hostile.photo(32), "PNG")
OPTION_NAMES = ["n_views", "steps", "lr", "selection_p", "gamma", "n_ctx", "ctx_init", "augmix", "precision",
                "chunk_size", "reward_model", "generator", "n_generated", "variant", "sample_k", "alpha"]
METHODS = ["zeroshot", "tpt", "zero", "tda", "gda", "tfup", "rlcf", "difftpt", "drift"]


@pytest.fixture(scope="module")
def service(tiny_clip) -> Service:
    """Small budget and deadline: any admitted request is cheap on the tiny model."""
    budget = Budget(max_request_cost=80, deadline_ms=3000)
    defaults = {"tpt": {"n_views": 4}, "zero": {"n_views": 4}, "rlcf": {"n_views": 4, "reward_model": "policy"},
                "difftpt": {"n_views": 4, "generation": False}}
    engine = Engine(tiny_clip, LabelSet.create(LABELS), method_defaults=defaults, max_labels=20, budget=budget)
    return Service(engine, ServingMetrics(CollectorRegistry()), ModelInfo("m", "1", "tiny-random"),
                   budget=budget, admin=AdminAuth(token=TOKEN))


scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["", "NaN", "-1", "1e309", "\u202e", "\ud800", "../../etc/passwd", "http://127.0.0.1:1/"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
images = st.sampled_from([IMAGE_B64, "data:image/jpeg;base64," + IMAGE_B64, IMAGE_B64[:40], "%%%", ""]) | json_values
options = st.dictionaries(st.sampled_from(OPTION_NAMES), json_values | st.integers(-5, 600) | st.floats(), max_size=3)
labels = st.lists(st.text(max_size=30), max_size=25) | json_values
fields = {"image": images, "method": st.sampled_from(METHODS) | json_values, "top_k": st.integers(-3, 200) | json_values,
          "labels": labels, "options": options | json_values, "seed": st.integers(-(2**65), 2**65) | json_values,
          "deadline_ms": st.floats(-10, 1e6) | json_values, "extra": json_values}
prediction_bodies = st.fixed_dictionaries({}, optional=fields)
action_bodies = st.fixed_dictionaries(
    {"action": st.sampled_from(["state", "reset", "export", "import", "feedback"]) | json_values},
    optional={"method": st.sampled_from(METHODS) | json_values, "state": json_values, "label": labels | st.text(),
              "image": images, "seed": json_values})
oip_bodies = st.fixed_dictionaries(
    {"inputs": st.lists(st.fixed_dictionaries(
        {"name": json_values, "datatype": st.sampled_from(["BYTES", "FP32"]) | json_values,
         "data": st.lists(images, max_size=3) | json_values},
        optional={"shape": json_values}), max_size=3) | json_values},
    optional={"parameters": st.fixed_dictionaries({}, optional={k: v for k, v in fields.items() if k != "image"})
              | json_values, "id": json_values})


def check(service: Service, body: bytes | str | dict, headers: dict[str, str]):  # noqa: ANN201
    start = time.perf_counter()
    reply = service.handle(body, headers)
    elapsed = time.perf_counter() - start
    text = reply.text()
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a reply"))
    assert reply.status < 500 or (reply.status == 503 and "Retry-After" in reply.headers), (reply.status, parsed)
    if reply.status >= 400:
        assert set(parsed) == {"error", "code"}, parsed
    assert elapsed < MAX_SECONDS, f"{elapsed:.1f}s for {str(body)[:200]}"
    return reply


def _json_bytes(body: object) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8", errors="surrogatepass")


@SETTINGS
@given(body=prediction_bodies, as_text=st.booleans())
def test_json_form(service: Service, body: dict, as_text: bool) -> None:
    raw = _json_bytes(body)
    check(service, raw if not as_text else body, {"content-type": "application/json"})


@SETTINGS
@given(body=action_bodies, admin=st.sampled_from([None, TOKEN, "wrong"]))
def test_actions(service: Service, body: dict, admin: str | None) -> None:
    headers = {"content-type": "application/json", **({"x-tta-admin-token": admin} if admin else {})}
    check(service, _json_bytes(body), headers)


@SETTINGS
@given(body=oip_bodies)
def test_oip_json(service: Service, body: dict) -> None:
    check(service, _json_bytes(body), {"content-type": "application/json"})


@SETTINGS
@given(header=oip_bodies, sizes=st.lists(st.integers(-5, 5000), max_size=3), tail=st.binary(max_size=300),
       declared=st.integers(-10, 10_000) | st.text(max_size=6), with_image=st.booleans())
def test_oip_binary(service: Service, header: dict, sizes: list, tail: bytes, declared, with_image: bool) -> None:
    if isinstance(header.get("inputs"), list):
        for item, size in zip(header["inputs"], sizes, strict=False):
            if isinstance(item, dict):
                item["parameters"] = {"binary_data_size": size}
    raw = _json_bytes(header)
    payload = (struct.pack("<I", len(IMAGE_BYTES)) + IMAGE_BYTES if with_image else b"") + tail
    length = str(len(raw)) if isinstance(declared, int) and declared % 3 == 0 else str(declared)
    check(service, raw + payload, {"inference-header-content-length": length})


@SETTINGS
@given(body=st.binary(max_size=2000), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a",
                                                                 b"RIFF\x00\x00\x00\x00WEBP", b"{", b"["]),
       content_type=st.sampled_from(["", "application/octet-stream", "image/jpeg", "application/json", "text/plain"]))
def test_raw_bodies(service: Service, body: bytes, prefix: bytes, content_type: str) -> None:
    check(service, prefix + body, {"content-type": content_type} if content_type else {})


@pytest.mark.parametrize("case", hostile.corpus(), ids=lambda c: c.name)
def test_generated_corpus(service: Service, case: hostile.Case) -> None:
    headers = {k.lower(): v for k, v in case.headers.items()}
    reply = check(service, case.body, headers)
    if case.expect == "2xx":
        assert reply.status == 200, (case.name, reply.body)
    if case.expect == "4xx":
        assert 400 <= reply.status < 500, (case.name, reply.status, reply.body)
