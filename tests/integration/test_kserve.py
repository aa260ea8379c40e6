"""KServe's model server (`tta serve --server kserve`) answering standard OIP v2 clients.

One real server for this module, on free ports, with the same deployment as the session
TorchServe (tiny-random CLIP, the same labels, method defaults and limits) and a bearer token.
tritonclient talks to it over HTTP and gRPC; answers and error codes are compared with the
session TorchServe's for the same requests.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.integration.conftest import LABELS, MAX_LABELS, MODEL
from tests.integration.kserve_server import KServe
from tests.integration.test_server import _bomb_png, post_json
from tests.integration.torchserve import TorchServe
from tta.metrics import sample_values

# Only look for kserve: importing it here would register its OIP protos in this process's protobuf
# pool, where tritonclient.grpc registers the same names (the clients must live apart from it).
pytestmark = [pytest.mark.server, pytest.mark.skipif(importlib.util.find_spec("kserve") is None,
                                                     reason="the kserve extra is not installed (uv sync --extra kserve)")]

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def clients(kserve: KServe):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    return {"http": (triton_http, triton_http.InferenceServerClient(f"127.0.0.1:{kserve.http_port}")),
            "grpc": (triton_grpc, triton_grpc.InferenceServerClient(f"127.0.0.1:{kserve.grpc_port}"))}


def image_input(triton, images: list[bytes], binary: bool):
    """A BYTES input: encoded images as raw bytes (binary extension / gRPC raw) or base64 text (JSON)."""
    values = np.array(images if binary else [b64(x).encode() for x in images], dtype=object)
    item = triton.InferInput("image", [len(images)], "BYTES")
    if triton.__name__.endswith("http"):
        item.set_data_from_numpy(values, binary_data=binary)
    else:
        item.set_data_from_numpy(values)  # gRPC always sends raw contents
    return item


def as_text(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def grpc_dict(message) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_health_and_model_metadata(kserve: KServe, protocol: str) -> None:
    triton, client = clients(kserve)[protocol]
    headers = kserve.auth
    assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)
    assert client.is_model_ready(MODEL, headers=headers) and client.is_model_ready(MODEL, "1.0", headers=headers)
    if protocol == "http":  # OIP health: a 4xx (here 404) is false
        assert not client.is_model_ready("no-such-model", headers=headers)
        assert not client.is_model_ready(MODEL, "7", headers=headers)
    else:  # gRPC: NOT_FOUND for a model or a version the server does not serve
        from tritonclient.utils import InferenceServerException

        for name, version in (("no-such-model", ""), (MODEL, "7")):
            with pytest.raises(InferenceServerException, match="NOT_FOUND"):
                client.is_model_ready(name, version, headers=headers)
    for version in ("", "1.0"):
        meta = client.get_model_metadata(MODEL, version, headers=headers)
        meta = grpc_dict(meta) if protocol == "grpc" else meta
        tensors = {t["name"]: (t["datatype"], [int(s) for s in t["shape"]]) for t in meta["inputs"] + meta["outputs"]}
        assert tensors == {"image": ("BYTES", [-1]), "labels": ("BYTES", [-1, -1]),
                           "probabilities": ("FP32", [-1, -1])}
        assert meta["platform"] == "clip-tta" and meta["versions"] == ["1.0"], meta  # the same over both
    if protocol == "http":  # OIP metadata has no field for these; REST carries them as scalar parameters
        params = meta["parameters"]
        assert all(isinstance(v, str | int | float | bool) for v in params.values()), params
        assert params["label_set_size"] == len(LABELS) and params["default_method"] == "zeroshot"
        assert {"zeroshot", "tpt", "zero", "tda", "gda"} <= set(params["methods"].split(","))
        assert params["max_labels"] == MAX_LABELS


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_model_config_extension_matches_the_metadata(kserve: KServe, protocol: str) -> None:
    """Triton's model configuration extension (what perf_analyzer and model_analyzer ask first)."""
    from tritonclient.utils import InferenceServerException

    triton, client = clients(kserve)[protocol]
    config = client.get_model_config(MODEL, "1.0", headers=kserve.auth)
    config = grpc_dict(config)["config"] if protocol == "grpc" else config
    assert config["name"] == MODEL and config["platform"] == "clip-tta" and int(config.get("max_batch_size", 0)) == 0
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]] == \
        [("image", "TYPE_STRING", [-1])]
    assert [(t["name"], t["data_type"]) for t in config["output"]] == [("labels", "TYPE_STRING"),
                                                                     ("probabilities", "TYPE_FP32")]
    with pytest.raises(InferenceServerException) as error:
        client.get_model_config(MODEL, "7", headers=kserve.auth)
    assert "no version '7'" in str(error.value)
    assert str(error.value.status()) in ("404", "StatusCode.NOT_FOUND")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_versioned_infer_works_for_the_served_version_only(kserve: KServe, photos: dict[str, bytes],
                                                           protocol: str) -> None:
    from tritonclient.utils import InferenceServerException

    triton, client = clients(kserve)[protocol]
    result = client.infer(MODEL, [image_input(triton, [photos["coffee"]], True)], model_version="1.0",
                          headers=dict(kserve.auth))
    assert result.as_numpy("labels").shape == (1, 5)
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image_input(triton, [photos["coffee"]], True)], model_version="7",
                     headers=dict(kserve.auth))
    assert str(error.value.status()) in ("404", "StatusCode.NOT_FOUND") and "no version '7'" in str(error.value)


