"""`tta fetch-weights`: weights into a model cache once, at the pinned revision, with a checksum manifest.

Offline: the "hub" is a local folder in huggingface_hub's cache layout
(models--org--name/{blobs,snapshots/<commit>,refs/main}), content-addressed the way the hub names
blobs (LFS files by SHA-256, small files by git's blob SHA-1). The cache the command fills is then
loaded by `load_model` with HF_HUB_OFFLINE=1, as the pods do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from tta.cli import main
from tta.commands.fetch_weights import manifest_path
from tta.models import HUB_REVISIONS, MODEL_CONFIG_DIR, hub_weights, load_model

REVISION = "0123456789abcdef0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef0123456789abcdef"


def put(repo: Path, commit: str, name: str, data: bytes, lfs: bool) -> Path:
    """One file in a hub-cache repo folder, named by its content address like the hub does."""
    if lfs:
        blob = hashlib.sha256(data).hexdigest()
    else:
        blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data, usedforsecurity=False).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / blob).write_bytes(data)
    link = repo / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return link


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A hub cache holding an open_clip model repo (tiny CLIP with recognisable weights)."""
    from safetensors.torch import save

    root = tmp_path_factory.mktemp("hub")
    repo = root / "models--tta-test--tiny-clip"
    config = json.loads((MODEL_CONFIG_DIR / "TTA-Tiny.json").read_text())
    put(repo, REVISION, "open_clip_config.json", json.dumps({"model_cfg": config, "preprocess_cfg": {}}).encode(),
        lfs=False)
    source = load_model("tiny-random")
    state = {k: (v * 1.5 if v.is_floating_point() else v).contiguous() for k, v in source.model.state_dict().items()}
    put(repo, REVISION, "open_clip_model.safetensors", save(state), lfs=True)
    return root, state


def fetch(*args: str) -> tuple[int, dict | None]:
    code = main(["fetch-weights", *args])
    return code, None


def test_fetch_from_a_hub_cache_then_pods_load_it_offline(hub, tmp_path, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    source, state = hub
    cache = tmp_path / "weights"
    assert main(["fetch-weights", "hf-hub:tta-test/tiny-clip", "--to", str(cache), "--from-cache", str(source),
                 "--revision", REVISION]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["status"] == "fetched" and report["revision"] == REVISION

    manifest = json.loads(manifest_path(cache, "hf-hub:tta-test/tiny-clip").read_text())
    assert manifest["revision"] == REVISION and manifest["repo_id"] == "tta-test/tiny-clip"
    for entry in manifest["files"]:
        file = cache / entry["path"]
        assert file.stat().st_size == entry["bytes"]
        assert hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"]
    assert {e["name"] for e in manifest["files"]} == {"open_clip_config.json", "open_clip_model.safetensors"}

    # a pod: the cache mounted as HF_HUB_CACHE, offline, the revision pinned
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TTA_HUB_REVISION", REVISION)
    (cache / "models--tta-test--tiny-clip" / "refs" / "main").write_text(OTHER)  # main moved on: irrelevant
    loaded = load_model("hf-hub:tta-test/tiny-clip")
    assert all(torch.equal(loaded.model.state_dict()[k], state[k]) for k in state)
    assert loaded.info["revision"] == REVISION

    # the Job again: verified, nothing copied
    assert main(["fetch-weights", "hf-hub:tta-test/tiny-clip", "--to", str(cache), "--revision", REVISION]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["status"] == "already present"
    assert main(["fetch-weights", "hf-hub:tta-test/tiny-clip", "--to", str(cache), "--check", "--verify",
                 "--revision", REVISION]) == 0


def test_check_fails_fast_with_a_clear_message_when_the_cache_lacks_the_model(tmp_path, capsys) -> None:
    assert main(["fetch-weights", "ViT-B-16:openai", "--to", str(tmp_path), "--check"]) == 1
    message = capsys.readouterr().err
    assert "lacks ViT-B-16:openai" in message and "clip-tta-fetch-weights" in message
    assert f"tta fetch-weights ViT-B-16:openai --to {tmp_path}" in message


def test_a_corrupt_or_truncated_cache_is_refused(hub, tmp_path, capsys) -> None:
    source, _ = hub
    cache = tmp_path / "weights"
    args = ["hf-hub:tta-test/tiny-clip", "--to", str(cache), "--revision", REVISION]
    assert main(["fetch-weights", *args, "--from-cache", str(source)]) == 0
    blob = (cache / "models--tta-test--tiny-clip" / "snapshots" / REVISION / "open_clip_model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    blob.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["fetch-weights", *args, "--check"]) == 0  # sizes only: the pods' fast check
    assert main(["fetch-weights", *args, "--check", "--verify"]) == 1
    assert "does not match its manifest" in capsys.readouterr().err
    assert main(["fetch-weights", *args, "--from-cache", str(source)]) == 1  # re-fetch sees the content address
    assert "corrupt" in capsys.readouterr().err
    blob.write_bytes(bytes(data[:100]))
    assert main(["fetch-weights", *args, "--check"]) == 1
    assert "incomplete" in capsys.readouterr().err


def test_the_pinned_commit_is_what_is_fetched(tmp_path, capsys) -> None:
    """ViT-B-16:openai is read at its pinned commit; a cache holding only another commit has not got it."""
    weights = hub_weights("ViT-B-16:openai")
    assert weights is not None and weights.repo_id == "timm/vit_base_patch16_clip_224.openai"
    pinned = HUB_REVISIONS[weights.repo_id]
    assert weights.revision == pinned and len(pinned) == 40 and int(pinned, 16) >= 0
    source = tmp_path / "hub"
    repo = source / "models--timm--vit_base_patch16_clip_224.openai"
    put(repo, OTHER, "open_clip_model.safetensors", b"weights at another commit", lfs=True)
    cache = tmp_path / "weights"
    assert main(["fetch-weights", "ViT-B-16:openai", "--to", str(cache), "--from-cache", str(source)]) == 1
    assert pinned in capsys.readouterr().err
    put(repo, pinned, "open_clip_pytorch_model.bin", b"weights at the pinned commit", lfs=True)
    assert main(["fetch-weights", "ViT-B-16:openai", "--to", str(cache), "--from-cache", str(source)]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["revision"] == pinned
    manifest = json.loads(manifest_path(cache, "ViT-B-16:openai").read_text())
    assert [e["name"] for e in manifest["files"]] == ["open_clip_pytorch_model.bin"]  # the safetensors twin is absent


def test_models_without_hub_weights_need_nothing(tmp_path, capsys) -> None:
    assert main(["fetch-weights", "tiny-random", "--to", str(tmp_path)]) == 0
    assert "nothing to fetch" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


def test_a_pinned_file_load_builds_what_the_tag_builds() -> None:
    """Loading ViT-B-16:openai from a file at the pinned commit keeps the tag's QuickGELU and preprocessing."""
    import open_clip

    from tta.models import tag_build_kwargs

    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    kwargs = tag_build_kwargs("ViT-B-16", "openai")
    assert kwargs["force_quick_gelu"] is True and cfg["quick_gelu"] is True
    assert kwargs["image_mean"] == cfg["mean"] and kwargs["image_std"] == cfg["std"]
    assert kwargs["image_interpolation"] == cfg["interpolation"]
