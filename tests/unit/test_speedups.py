"""Each exact speed-up of TPT gives the result of the straightforward computation.

The reference is bench/reference_tpt.py (full 77-token text encoder every pass, image features
recomputed per pass, fp32, no chunking); "same" means the same top-1 and probabilities within
1e-4 in fp32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tta.features import encode_images
from tta.methods.base import MethodInput
from tta.methods.tpt import (
    TPT,
    PromptCache,
    TPTOptions,
    autocast_dtype,
    backward_in_chunks,
    resolve_chunk,
    tune_prompt,
)
from tta.prompts import PromptLearner
from tta.text import LabelSet, TextFeatureCache
from tta.timing import StageTimer
from tta.views import ViewSpec, make_views

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.reference_tpt import ReferencePrompt, reference_tpt  # noqa: E402

# prompt lengths from 7 to 20+ tokens, so length buckets and truncation both matter
CLASSES = (
    "cat", "dog", "rocket", "coffee mug", "astronaut", "great white shark", "tabby cat",
    "hen-of-the-woods mushroom", "German Shorthaired Pointer", "space shuttle", "espresso",
    "red wine", "teapot", "the quick brown fox jumps over the lazy dog near a river bank",
)


def _views(clip, image: torch.Tensor, n_views: int, seed: int) -> torch.Tensor:
    return make_views(image, clip.image_size, clip.mean, clip.std, ViewSpec(n_views=n_views),
                      generator=torch.Generator().manual_seed(seed))


def _request(clip, image: torch.Tensor, labels: LabelSet, options: TPTOptions, seed: int) -> MethodInput:
    text = TextFeatureCache().get(clip, labels)
    return MethodInput(image=image, labels=labels, text_features=text, options=options,
                       generator=torch.Generator().manual_seed(seed), timer=StageTimer())


def _full_context_features(clip, ctx: torch.Tensor | None, classes=CLASSES) -> torch.Tensor:
    ref = ReferencePrompt(clip, classes)
    if ctx is not None:
        with torch.no_grad():
            ref.ctx.copy_(ctx)
    return ref.text_features()


def test_truncated_shared_prefix_text_features_match_full_context(tiny_clip):
    learner = PromptLearner(tiny_clip, CLASSES)
    assert learner.fast and learner.length < 77
    ctx = learner.ctx_init + 0.05 * torch.randn(learner.ctx_init.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = learner.text_features(ctx)
        full = _full_context_features(tiny_clip, ctx)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)
    # a subset in any order gives the same rows
    picked = [13, 0, 7]
    torch.testing.assert_close(learner.text_features(ctx, classes=picked).detach(), full[picked], atol=1e-5, rtol=0)


def test_fast_text_encoder_gradient_matches_full_context(tiny_clip):
    learner = PromptLearner(tiny_clip, CLASSES)
    ref = ReferencePrompt(tiny_clip, CLASSES)
    weights = torch.randn(len(CLASSES), tiny_clip.embed_dim, generator=torch.Generator().manual_seed(1))
    (learner.text_features() * weights).sum().backward()
    (ref.text_features() * weights).sum().backward()
    torch.testing.assert_close(learner.ctx.grad, ref.ctx.grad, atol=1e-5, rtol=1e-4)
    learner.reset()


def test_generic_tower_path_matches_fast_path(tiny_clip):
    fast = PromptLearner(tiny_clip, CLASSES)
    plain = PromptLearner(tiny_clip, CLASSES, shared_prefix=False)
    assert fast.fast and not plain.fast
    with torch.no_grad():
        torch.testing.assert_close(fast.text_features(), plain.text_features(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 2])
def test_tpt_matches_straightforward_reference(tiny_clip, sample_images, steps):
    labels = LabelSet.create(CLASSES)
    options = TPTOptions(n_views=16, steps=steps, selection_p=0.25)
    method = TPT(tiny_clip)
    prompt = ReferencePrompt(tiny_clip, CLASSES)
    for seed, image in enumerate(sample_images.values()):
        ours = method.predict(_request(tiny_clip, image, labels, options, seed))
        ref = reference_tpt(tiny_clip, prompt, _views(tiny_clip, image, 16, seed), selection_p=0.25, steps=steps)
        assert int(ours.probs.argmax()) == int(ref["probs"].argmax())
        torch.testing.assert_close(ours.probs, ref["probs"], atol=1e-4, rtol=0)


def test_tpt_encodes_the_views_once_per_request(tiny_clip, sample_images, monkeypatch):
    calls = []
    original = tiny_clip.model.encode_image
    monkeypatch.setattr(tiny_clip.model, "encode_image", lambda x: calls.append(x.shape[0]) or original(x))
    TPT(tiny_clip).predict(_request(tiny_clip, sample_images["chelsea"], LabelSet.create(CLASSES),
                                    TPTOptions(n_views=32, steps=3), 0))
    assert calls == [32]  # one batch for all views, reused for 3 steps and the final prediction
    calls.clear()
    reference_tpt(tiny_clip, ReferencePrompt(tiny_clip, CLASSES), _views(tiny_clip, sample_images["chelsea"], 32, 0),
                  steps=3)
    assert calls == [32, 32, 32, 1]  # what the reference pays


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_chunked_backward_gives_the_same_gradient_and_update(tiny_clip, sample_images, chunk):
    feats = encode_images(tiny_clip, _views(tiny_clip, sample_images["coffee"], 16, 3))
    scale = tiny_clip.logit_scale
    results = {}
    for name, size in (("one chunk", len(CLASSES)), ("chunked", chunk)):
        learner = PromptLearner(tiny_clip, CLASSES)
        with learner.episode():
            out = tune_prompt(learner, feats, scale, 0.25, 5e-3, 2, 0.01, chunk_size=size)
            results[name] = (learner.save(), out["selected"], out["losses"])
    (ctx_a, sel_a, loss_a), (ctx_b, sel_b, loss_b) = results.values()
    assert torch.equal(sel_a, sel_b)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ctx_a, ctx_b, atol=1e-5, rtol=1e-4)  # Adam amplifies rounding near 0


def test_chunked_backward_keeps_activations_for_one_chunk_only(tiny_clip):
    learner = PromptLearner(tiny_clip, CLASSES)
    upstream = torch.randn(len(CLASSES), tiny_clip.embed_dim, generator=torch.Generator().manual_seed(2))
    saved_per_pass: list[int] = []
    original = learner.text_features

    def counting(*args, **kwargs):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = original(*args, **kwargs)
        saved_per_pass.append(total[0])
        return out

    learner.text_features = counting
    backward_in_chunks(learner, upstream, chunk=len(CLASSES))
    full_grad, full_bytes = learner.ctx.grad.clone(), max(saved_per_pass)
    learner.ctx.grad, saved_per_pass[:] = None, []
    backward_in_chunks(learner, upstream, chunk=2)
    torch.testing.assert_close(learner.ctx.grad, full_grad, atol=1e-5, rtol=1e-4)
    assert len(saved_per_pass) == 7
    assert max(saved_per_pass) < 0.4 * full_bytes  # each graph (freed after its backward) holds one chunk


def test_automatic_chunking_only_for_large_label_sets():
    assert resolve_chunk(0, 100) == 100
    assert resolve_chunk(0, 1000) == 256
    assert resolve_chunk(64, 1000) == 64
    assert resolve_chunk(5000, 10) == 10


def test_label_set_work_is_reused_across_requests(tiny_clip, sample_images, monkeypatch):
    method = TPT(tiny_clip)
    labels = LabelSet.create(CLASSES)
    builds = []
    original = PromptLearner.text_features
    monkeypatch.setattr(PromptLearner, "text_features",
                        lambda self, ctx=None, **kw: builds.append(ctx is self.ctx_init) or original(self, ctx, **kw))
    for seed in range(3):
        method.predict(_request(tiny_clip, sample_images["rocket"], labels, TPTOptions(n_views=8), seed))
    learner = method.prompts.get(method, labels, 4, "a photo of a")
    assert len(method.prompts) == 1
    assert builds.count(True) == 1  # initial-context features: once per label set, not per request
    # the cached step-0 features are CLIP's zero-shot classifier for "a photo of a {}."
    torch.testing.assert_close(learner.initial_text_features(), TextFeatureCache().get(tiny_clip, labels),
                               atol=1e-5, rtol=0)


def test_zero_steps_reproduce_zero_shot(tiny_clip, sample_images):
    labels = LabelSet.create(CLASSES)
    out = TPT(tiny_clip).predict(_request(tiny_clip, sample_images["astronaut"], labels, TPTOptions(steps=0), 0))
    torch.testing.assert_close(out.probs, out.zeroshot_probs, atol=1e-4, rtol=0)


def test_prompt_cache_is_bounded_lru(tiny_clip):
    method = TPT(tiny_clip)
    cache = PromptCache(max_entries=2)
    sets = [LabelSet.create(["cat", "dog", str(i)]) for i in range(3)]
    first = cache.get(method, sets[0], 4, "a photo of a")
    assert cache.get(method, sets[0], 4, "a photo of a") is first
    cache.get(method, sets[1], 4, "a photo of a")
    cache.get(method, sets[2], 4, "a photo of a")
    assert len(cache) == 2 and cache.get(method, sets[0], 4, "a photo of a") is not first


def test_mixed_precision_is_gpu_only_and_cpu_stays_fp32(tiny_clip, sample_images):
    cpu = torch.device("cpu")
    assert autocast_dtype("bf16", cpu) is None and autocast_dtype("fp16", cpu) is None
    assert autocast_dtype("bf16", torch.device("cuda")) is torch.bfloat16
    labels = LabelSet.create(CLASSES)
    image = sample_images["chelsea"]
    a = TPT(tiny_clip).predict(_request(tiny_clip, image, labels, TPTOptions(n_views=8), 0))
    b = TPT(tiny_clip).predict(_request(tiny_clip, image, labels, TPTOptions(n_views=8, precision="bf16"), 0))
    assert torch.equal(a.probs, b.probs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_gpu_keeps_top1(tiny_clip, sample_images, precision):
    import copy

    clip = copy.deepcopy(tiny_clip).to("cuda")
    labels = LabelSet.create(CLASSES)
    for seed, image in enumerate(sample_images.values()):
        exact = TPT(clip).predict(_request(clip, image, labels, TPTOptions(n_views=16), seed))
        mixed = TPT(clip).predict(_request(clip, image, labels, TPTOptions(n_views=16, precision=precision), seed))
        assert (exact.probs - mixed.probs).abs().max() < 2e-2


def test_options_validate_new_knobs():
    from tta.errors import BadRequest

    assert TPTOptions.from_dict({"chunk_size": 64, "precision": "bf16"}).chunk_size == 64
    with pytest.raises(BadRequest):
        TPTOptions.from_dict({"precision": "int8"})
    with pytest.raises(BadRequest):
        TPTOptions.from_dict({"chunk_size": -1})


def test_text_features_rows_follow_requested_order(tiny_clip):
    learner = PromptLearner(tiny_clip, CLASSES)
    with torch.no_grad():
        every = learner.text_features()
        reverse = learner.text_features(classes=torch.arange(len(CLASSES) - 1, -1, -1))
        middle = learner.text_features(classes=slice(2, 6))
    assert torch.equal(reverse, every.flip(0)) or torch.allclose(reverse, every.flip(0), atol=1e-6)
    torch.testing.assert_close(middle, every[2:6], atol=1e-6, rtol=0)
    assert F.normalize(every, dim=-1).shape == (len(CLASSES), tiny_clip.embed_dim)