@pytest.mark.parametrize(("protocol", "binary"), [("http", False), ("http", True), ("grpc", True)])
def test_infer_one_and_several_images_matches_torchserve(kserve: KServe, server: TorchServe,
                                                         photos: dict[str, bytes], protocol: str, binary: bool) -> None:
    triton, client = clients(kserve)[protocol]
    names = ["rocket", "chelsea", "coffee"]
    params = {"method": "zero", "top_k": 3, "seed": 7, "options": json.dumps({"n_views": 4}),
              "labels": json.dumps(list(LABELS[:6]))}
    for batch in (names[:1], names):
        result = client.infer(MODEL, [image_input(triton, [photos[n] for n in batch], binary)],
                              parameters=params, headers=kserve.auth)
        labels, probs = result.as_numpy("labels"), result.as_numpy("probabilities")
        assert labels.shape == (len(batch), 3) and probs.shape == (len(batch), 3) and probs.dtype == np.float32
        for row, name in enumerate(batch):
            body = {"image": b64(photos[name]), "method": "zero", "top_k": 3, "seed": 7, "options": {"n_views": 4},
                    "labels": list(LABELS[:6])}
            reference = requests.post(server.predict_url, json=body, headers=server.auth, timeout=120)
            assert reference.status_code == 200, reference.text
            top = reference.json()["top_k"]
            assert as_text(labels[row]) == [t["label"] for t in top]
            assert np.allclose(probs[row], [t["score"] for t in top], atol=1e-4)


def oip_body(image: str, **parameters) -> dict:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]}
    return {**body, "parameters": parameters} if parameters else body


def _bad_oip_requests(photos: dict[str, bytes]) -> dict[str, bytes | dict]:
    good = b64(photos["coffee"])
    return {
        "not_an_image": oip_body(b64(b"plain text, not an image")),
        "truncated": oip_body(b64(photos["chelsea"][: len(photos["chelsea"]) // 2])),
        "bomb": oip_body(b64(_bomb_png())),
        "bad_base64": oip_body("%%%not base64%%%"),
        "unknown_method": oip_body(good, method="no-such-method"),
        "bad_option": oip_body(good, method="tpt", options='{"n_views": -3}'),
        "too_many_labels": oip_body(good, labels=json.dumps([f"class {i}" for i in range(MAX_LABELS + 1)])),
        "bad_top_k": oip_body(good, top_k=0),
        "malformed_json": b'{"inputs": [',
        "no_inputs": {"inputs": []},
        "wrong_input_name": {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": [good]}]},
        "shape_vs_count": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": [good, good]}]},
        "huge_shape": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2**62], "data": [good]}]},
        "unknown_parameter": oip_body(good, methd="tpt"),
        "unknown_tensor_parameter": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [good],
                                                 "parameters": {"colour": "rgb"}}]},
    }


