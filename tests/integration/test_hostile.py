"""Hostile input and the issue-14 defects against the session's real TorchServe.

Every body of the generated corpus (tta.testing.hostile) and a bounded number of
hypothesis-generated bodies of every form go through the real frontend and worker. Each answer
is a 2xx, or a 4xx with ``{"error": message, "code": code}`` (a 413 from the frontend's body limit aside),
within a bounded time, never a 5xx; after each hostile body the next good request is answered
exactly like before. Then the three defects: privileged actions without the admin credential,
a JSON body 5,000 deep, and a request that would cost minutes (refused, or cut by its deadline).
"""

from __future__ import annotations

import base64
import json
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import MODEL
from tests.integration.torchserve import TorchServe
from tta.testing import hostile

pytestmark = pytest.mark.server

MAX_SECONDS = 30.0
LIVE = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def post(server: TorchServe, body: bytes, headers: dict[str, str]) -> requests.Response:
    start = time.perf_counter()
    reply = requests.post(server.predict_url, data=body, headers={**server.auth, **headers}, timeout=MAX_SECONDS * 2)
    assert time.perf_counter() - start < MAX_SECONDS, f"{time.perf_counter() - start:.1f}s"
    return reply


def assert_answer(reply: requests.Response, expect: str = "any", name: str = "") -> None:
    assert reply.status_code < 500, (name, reply.status_code, reply.text[:300])
    if expect == "2xx":
        assert reply.status_code == 200, (name, reply.status_code, reply.text[:300])
    if expect == "4xx":
        assert 400 <= reply.status_code < 500, (name, reply.status_code, reply.text[:300])
    if reply.text:
        json.loads(reply.text, parse_constant=lambda c: pytest.fail(f"{c} in the reply to {name}"))
    if reply.status_code >= 400 and reply.status_code != 413:
        body = reply.json()
        assert set(body) == {"error", "code"}, (name, body)


@pytest.fixture(scope="module")
def good(server: TorchServe) -> tuple[bytes, list]:
    """A good request and its answer, to check that the worker is unharmed after hostile input."""
    body = json.dumps({"image": base64.b64encode(hostile.encode(hostile.photo(), "JPEG")).decode(),
                       "top_k": 3}).encode()
    reply = post(server, body, {"Content-Type": "application/json"})
    assert reply.status_code == 200, reply.text
    return body, reply.json()["top_k"]


def assert_still_good(server: TorchServe, good: tuple[bytes, list], after: str) -> None:
    reply = post(server, good[0], {"Content-Type": "application/json"})
    assert reply.status_code == 200 and reply.json()["top_k"] == good[1], f"after {after}: {reply.text[:200]}"


@pytest.mark.parametrize("case", hostile.corpus(), ids=lambda c: c.name)
def test_corpus_then_a_good_request(server: TorchServe, good, case: hostile.Case) -> None:
    assert_answer(post(server, case.body, case.headers), case.expect, case.name)
    assert_still_good(server, good, case.name)


def test_oversized_body_is_refused_and_the_server_keeps_answering(server: TorchServe, good) -> None:
    """17 MiB: over config.properties' max_request_size (16 MiB); the frontend refuses it."""
    body = b"\xff\xd8\xff" + b"\x00" * (17 * 1024 * 1024)
    try:
        reply = requests.post(server.predict_url, data=body, headers={**server.auth, "Content-Type": "image/jpeg"},
                              timeout=MAX_SECONDS)
        assert 400 <= reply.status_code < 500, reply.status_code
    except requests.ConnectionError:
        pass  # the frontend may close the connection on a body over its limit: a refusal, not a hang
    assert_still_good(server, good, "an oversized body")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
IMAGE = base64.b64encode(hostile.encode(hostile.photo(32), "JPEG")).decode()
FIELDS = {"image": st.just(IMAGE) | json_values, "method": st.sampled_from(["zeroshot", "tpt", "zero", "tda"])
          | json_values, "top_k": json_values, "labels": st.lists(st.text(max_size=10), max_size=4) | json_values,
          "options": st.dictionaries(st.sampled_from(["n_views", "steps", "lr", "gamma"]),
                                     st.integers(-2, 600) | json_values, max_size=2) | json_values,
          "seed": json_values, "deadline_ms": json_values}


@LIVE
@given(body=st.fixed_dictionaries({}, optional=FIELDS))
def test_generated_json_form(server: TorchServe, body: dict) -> None:
    assert_answer(post(server, json.dumps(body).encode(), {"Content-Type": "application/json"}), name=str(body)[:200])


@LIVE
@given(body=st.fixed_dictionaries({"action": st.sampled_from(["state", "reset", "export", "import", "feedback"])
                                   | json_values}, optional={"method": json_values, "state": json_values,
                                                             "label": json_values, "image": json_values}))
