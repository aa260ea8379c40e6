"""Label sets: sources, validation, templates, cached embeddings."""

from __future__ import annotations

import json

import pytest
import torch

from tta.errors import BadRequest
from tta.text import LabelSet, TextFeatureCache, class_embeddings, encode_prompts, load_labels


def test_labels_from_list_string_and_files(tmp_path):
    (tmp_path / "a.txt").write_text("cat\n dog \n\n# comment\ncar\n")
    (tmp_path / "b.json").write_text(json.dumps(["cat", "dog"]))
    (tmp_path / "c.json").write_text(json.dumps({"1": ["n1", "dog"], "0": ["n0", "cat"]}))
    assert load_labels(tmp_path / "a.txt") == ("cat", "dog", "car")
    assert load_labels(str(tmp_path / "b.json")) == ("cat", "dog")
    assert load_labels(tmp_path / "c.json") == ("cat", "dog")
    assert load_labels("cat,dog") == ("cat", "dog")


@pytest.mark.parametrize("bad", [[], ["", " "], ["a", "a"], "x"])
def test_bad_label_lists_are_client_errors(bad):
    with pytest.raises(BadRequest):
        LabelSet.create(bad if bad != "x" else 5)  # type: ignore[arg-type]


def test_ensemble_embedding_is_normalised_mean_of_template_features(tiny_clip):
    labels = LabelSet.create(["cat", "dog"], templates=["a photo of a {}.", "a drawing of a {}."])
    embeddings = class_embeddings(tiny_clip, labels)
    cat = encode_prompts(tiny_clip, ["a photo of a cat.", "a drawing of a cat."]).mean(0)
    assert torch.allclose(embeddings[0], cat / cat.norm(), atol=1e-6)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_imagenet_template_ensemble_has_80_templates():
    assert len(LabelSet.create(["cat"], templates="imagenet").templates) == 80


def test_text_feature_cache_reuses_per_label_set(tiny_clip):
    cache = TextFeatureCache(max_entries=2)
    a = LabelSet.create(["cat", "dog"])
    first = cache.get(tiny_clip, a)
    assert cache.get(tiny_clip, LabelSet.create(["cat", "dog"])) is first
    cache.get(tiny_clip, LabelSet.create(["x"]))
    cache.get(tiny_clip, LabelSet.create(["y"]))
    assert len(cache) == 2 and cache.hits == 1


def test_truncated_prompt_encoding_equals_open_clips_full_length_encode_text(tiny_clip):
    prompts = ["a photo of a cat.", "a photo of a very small and rather fluffy dog on a sofa.", "x."]
    full = tiny_clip.model.encode_text(tiny_clip.tokenizer(prompts))
    full = full / full.norm(dim=-1, keepdim=True)
    assert torch.allclose(encode_prompts(tiny_clip, prompts), full, atol=1e-5)
