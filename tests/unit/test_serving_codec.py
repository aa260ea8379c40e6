"""The shared request codec, on real encoded photos: every form decodes to the same image."""

from __future__ import annotations

import base64
import io
import json
import struct

import pytest
import torch

from tta.serving import codec


@pytest.fixture(scope="module")
def png(sample_images: dict[str, torch.Tensor]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(sample_images["coffee"].permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def test_raw_json_and_oip_forms_decode_to_the_same_image(png: bytes, sample_images) -> None:
    b64 = base64.b64encode(png).decode()
    raw = codec.decode(png)
    form = codec.decode(json.dumps({"image": b64, "method": "zero", "seed": 3}).encode())
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                     "parameters": {"binary_data_size": len(bytes_tensor(png, b64.encode()))}}],
                         "parameters": {"top_k": 2, "labels": '["a", "b"]'}}).encode()
    binary = codec.decode(header + bytes_tensor(png, b64.encode()), {codec.OIP_LENGTH_HEADER: str(len(header))})
    nested = codec.decode({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [[b64]]}]})
    assert isinstance(raw, codec.Predict) and isinstance(form, codec.Predict)
    assert isinstance(binary, codec.OipInfer) and isinstance(nested, codec.OipInfer)
    images = [raw.image, form.image, *(item.image for item in binary.items), nested.items[0].image]
    assert all(torch.equal(image, sample_images["coffee"]) for image in images)
    assert (form.method, form.seed) == ("zero", 3)
    assert binary.items[0].top_k == 2 and binary.items[0].labels == ["a", "b"]


@pytest.mark.parametrize(("body", "headers", "status", "code"), [
    (None, {}, 400, "empty_body"),
    (b"not an image", {}, 400, "not_an_image"),
    (b'{"image": ', {}, 400, "malformed_json"),
    ({"image": "AAAA", "extra": 1}, {}, 400, "unknown_field"),
    ({"image": "AAAA", "seed": True}, {}, 400, "not_an_image"),  # the image fails first
    ({"action": "explode"}, {}, 400, "unknown_action"),
    ({"action": "import", "method": "tda", "state": 3}, {"x-tta-admin-token": "t"}, 400, "bad_state"),
    ({"action": "import", "method": "tda", "state": 3}, {}, 401, "unauthorized"),  # checked before decoding
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, {}, 400, "bad_input"),
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, {}, 400, "bad_datatype"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}],
      "outputs": [{"name": "nope"}]}, {}, 400, "bad_output"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["AAAA"]}]}, {}, 400, "bad_shape"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": ["AAAA"]}]}, {}, 400, "bad_shape"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "data": ["AAAA"]}]}, {}, 400, "bad_shape"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}],
      "parameters": {"top-k": 3}}, {}, 400, "unknown_parameter"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AAAA"], "parameters": {"x": 1}}]},
     {}, 400, "unknown_parameter"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}], "extra": 1}, {}, 400,
     "unknown_field"),
    (b'{"inputs": []}' + bytes_tensor(b"x")[:3], {codec.OIP_LENGTH_HEADER: "14"}, 400, "bad_json"),
    (b'{"inputs": [{"datatype": "BYTES", "parameters": {"binary_data_size": 9}}]}',  # 9 bytes past the end
     {codec.OIP_LENGTH_HEADER: "74"}, 400, "bad_json"),
])
def test_bad_requests_become_failures_with_their_status(body, headers, status: int, code: str) -> None:
    failure = codec.decode(body, headers)
    assert isinstance(failure, codec.Failure), failure
    assert (failure.status, failure.code) == (status, code) and failure.message


def test_core_errors_map_to_status_codes() -> None:
    from tta.errors import BadRequest, ModelUnavailable, Unavailable

    assert codec.failure(BadRequest("big", code="image_too_large")).status == 413
    assert codec.failure(BadRequest("no", code="unknown_method")).status == 400
    assert codec.failure(Unavailable("busy")).status == 503 and codec.failure(ModelUnavailable("x")).status == 503
    internal = codec.failure(RuntimeError("secret detail"))
    assert internal.status == 500 and "secret" not in internal.message


def test_exported_state_round_trips_bit_exact() -> None:
    state = {"keys": torch.randn(3, 4), "counts": torch.arange(5), "meta": [1, "a"]}
    back = codec.decode_state(json.loads(json.dumps(codec.encode_state(state))))
    assert torch.equal(back["keys"], state["keys"]) and torch.equal(back["counts"], state["counts"])
    assert back["meta"] == [1, "a"]


def test_unknown_oip_parameters_are_refused_but_tritons_reserved_ones_ignored(png: bytes) -> None:
    """A typo is a 400 (never a silent default); `triton_*` (perf_analyzer adds one) is ignored."""
    b64 = base64.b64encode(png).decode()
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}]}
    typo = codec.decode({**body, "parameters": {"topk": 3}})
    assert isinstance(typo, codec.Failure) and typo.code == "unknown_parameter" and "topk" in typo.message
    triton = codec.decode({**body, "parameters": {"triton_enable_empty_final_response": False, "top_k": 2}})
    assert isinstance(triton, codec.OipInfer) and triton.items[0].top_k == 2