def test_generated_actions(server: TorchServe, body: dict) -> None:
    reply = post(server, json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert_answer(reply, name=str(body)[:200])
    if body["action"] in ("reset", "export", "import", "feedback"):
        assert reply.status_code == 401  # no admin credential: refused before anything else


@LIVE
@given(data=st.lists(st.just(IMAGE) | json_values, max_size=3), datatype=st.sampled_from(["BYTES", "FP32", 3]),
       parameters=st.fixed_dictionaries({}, optional={k: v for k, v in FIELDS.items() if k != "image"}) | json_values)
def test_generated_oip(server: TorchServe, data: list, datatype, parameters) -> None:
    body = {"inputs": [{"name": "image", "datatype": datatype, "shape": [len(data)], "data": data}],
            "parameters": parameters}
    reply = requests.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, headers=server.auth, timeout=60)
    assert_answer(reply, name=str(body)[:200])


@LIVE
@given(declared=st.integers(-5, 400) | st.text(alphabet="0123456789abc-+x", min_size=1, max_size=5), tail=st.binary(max_size=200))
def test_generated_oip_binary(server: TorchServe, declared, tail: bytes) -> None:
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(tail)}}]}).encode()
    reply = post(server, header + tail, {"Content-Type": "application/octet-stream",
                                         "Inference-Header-Content-Length": str(declared)})
    assert_answer(reply, name=f"{declared!r} {tail[:20]!r}")


# --- the defects -----------------------------------------------------------------------------
def test_state_actions_need_the_admin_credential(server: TorchServe) -> None:
    body = json.dumps({"action": "export", "method": "tda"}).encode()
    json_headers = {"Content-Type": "application/json"}
    assert post(server, body, json_headers).status_code == 401
    assert post(server, body, {**json_headers, "X-TTA-Admin-Token": server.keys["inference"]}).status_code == 403
    allowed = requests.post(server.predict_url, data=body, headers={**server.admin, **json_headers}, timeout=60)
    assert allowed.status_code == 200 and "state" in allowed.json()
    state = post(server, json.dumps({"action": "state", "method": "tda"}).encode(), json_headers)
    assert state.status_code == 200
    log = (server.workdir / "logs" / "model_log.log").read_text(errors="replace")
    assert "privileged action=export method=tda outcome=ok credential=management_key" in log
    assert "privileged action=export method=tda outcome=denied credential=missing" in log


def test_json_nested_5000_deep_is_a_4xx(server: TorchServe) -> None:
    for kind in ("list", "object"):
        reply = post(server, hostile.nested(5000, kind).encode(), {"Content-Type": "application/json"})
        assert reply.status_code == 400 and reply.json()["code"] == "json_too_deep", reply.text


def test_a_minutes_long_request_ends_by_its_deadline(server: TorchServe) -> None:
    """512 views x 16 steps (11 s on the tiny model; minutes on ViT-B/16) with a 2 s deadline:
    answered at about the deadline, zero-shot and flagged when adaptation did not finish. (The
    cost budget refuses the issue's 1,000-label version outright: tests/unit/test_admission.py;
    this deployment caps labels at 20.)"""
    body = {"image": IMAGE, "method": "tpt", "options": {"n_views": 512, "steps": 16},
            "labels": [f"class {i}" for i in range(20)]}
    start = time.perf_counter()
    reply = post(server, json.dumps(body).encode(), {"Content-Type": "application/json", "X-TTA-Deadline-Ms": "2000"})
    elapsed = time.perf_counter() - start
    assert reply.status_code == 200, reply.text
    assert elapsed < 2.0 + 8.0, f"{elapsed:.1f}s"  # the deadline plus one stage in flight on a busy machine
    assert reply.json().get("fallback", "deadline") == "deadline"  # zero-shot if adaptation did not finish


def test_a_request_past_its_deadline_answers_zero_shot_flagged_and_counted(server: TorchServe) -> None:
    from tests.integration.test_metrics import scrape, total

    metrics_url = f"http://127.0.0.1:{server.tta_metrics_port}/metrics"
    before = total(scrape(metrics_url), "tta_fallbacks_total", reason="deadline")
    zeroshot = post(server, json.dumps({"image": IMAGE}).encode(), {"Content-Type": "application/json"}).json()
    reply = post(server, json.dumps({"image": IMAGE, "method": "tpt"}).encode(),
                 {"Content-Type": "application/json", "X-TTA-Deadline-Ms": "1"})
    assert reply.status_code == 200 and reply.json()["fallback"] == "deadline", reply.text
    assert reply.json()["top_k"] == zeroshot["top_k"]
    assert total(scrape(metrics_url), "tta_fallbacks_total", reason="deadline") == before + 1
