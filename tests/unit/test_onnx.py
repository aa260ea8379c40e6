"""ONNX Runtime image encoder: export, parity on real photos, and the measured load-time choice."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tta.engine import Engine
from tta.features import encode_images
from tta.onnx_encoder import OnnxImageEncoder, check_parity, enable_if_faster, export_image_encoder
from tta.text import LabelSet
from tta.views import ViewSpec, make_views

LABELS = ("cat", "astronaut", "rocket", "coffee", "dog")


@pytest.fixture(scope="module")
def onnx_path(tiny_clip, tmp_path_factory):
    return export_image_encoder(tiny_clip, tmp_path_factory.mktemp("onnx") / "image_encoder.onnx")


@pytest.fixture()
def clip(tiny_clip):
    """A shallow copy: attaching an encoder must not leak into the session-wide fixture."""
    return dataclasses.replace(tiny_clip, info={}, image_encoder=None)


def _photo_views(clip, sample_images) -> torch.Tensor:
    spec = ViewSpec(n_views=6)
    return torch.cat([make_views(image, clip.image_size, clip.mean, clip.std, spec,
                                 generator=torch.Generator().manual_seed(i))
                      for i, image in enumerate(sample_images.values())])


def test_export_is_one_file_with_a_dynamic_batch(onnx_path, clip):
    assert onnx_path.is_file() and not onnx_path.with_name(onnx_path.name + ".data").exists()
    encoder = OnnxImageEncoder(onnx_path)
    for batch in (1, 5):
        assert encoder(torch.randn(batch, 3, clip.image_size, clip.image_size)).shape == (batch, clip.embed_dim)


def test_onnx_features_match_eager_on_real_photos(onnx_path, clip, sample_images):
    views = _photo_views(clip, sample_images)
    eager = encode_images(clip, views)
    clip.image_encoder = OnnxImageEncoder(onnx_path)
    onnx = encode_images(clip, views)
    cosine = F.cosine_similarity(eager, onnx, dim=-1)
    assert cosine.min() > 0.9999, cosine.min()
    assert check_parity(clip, clip.image_encoder, views) > 0.9999


def test_forward_only_methods_use_the_attached_encoder(onnx_path, clip, sample_images):
    labels = LabelSet.create(LABELS)
    eager = Engine(clip, labels)
    expected = {(m, n): eager.predict(img, method=m, options=opts, seed=0)
                for m, opts in (("zeroshot", None), ("zero", {"n_views": 8}))
                for n, img in sample_images.items()}
    encoder = OnnxImageEncoder(onnx_path)
    calls = []
    clip.image_encoder = lambda x: calls.append(x.shape[0]) or encoder(x)
    fast = Engine(clip, labels)
    for (method, name), want in expected.items():
        got = fast.predict(sample_images[name], method=method,
                           options={"n_views": 8} if method == "zero" else None, seed=0)
        assert got.label == want.label
        torch.testing.assert_close(got.probs, want.probs, atol=1e-3, rtol=0)
    assert calls.count(1) == len(sample_images) and calls.count(8) == len(sample_images)


def test_load_time_choice_follows_the_measurement(onnx_path, clip, monkeypatch):
    monkeypatch.delenv("TTA_ONNX", raising=False)
    choice = enable_if_faster(clip, onnx_path, mode="auto", batch=2, repeats=2)
    assert choice is not None and choice.eager_s > 0 and choice.onnx_s > 0
    assert choice.chosen == ("onnx" if choice.onnx_s < choice.eager_s else "eager")
    assert (clip.image_encoder is not None) == (choice.chosen == "onnx")
    assert clip.info["image_encoder"]["chosen"] == choice.chosen


def test_forced_modes_and_missing_file(onnx_path, clip, tmp_path, monkeypatch):
    monkeypatch.delenv("TTA_ONNX", raising=False)
    assert enable_if_faster(clip, onnx_path, mode="on").chosen == "onnx"
    assert isinstance(clip.image_encoder, OnnxImageEncoder)
    assert enable_if_faster(clip, onnx_path, mode="off") is None and clip.image_encoder is None
    assert enable_if_faster(clip, tmp_path / "missing.onnx") is None and clip.image_encoder is None
    monkeypatch.setenv("TTA_ONNX", "off")
    assert enable_if_faster(clip, onnx_path, mode="on") is None and clip.image_encoder is None


def test_an_export_of_other_weights_is_refused(onnx_path, clip):
    other = dataclasses.replace(clip, model=copy.deepcopy(clip.model))
    with torch.no_grad():
        for p in other.model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert enable_if_faster(other, onnx_path, mode="on") is None
    assert other.image_encoder is None


def test_archive_carries_the_exported_encoder(tmp_path, monkeypatch):
    import tempfile
    import zipfile

    import yaml

    from tta.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the archiver stages under $TMPDIR/<name>
    assert main(["archive", "--model", "tiny-random", "--name", "onnxtest", "--out", str(tmp_path / "store"),
                 "--onnx", "--no-warmup", "-f"]) == 0
    with zipfile.ZipFile(tmp_path / "store" / "onnxtest.mar") as archive:
        names = archive.namelist()
        config = yaml.safe_load(archive.read("model-config.yaml"))
        assert "image_encoder.onnx" in names
        assert config["tta"]["image_encoder_onnx"] == "image_encoder.onnx"
        encoder_bytes = archive.read("image_encoder.onnx")
    path = tmp_path / "from_archive.onnx"
    path.write_bytes(encoder_bytes)
    assert OnnxImageEncoder(path)(torch.zeros(1, 3, 64, 64)).shape == (1, 64)
