"""Model loading from every source kind, and the offline error message."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tta.errors import ModelUnavailable
from tta.models import load_model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_random_is_identical_every_time_and_frozen():
    first, second = load_model("tiny-random"), load_model("tiny-random")
    assert _same_weights(first.model, second.model)
    assert not any(p.requires_grad for p in first.model.parameters())
    assert not first.model.training
    assert 1_000_000 < sum(p.numel() for p in first.model.parameters()) < 10_000_000


def test_tiny_random_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny-random")
    assert torch.equal(torch.rand(3), expected)


def test_arch_random_builds_the_real_architecture():
    clip = load_model("ViT-B-32-random")
    assert clip.image_size == 224
    assert clip.model.visual.conv1.kernel_size == (32, 32)
    assert 100_000_000 < sum(p.numel() for p in clip.model.parameters()) < 200_000_000


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_loads_the_written_weights(tmp_path, suffix):
    source = load_model("tiny-random")
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in source.model.state_dict().items()}
    path = tmp_path / f"clip{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_model(f"TTA-Tiny:{path}")
    assert all(torch.equal(loaded.model.state_dict()[k], state[k]) for k in state)
    assert not _same_weights(loaded.model, source.model)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_model(f"TTA-Tiny:{tmp_path}/absent.pt")


def test_hf_hub_id_loads_from_the_local_hub_cache(tmp_path, monkeypatch):
    """A hub-style cache entry (what a previous download leaves) loads with no network."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    source = load_model("tiny-random")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tta-test--tiny-clip"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    config = json.loads((__import__("tta.models", fromlist=["x"]).MODEL_CONFIG_DIR / "TTA-Tiny.json").read_text())
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    state = {k: (v * 1.5 if v.is_floating_point() else v).contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(snapshot / "open_clip_model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    loaded = load_model("hf-hub:tta-test/tiny-clip")
    assert all(torch.equal(loaded.model.state_dict()[k], state[k]) for k in state)


def test_hf_hub_id_without_cached_weights_fails_instead_of_loading_random(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailable, match="hf-hub:tta-test/absent"):
        load_model("hf-hub:tta-test/absent")


def test_pretrained_tag_offline_fails_fast_with_a_helpful_message(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ModelUnavailable) as info:
        load_model("ViT-B-32:laion2b_s34b_b79k")
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "ViT-B-32:laion2b_s34b_b79k" in message
    assert str(tmp_path) in message  # where it looked
    assert "tiny-random" in message and "local checkpoint" in message
    assert elapsed < 30


@pytest.mark.parametrize("spec, fragment", [
    ("", "empty model name"),
    ("ViT-B-16", "names no weights"),
    ("NoSuchArch:openai", "unknown open_clip architecture"),
    ("ViT-B-16:no_such_tag", "unknown pretrained tag"),
])
def test_bad_specs_are_explained(spec, fragment):
    with pytest.raises(ModelUnavailable, match=fragment):
        load_model(spec)
