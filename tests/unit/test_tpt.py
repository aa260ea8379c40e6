"""TPT: confident-view selection, the entropy step, and the exact episodic reset."""

from __future__ import annotations

import torch

from tta.engine import Engine
from tta.features import encode_images
from tta.methods.tpt import TPTOptions, tune_prompt
from tta.prompts import PromptLearner
from tta.scoring import entropy, marginal_entropy
from tta.text import LabelSet
from tta.views import ViewSpec, make_views

LABELS = ["cat", "dog", "car", "rocket", "coffee cup", "person"]


def _features(clip, image, n_views=64, seed=0):
    views = make_views(image, clip.image_size, clip.mean, clip.std, ViewSpec(n_views=n_views),
                       torch.Generator().manual_seed(seed), device=clip.device)
    return encode_images(clip, views)


def test_tpt_defaults_follow_the_paper():
    opts = TPTOptions()
    assert (opts.n_views, opts.selection_p, opts.lr, opts.steps, opts.n_ctx) == (64, 0.1, 5e-3, 1, 4)
    assert opts.ctx_init == "a photo of a"


def test_initial_prompt_reproduces_the_zero_shot_classifier(tiny_clip):
    from tta.text import class_embeddings

    learner = PromptLearner(tiny_clip, LABELS)
    with torch.no_grad():
        prompted = learner.text_features()
    zero_shot = class_embeddings(tiny_clip, LabelSet.create(LABELS))
    assert torch.allclose(prompted, zero_shot, atol=1e-5)


def test_selected_views_are_the_lowest_entropy_tenth(tiny_clip, sample_images):
    feats = _features(tiny_clip, sample_images["chelsea"])
    learner = PromptLearner(tiny_clip, LABELS)
    with learner.episode(), torch.enable_grad():
        out = tune_prompt(learner, feats, tiny_clip.logit_scale, 0.1, 5e-3, 1, 0.01)
    selected = out["selected"]
    assert selected.numel() == 6
    ent = entropy(out["initial_logits"])
    others = torch.ones(64, dtype=torch.bool)
    others[selected] = False
    assert ent[selected].max() <= ent[others].min()


def test_one_step_lowers_the_marginal_entropy_of_the_selected_views(tiny_clip, sample_images):
    feats = _features(tiny_clip, sample_images["astronaut"])
    learner = PromptLearner(tiny_clip, LABELS)
    scale = tiny_clip.logit_scale
    with learner.episode(), torch.enable_grad():
        out = tune_prompt(learner, feats, scale, 0.1, 5e-3, 1, 0.01)
        with torch.no_grad():
            after = marginal_entropy(scale * feats[out["selected"]] @ learner.text_features().t())
    before = marginal_entropy(out["initial_logits"][out["selected"]])
    assert torch.allclose(out["losses"][0], before, atol=1e-5)
    assert after < before


def test_prompt_is_restored_bit_exact_and_answers_do_not_leak(tiny_clip, sample_images):
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    options = {"n_views": 16}
    first = engine.predict(sample_images["chelsea"], method="tpt", options=options)
    learner = engine.method("tpt").prompts.get(engine.method("tpt"), engine.labels, 4, "a photo of a")
    initial = learner.ctx_init.clone()
    assert torch.equal(learner.ctx.detach(), initial)
    for name in ("astronaut", "coffee", "rocket"):
        engine.predict(sample_images[name], method="tpt", options={**options, "lr": 0.05})
        assert torch.equal(learner.ctx.detach(), initial)
    again = engine.predict(sample_images["chelsea"], method="tpt", options=options)
    assert torch.equal(first.probs, again.probs)
    assert first.label == again.label


def test_adaptation_changes_probabilities(tiny_clip, sample_images):
    engine = Engine(tiny_clip, LabelSet.create(LABELS))
    tpt = engine.predict(sample_images["coffee"], method="tpt", options={"n_views": 16, "lr": 0.05})
    still = engine.predict(sample_images["coffee"], method="tpt", options={"n_views": 16, "steps": 0})
    assert not torch.allclose(tpt.probs, still.probs)
    assert torch.allclose(still.probs, still.zeroshot_probs, atol=1e-5)
