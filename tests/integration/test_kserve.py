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
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.integration.conftest import LABELS, MAX_LABELS, MAX_PIXELS, MODEL
from tests.integration.kserve_server import KServe
from tests.integration.test_server import _bomb_png, post_json
from tests.integration.torchserve import TorchServe
from tta.metrics import sample_values

# Only look for kserve: importing it here would register its OIP protos in this process's protobuf
# pool, where tritonclient.grpc registers the same names (the clients must live apart from it).
pytestmark = [pytest.mark.server, pytest.mark.skipif(importlib.util.find_spec("kserve") is None,
                                                     reason="the kserve extra is not installed (uv sync --extra kserve)")]

METHOD_DEFAULTS = '{"tpt": {"n_views": 8}, "zero": {"n_views": 8}}'
SERVE_ARGS = ("--method-defaults", METHOD_DEFAULTS, "--max-labels", str(MAX_LABELS), "--max-image-pixels",
              str(MAX_PIXELS), "--batch-size", "4", "--max-batch-delay", "200")


@pytest.fixture(scope="module")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServe]:
    workdir = tmp_path_factory.mktemp("kserve")
    labels = workdir / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    with KServe(workdir, MODEL).running(labels, *SERVE_ARGS) as server:
        yield server


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


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_health_and_model_metadata(kserve: KServe, protocol: str) -> None:
    triton, client = clients(kserve)[protocol]
    headers = kserve.auth
    assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)
    assert client.is_model_ready(MODEL, headers=headers)
    if protocol == "http":
        assert not client.is_model_ready("no-such-model", headers=headers)
    else:  # KServe's gRPC answers NOT_FOUND for a model it does not serve
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="NOT_FOUND"):
            client.is_model_ready("no-such-model", headers=headers)
    meta = client.get_model_metadata(MODEL, headers=headers)
    if protocol == "grpc":
        from google.protobuf.json_format import MessageToDict

        meta = MessageToDict(meta, preserving_proto_field_name=True)
    tensors = {t["name"]: (t["datatype"], [int(s) for s in t["shape"]]) for t in meta["inputs"] + meta["outputs"]}
    assert tensors == {"image": ("BYTES", [-1]), "labels": ("BYTES", [-1, -1]), "probabilities": ("FP32", [-1, -1])}
    if protocol == "http":  # OIP metadata has no field for these; REST carries them as parameters
        params = meta["parameters"]
        assert params["label_set_size"] == len(LABELS) and params["default_method"] == "zeroshot"
        assert {"zeroshot", "tpt", "zero", "tda", "gda"} <= set(params["methods"])
        assert params["max_labels"] == MAX_LABELS and meta["versions"] == ["1.0"]


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
    }


@pytest.mark.parametrize("case", ["not_an_image", "truncated", "bomb", "bad_base64", "unknown_method", "bad_option",
                                  "too_many_labels", "bad_top_k", "malformed_json", "no_inputs"])
def test_bad_request_gets_the_same_4xx_as_torchserve(kserve: KServe, server: TorchServe, photos: dict[str, bytes],
                                                     case: str) -> None:
    body = _bad_oip_requests(photos)[case]
    replies = []
    for url, auth in ((f"{kserve.url}/v2/models/{MODEL}/infer", kserve.auth),
                      (f"{server.url}/v2/models/{MODEL}/infer", server.auth)):
        kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
        reply = requests.post(url, headers={**auth, "Content-Type": "application/json"}, timeout=60, **kwargs)
        replies.append((reply.status_code, reply.json().get("error")))
    assert 400 <= replies[0][0] < 500 and replies[0][1]
    assert replies[0] == replies[1], f"kserve {replies[0]} != torchserve {replies[1]}"


def test_bad_image_over_tritonclient(kserve: KServe) -> None:
    from tritonclient.utils import InferenceServerException

    for protocol, (triton, client) in clients(kserve).items():
        with pytest.raises(InferenceServerException) as error:
            client.infer(MODEL, [image_input(triton, [b"not an image"], binary=True)], headers=kserve.auth)
        status = str(error.value.status())
        assert status == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"), status
        assert "not_an_image" in str(error.value)


def test_concurrent_requests_share_a_batch_and_fail_alone(kserve: KServe, photos: dict[str, bytes]) -> None:
    bodies = [oip_body(b64(photos["chelsea"])), oip_body(b64(photos["coffee"])), oip_body(b64(b"not an image")),
              oip_body(b64(photos["rocket"]))]
    barrier = threading.Barrier(len(bodies))
    seen = kserve.log.read_text(errors="replace").count("batch of ")

    def send(body: dict) -> requests.Response:
        barrier.wait(timeout=30)  # all four reach the 200 ms batch window together
        return requests.post(f"{kserve.url}/v2/models/{MODEL}/infer", json=body, headers=kserve.auth, timeout=120)

    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(send, bodies))
    assert [r.status_code for r in replies] == [200, 200, 400, 200], [r.text for r in replies]
    for reply in (replies[0], replies[1], replies[3]):
        outputs = {o["name"]: o for o in reply.json()["outputs"]}
        assert set(outputs["labels"]["data"]) <= set(LABELS) and outputs["probabilities"]["shape"] == [1, 5]
    deadline = time.monotonic() + 15
    while kserve.log.read_text(errors="replace").count("batch of ") <= seen and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kserve.log.read_text(errors="replace").count("batch of ") > seen, "no request was batched"


def test_token_is_required_for_inference_not_for_probes(kserve: KServe, photos: dict[str, bytes]) -> None:
    from tritonclient.utils import InferenceServerException

    infer = f"{kserve.url}/v2/models/{MODEL}/infer"
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        refused = requests.post(infer, json=oip_body(b64(photos["coffee"])), headers=headers, timeout=30)
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
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
    assert bad.status_code == 400 and bad.json()["error"] == "not_an_image"
    assert count("ok") - ok_before == 2 and count("client_error") - bad_before == 1


def test_model_is_not_ready_until_loaded_and_warmed(tmp_path: Path) -> None:
    """The model refuses inference (503 / UNAVAILABLE) until `load` has finished (own process: see above)."""
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n", encoding="utf-8")
    script = textwrap.dedent("""
        import asyncio, sys
        from kserve.errors import ModelNotReady
        from tta.metrics import ServingMetrics
        from tta.serving.kserve_model import ClipTTAModel

        model = ClipTTAModel("probe", {"model": "tiny-random", "labels_file": sys.argv[1], "metrics_port": 0},
                             metrics=ServingMetrics())
        assert not model.ready and model.describe()["ready"] is False
        try:
            asyncio.run(model.predict({"image": "AAAA"}))
        except ModelNotReady:
            pass
        else:
            raise AssertionError("a model still loading answered")
        model.load()
        assert model.wait_loaded(timeout=120) and model.describe()["label_set_size"] == 2
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
        assert reply.status_code == 413 and reply.json()["error"] == "request_too_large", reply.text


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
        assert 400 <= ks.status_code < 500 and (ks.status_code, ks.json()["error"]) == (ts.status_code, ts.json()["error"])
    ts_other = post_json(server, {"action": "feedback", "id": ks_answer["id"], "label": "cat"})  # answered by kserve
    assert (ts_other.status_code, ts_other.json()["error"]) == (404, "answer_elsewhere")