@pytest.mark.parametrize("case", ["not_an_image", "truncated", "bomb", "bad_base64", "unknown_method", "bad_option",
                                  "too_many_labels", "bad_top_k", "malformed_json", "no_inputs", "wrong_input_name",
                                  "shape_vs_count", "huge_shape", "unknown_parameter", "unknown_tensor_parameter"])
def test_bad_request_gets_the_same_4xx_as_torchserve(kserve: KServe, server: TorchServe, photos: dict[str, bytes],
                                                     case: str) -> None:
    body = _bad_oip_requests(photos)[case]
    replies = []
    for url, auth in ((f"{kserve.url}/v2/models/{MODEL}/infer", kserve.auth),
                      (f"{server.url}/v2/models/{MODEL}/infer", server.auth)):
        kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
        reply = requests.post(url, headers={**auth, "Content-Type": "application/json"}, timeout=60, **kwargs)
        replies.append((reply.status_code, reply.json().get("code"), reply.json().get("error")))
    assert 400 <= replies[0][0] < 500 and replies[0][1] and replies[0][2]  # status, code, message
    assert replies[0] == replies[1], f"kserve {replies[0]} != torchserve {replies[1]}"


def test_bad_image_over_tritonclient(kserve: KServe) -> None:
    from tritonclient.utils import InferenceServerException

    for protocol, (triton, client) in clients(kserve).items():
        with pytest.raises(InferenceServerException) as error:
            client.infer(MODEL, [image_input(triton, [b"not an image"], binary=True)], headers=kserve.auth)
        status = str(error.value.status())
        assert status == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"), status
        assert "body is not a decodable image" in str(error.value)  # the message reaches the user


def test_concurrent_requests_share_a_batch_and_fail_alone(kserve: KServe, photos: dict[str, bytes]) -> None:
    """Requests arriving while a batch runs share the next batch (the batcher dispatches a lone
    request at once, so a slow request keeps the worker busy while the four arrive)."""
    bodies = [oip_body(b64(photos["chelsea"])), oip_body(b64(photos["coffee"])), oip_body(b64(b"not an image")),
              oip_body(b64(photos["rocket"]))]
    slow = oip_body(b64(photos["astronaut"]), method="tpt", options=json.dumps({"n_views": 64}))
    infer = f"{kserve.url}/v2/models/{MODEL}/infer"

    def post(body: dict) -> requests.Response:
        return requests.post(infer, json=body, headers=kserve.auth, timeout=120)

    def batches() -> int:
        return kserve.log.read_text(errors="replace").count("batch of ")

    for _attempt in range(5):  # the server decides the batches: retry until the four shared one
        seen = batches()
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            busy = pool.submit(post, slow)
            replies = list(pool.map(post, bodies))
            assert busy.result().status_code == 200, busy.result().text
        assert [r.status_code for r in replies] == [200, 200, 400, 200], [r.text for r in replies]
        for reply in (replies[0], replies[1], replies[3]):
            outputs = {o["name"]: o for o in reply.json()["outputs"]}
            assert set(outputs["labels"]["data"]) <= set(LABELS) and outputs["probabilities"]["shape"] == [1, 5]
        deadline = time.monotonic() + 5
        while batches() <= seen and time.monotonic() < deadline:
            time.sleep(0.1)  # poll: the log line is written as the batch starts, flushed per record
        if batches() > seen:
            return
    pytest.fail("no request was batched in 5 attempts")


def test_token_is_required_for_inference_not_for_probes(kserve: KServe, photos: dict[str, bytes]) -> None:
    from tritonclient.utils import InferenceServerException

    infer = f"{kserve.url}/v2/models/{MODEL}/infer"
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        refused = requests.post(infer, json=oip_body(b64(photos["coffee"])), headers=headers, timeout=30)
        assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
        assert requests.get(f"{kserve.url}/v2/models/{MODEL}", headers=headers, timeout=30).status_code == 401
    for probe in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready", "/metrics"):
        assert requests.get(kserve.url + probe, timeout=30).status_code == 200, probe
    triton, client = clients(kserve)["grpc"]
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image_input(triton, [photos["coffee"]], binary=True)])
    assert str(error.value.status()) == "StatusCode.UNAUTHENTICATED"


