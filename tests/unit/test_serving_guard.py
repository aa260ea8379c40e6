"""The shared serving layer's guards (tta.serving): privileged actions need the admin credential,
JSON depth is bounded, every request has a deadline (header or field, lower only), over-budget
requests are refused naming the limit, and overload answers 503 with Retry-After.

These run the real Service over a real Engine (tiny-random CLIP); the TorchServe adapter is
checked against a live server in tests/integration/test_hostile.py.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tta.admission import Budget
from tta.engine import Engine
from tta.metrics import ServingMetrics, sample_values
from tta.serving.admin import AdminAuth
from tta.serving.codec import ModelInfo
from tta.serving.service import Service, build_service
from tta.testing.hostile import encode, nested, photo
from tta.text import LabelSet

LABELS = ["cat", "dog", "car", "rocket", "cup"]
TOKEN = "admin-s3cret-token-value"
JSON = {"content-type": "application/json"}


def _service(clip, *, admin: AdminAuth | None = None, budget: Budget | None = None, max_inflight: int = 0,
             defaults: dict | None = None) -> Service:
    budget = budget or Budget()
    engine = Engine(clip, LabelSet.create(LABELS), method_defaults=defaults or {"tpt": {"n_views": 8}},
                    budget=budget)
    return Service(engine, ServingMetrics(CollectorRegistry()), ModelInfo("m", "1.0", "tiny-random"),
                   budget=budget, admin=admin if admin is not None else AdminAuth(token=TOKEN),
                   max_inflight=max_inflight)


@pytest.fixture(scope="module")
def image_b64() -> str:
    return base64.b64encode(encode(photo(), "JPEG")).decode()


def _post(service: Service, body: dict, **headers: str):
    return service.handle(json.dumps(body).encode(), {**JSON, **{k.replace("_", "-"): v for k, v in headers.items()}})


# --- privileged actions -------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["reset", "export", "import", "feedback"])
def test_privileged_actions_need_the_admin_credential(tiny_clip, image_b64, action: str, caplog) -> None:
    service = _service(tiny_clip)
    body = {"action": action, "method": "gda" if action == "feedback" else "tda"}
    if action == "import":
        body["state"] = _post(service, {"action": "export", "method": "tda"}, x_tta_admin_token=TOKEN).body["state"]
    if action == "feedback":
        body.update(label="cat", image=image_b64)
    caplog.set_level(logging.INFO, logger="tta.audit")
    missing = _post(service, body)
    assert (missing.status, missing.body["code"]) == (401, "unauthorized"), missing.body
    wrong = _post(service, body, x_tta_admin_token="guess")
    assert (wrong.status, wrong.body["code"]) == (403, "forbidden")
    right = _post(service, body, x_tta_admin_token=TOKEN, x_forwarded_for="10.1.2.3")
    assert right.status == 200, right.body
    audit = [r.getMessage() for r in caplog.records if r.name == "tta.audit"]
    assert any(f"action={action}" in m and "outcome=denied credential=missing" in m for m in audit)
    assert any("outcome=denied credential=invalid" in m for m in audit)
    assert any("outcome=ok credential=admin_token" in m and "x-forwarded-for=10.1.2.3" in m for m in audit)
    assert not any(TOKEN in m or "guess" in m for m in audit)


def test_state_stays_open_and_nothing_configured_means_disabled(tiny_clip) -> None:
    service = _service(tiny_clip, admin=AdminAuth())
    assert _post(service, {"action": "state", "method": "tda"}).status == 200
    refused = _post(service, {"action": "reset", "method": "tda"}, x_tta_admin_token="anything")
    assert refused.status == 403 and "no admin credential" in refused.body["error"]


def test_drift_recapture_is_privileged_like_any_reset(tiny_clip) -> None:
    reply = _post(_service(tiny_clip), {"action": "reset", "method": "drift"})
    assert reply.status == 401


def test_management_key_from_torchserve_key_file_with_rotation(tmp_path: Path) -> None:
    key_file = tmp_path / "key_file.json"

    def write(key: str, mtime: float) -> None:
        key_file.write_text(json.dumps({"management": {"key": key, "expiration time": "x"},
                                        "inference": {"key": "inf"}, "API": {"key": "api"}}))
        os.utime(key_file, (mtime, mtime))

    write("mgmt-1", 1_000_000)
    auth = AdminAuth.from_config({}, environ={}, key_file=key_file)
    assert auth.authorize("reset", "tda", {"x-tta-admin-token": "mgmt-1"}) == "management_key"
    with pytest.raises(Exception, match="not valid"):
        auth.authorize("reset", "tda", {"x-tta-admin-token": "inf"})  # the inference key is not enough
    write("mgmt-2", 1_000_100)  # TorchServe rotated the key
    assert auth.authorize("export", "tda", {"x-tta-admin-token": "mgmt-2"}) == "management_key"
    with pytest.raises(Exception, match="not valid"):
        auth.authorize("export", "tda", {"x-tta-admin-token": "mgmt-1"})


def test_admin_token_from_a_mounted_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-secret\n")
    auth = AdminAuth.from_config({"admin_token_file": str(secret)}, environ={})
    assert auth.authorize("import", "tda", {"x-tta-admin-token": "from-secret"}) == "admin_token_file"
    assert AdminAuth.from_config({}, environ={"TTA_ADMIN_TOKEN": "env-token"}).authorize(
        "reset", None, {"x-tta-admin-token": "env-token"}) == "admin_token"


# --- JSON depth -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["list", "object"])
def test_json_nested_5000_deep_is_a_400(tiny_clip, kind: str) -> None:
    reply = _service(tiny_clip).handle(nested(5000, kind).encode(), JSON)
    assert (reply.status, reply.body["code"]) == (400, "json_too_deep")


def test_already_parsed_deep_json_is_refused_before_any_recursion(tiny_clip, image_b64) -> None:
    """TorchServe parses JSON bodies itself; a 900-deep `state` would recurse in decode_state."""
    body = {"action": "import", "method": "tda", "state": json.loads(nested(900, "object"))}
    reply = _service(tiny_clip).handle(body, {"x-tta-admin-token": TOKEN})
    assert (reply.status, reply.body["code"]) == (400, "json_too_deep")


# --- deadlines and budget -------------------------------------------------------------------------
def test_deadline_header_and_field_make_a_flagged_zero_shot_answer(tiny_clip, image_b64) -> None:
    service = _service(tiny_clip)
    reference = _post(service, {"image": image_b64})
    for reply in (_post(service, {"image": image_b64, "method": "tpt"}, x_tta_deadline_ms="1"),
                  _post(service, {"image": image_b64, "method": "tpt", "deadline_ms": 1})):
        assert reply.status == 200 and reply.body["fallback"] == "deadline"
        assert reply.body["top_k"] == reference.body["top_k"]
    text = service.metrics.render().decode()
    assert sum(sample_values(text, "tta_fallbacks_total", {"reason": "deadline"})) == 2
    assert "fallback" not in _post(service, {"image": image_b64, "method": "tpt"}).body


def test_deadline_applies_to_oip_and_bad_deadlines_are_400(tiny_clip, image_b64) -> None:
    service = _service(tiny_clip)
    oip = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image_b64]}],
           "parameters": {"method": "tpt", "deadline_ms": 1}}
    reply = _post(service, oip)
    assert reply.status == 200 and reply.predictions[0].extra["fallback"] == "deadline"
    for bad in ("0", "-5", "nan", "soon"):
        refused = _post(service, {"image": image_b64}, x_tta_deadline_ms=bad)
        assert (refused.status, refused.body["code"]) == (400, "bad_deadline")


def test_over_budget_is_422_naming_the_limit(tiny_clip, image_b64) -> None:
    service = _service(tiny_clip, budget=Budget(max_request_cost=100))
    reply = _post(service, {"image": image_b64, "method": "tpt", "options": {"n_views": 256, "steps": 4}})
    assert reply.status == 422 and reply.body["code"] == "over_budget"
    assert "max_request_cost 100" in reply.body["error"]


def test_a_deadline_past_the_worker_timeout_refuses_to_start() -> None:
    config = {"labels": "cat,dog", "model": "tiny-random", "deadline_ms": 100_000}
    with pytest.raises(ValueError, match="responseTimeout"):
        build_service(config, model_name="m", response_timeout_s=120)


# --- overload ---------------------------------------------------------------------------------------
def test_in_flight_bound_answers_503_with_retry_after(tiny_clip, image_b64) -> None:
    import dataclasses

    real = tiny_clip.model.encode_image
    release = threading.Event()

    def blocking(views):
        release.wait(30)
        return real(views)

    service = _service(dataclasses.replace(tiny_clip, image_encoder=blocking), max_inflight=1)
    first: list = []
    worker = threading.Thread(target=lambda: first.append(_post(service, {"image": image_b64})))
    worker.start()
    deadline = time.monotonic() + 30
    while service._inflight < 1 and time.monotonic() < deadline:  # noqa: SLF001 - wait on the condition
        time.sleep(0.01)
    busy = _post(service, {"image": image_b64})
    release.set()
    worker.join(30)
    assert (busy.status, busy.body["code"]) == (503, "overloaded") and busy.headers["Retry-After"] == "1"
    assert first[0].status == 200
    assert _post(service, {"image": image_b64}).status == 200  # the bound frees with the request


def test_unavailable_answers_carry_retry_after(tiny_clip, image_b64) -> None:
    import dataclasses

    def oom(views):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory")

    reply = _post(_service(dataclasses.replace(tiny_clip, image_encoder=oom)), {"image": image_b64})
    assert reply.status == 503 and reply.headers.get("Retry-After") == "1"
    assert set(reply.body) == {"error", "code"}


def test_reply_text_never_holds_nan(tiny_clip) -> None:
    buffer = io.BytesIO()
    photo().save(buffer, "PNG")
    text = _service(tiny_clip).handle(buffer.getvalue(), {}).text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the reply"))