def test_v1_json_form_state_actions_and_metrics(kserve: KServe, photos: dict[str, bytes]) -> None:
    """The TorchServe JSON form and state actions through KServe's v1 route; tta metrics on /metrics."""
    predict = f"{kserve.url}/v1/models/{MODEL}:predict"

    def count(outcome: str) -> float:
        text = requests.get(f"{kserve.url}/metrics", timeout=30).text
        return sum(sample_values(text, "tta_requests_total", {"model": MODEL, "method": "tda", "outcome": outcome}))

    ok_before, bad_before = count("ok"), count("client_error")
    assert requests.post(predict, json={"action": "reset", "method": "tda"}, headers=kserve.admin, timeout=60).ok
    for name in ("chelsea", "rocket"):
        reply = requests.post(predict, json={"image": b64(photos[name]), "method": "tda"}, headers=kserve.auth,
                              timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["method"] == "tda" and reply.json()["label"] in LABELS
    state = requests.post(predict, json={"action": "state", "method": "tda"}, headers=kserve.auth, timeout=60).json()
    assert state["state"]["scope"] == "stream" and state["state"]["total"] >= 1
    raw = requests.post(predict, data=photos["coffee"], headers={**kserve.auth, "Content-Type": "image/jpeg"},
                        timeout=60)
    assert raw.status_code == 200 and raw.json()["method"] == "zeroshot"
    bad = requests.post(predict, json={"image": "AAAA", "method": "tda"}, headers=kserve.auth, timeout=60)
    assert bad.status_code == 400 and bad.json()["code"] == "not_an_image"
    assert count("ok") - ok_before == 2 and count("client_error") - bad_before == 1


@pytest.mark.extended  # its own server, held loading on purpose (~27 s): .ci/run runs it after the README command
def test_model_is_not_ready_until_loaded_and_warmed(tmp_path: Path) -> None:
    """Until `load` has finished, server ready and model ready are false (a 4xx with the OIP error
    body) and inference is refused with 503 + Retry-After (own process: see above)."""
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n", encoding="utf-8")
    script = textwrap.dedent("""
        import asyncio, sys
        from kserve.errors import ModelNotReady
        from tta.metrics import ServingMetrics
        from tta.serving.kserve_model import ClipTTAModel

        from fastapi import FastAPI
        from fastapi.testclient import TestClient
        from kserve.model_repository import ModelRepository
        from kserve.protocol.dataplane import DataPlane
        from tta.serving.kserve_model import install

        model = ClipTTAModel("probe", {"model": "tiny-random", "labels_file": sys.argv[1], "metrics_port": 0},
                             metrics=ServingMetrics())
        assert not model.ready and model.describe()["ready"] is False
        registry = ModelRepository()
        registry.update(model)
        app = FastAPI()
        install(app, DataPlane(model_registry=registry), model)
        client = TestClient(app)
        assert client.get("/v2/health/live").status_code == 200
        for path in ("/v2/health/ready", "/v2/models/probe/ready", "/v2/models/probe/versions/1.0/ready"):
            reply = client.get(path)
            assert reply.status_code == 400 and reply.json()["code"] == "not_ready" and reply.json()["error"], path
        busy = client.post("/v2/models/probe/infer", json={"inputs": []})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and busy.json()["error"], busy.text
        import json
        from fastapi.exceptions import RequestValidationError
        from starlette.requests import Request
        from tta.serving.kserve_model import framework_error

        scope = {"type": "http", "method": "POST", "path": "/v2/x", "headers": [], "query_string": b""}
        invalid = RequestValidationError([{"loc": ("body", "inputs"), "msg": "Field required", "type": "missing"}])
        answer = asyncio.run(framework_error(Request(scope), invalid))  # FastAPI's 422, in OIP's shape
        assert answer.status_code == 422
        assert json.loads(answer.body) == {"error": "body.inputs: Field required", "code": "invalid_request"}
        try:
            asyncio.run(model.predict({"image": "AAAA"}))
        except ModelNotReady:
            pass
        else:
            raise AssertionError("a model still loading answered")
        model.load()
        assert model.wait_loaded(timeout=120) and model.describe()["label_set_size"] == 2
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert client.get("/v2/models/probe/ready").status_code == 200
        broken = ClipTTAModel("broken", {"model": "tiny-random", "labels_file": sys.argv[1] + ".missing",
                                         "metrics_port": 0}, metrics=ServingMetrics())
        broken.load_now()  # a model that cannot load stays not ready and says why
        assert not broken.ready and broken.load_error is not None
        try:
            asyncio.run(broken.predict({"image": "AAAA"}))
        except ModelNotReady as exc:
            assert "failed" in str(exc)
        else:
            raise AssertionError("a model that failed to load answered")
        print("ready after load")
    """)
    run = subprocess.run([sys.executable, "-c", script, str(labels)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0 and "ready after load" in run.stdout, run.stderr[-3000:]


def test_oversized_body_is_refused_before_decoding(kserve: KServe) -> None:
    """Bodies over --max-request-bytes (16 MiB, TorchServe's max_request_size) get 413, with or without a length."""
    blob = b"0" * (16 * 1024 * 1024 + 1)
    infer = f"{kserve.url}/v2/models/{MODEL}/infer"
    for data in (blob, iter([blob[: len(blob) // 2], blob[len(blob) // 2:]])):  # Content-Length, then chunked
        reply = requests.post(infer, data=data, headers={**kserve.auth, "Content-Type": "application/json"},
                              timeout=60)
        assert reply.status_code == 413 and reply.json()["code"] == "request_too_large", reply.text


def test_labelled_answers_match_torchserve(kserve: KServe, server: TorchServe, photos: dict[str, bytes]) -> None:
    """Ids on every answer form (v1 JSON, OIP REST and gRPC), the label action counted on /metrics,
    and its refusals answered with TorchServe's status and error code."""
    predict = f"{kserve.url}/v1/models/{MODEL}:predict"

    def count() -> float:
        text = requests.get(f"{kserve.url}/metrics", timeout=30).text
        return sum(sample_values(text, "tta_labelled_answers_total", {"model": MODEL, "method": "tda",
                                                                       "served_correct": "true"}))

    answer = requests.post(predict, json={"image": b64(photos["chelsea"]), "method": "tda"}, headers=kserve.auth,
                           timeout=60).json()
    before = count()
    labelled = requests.post(predict, json={"action": "feedback", "id": answer["id"], "label": answer["label"]},
                             headers=kserve.admin, timeout=60)
    assert labelled.status_code == 200, labelled.text
    assert labelled.json()["feedback"]["served_correct"] is True and count() - before == 1
    for protocol, (triton, client) in clients(kserve).items():
        result = client.infer(MODEL, [image_input(triton, [photos["coffee"], photos["rocket"]], binary=True)],
                              headers=kserve.auth)
        response = result.get_response()
        ids = (response["parameters"]["answer_ids"] if protocol == "http"
               else response.parameters["answer_ids"].string_param).split(",")
        assert len(ids) == 2 and all(len(i) == 37 for i in ids), protocol
    ts_answer = post_json(server, {"image": b64(photos["chelsea"]), "method": "zeroshot"}).json()
    ks_answer = requests.post(predict, json={"image": b64(photos["chelsea"]), "method": "zeroshot"},
                              headers=kserve.auth, timeout=60).json()
    for make in (lambda a: {"action": "feedback", "id": a["id"], "label": "giraffe"},
                 lambda a: {"action": "feedback", "id": "no-such-answer", "label": "cat"},
                 lambda a: {"action": "feedback", "id": a["id"]},
                 lambda a: {"action": "feedback", "id": a["id"], "label": "cat", "method": "tda"}):
        ts = post_json(server, make(ts_answer))
        ks = requests.post(predict, json=make(ks_answer), headers=kserve.admin, timeout=60)
        assert 400 <= ks.status_code < 500 and (ks.status_code, ks.json()["code"]) == (ts.status_code, ts.json()["code"])
    ts_other = post_json(server, {"action": "feedback", "id": ks_answer["id"], "label": "cat"})  # answered by kserve
    assert (ts_other.status_code, ts_other.json()["code"]) == (404, "answer_elsewhere")
