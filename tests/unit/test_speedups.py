"""Each exact speed-up of TPT gives the result of the straightforward computation.

The reference is bench/reference_tpt.py (full 77-token text encoder every pass, image features
recomputed per pass, fp32, no chunking). "Same" is checked two ways (tolerances: tests/numerics.py):
- in float64 (a float64 copy of the model), the fast path equals the reference to fp64 rounding:
  the speed-up is exact algebra, not an approximation;
- in fp32, the fast path lies within the fp32 rounding bound of the float64 reference, a bound
  from the unit roundoff, the reference's magnitude and the number of summed terms, so it holds
  on any CPU, thread count or BLAS.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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
from tests.numerics import assert_within, float64_copy, rounding_bound, text_forward_terms  # noqa: E402

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


@pytest.fixture(scope="module")
def clip64(tiny_clip):
    return float64_copy(tiny_clip)


def _reference64(clip64) -> ReferencePrompt:
    """ReferencePrompt on the float64 model, its buffers and context in float64 too."""
    ref = ReferencePrompt(clip64, CLASSES)
    ref.prefix, ref.suffix = ref.prefix.double(), ref.suffix.double()
    ref.ctx_init = ref.ctx_init.double()
    ref.ctx = torch.nn.Parameter(ref.ctx_init.clone())
    return ref


def _ctx_gradient(prompt, weights: torch.Tensor) -> torch.Tensor:
    features = prompt.text_features()
    (features * weights.to(features.dtype)).sum().backward()
    return prompt.ctx.grad


def test_truncated_shared_prefix_text_features_match_full_context(tiny_clip, clip64):
    learner = PromptLearner(tiny_clip, CLASSES)
    assert learner.fast and learner.length < 77
    ctx = learner.ctx_init + 0.05 * torch.randn(learner.ctx_init.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = learner.text_features(ctx)
        exact = _full_context_features(clip64, ctx.double())
        exact_fast = PromptLearner(clip64, CLASSES).text_features(ctx.double())
    assert exact.dtype == exact_fast.dtype == torch.float64
    terms = text_forward_terms(tiny_clip)
    assert_within(exact_fast, exact, rounding_bound(exact, torch.float64, terms), "fp64 fast vs fp64 reference")
    bound = rounding_bound(exact, torch.float32, terms)
    assert_within(fast, exact, bound, "fp32 fast vs fp64 reference")
    # a subset in any order gives the same rows
    picked = [13, 0, 7]
    with torch.no_grad():
        assert_within(learner.text_features(ctx, classes=picked), exact[picked], bound, "subset rows")


def test_fast_text_encoder_gradient_matches_full_context(tiny_clip, clip64):
    """d(sum(features * W))/d(ctx): each element sums over every class (14) of the forward's terms."""
    weights = torch.randn(len(CLASSES), tiny_clip.embed_dim, generator=torch.Generator().manual_seed(1))
    exact = _ctx_gradient(_reference64(clip64), weights.double())
    learner64 = PromptLearner(clip64, CLASSES)
    learner64.ctx = torch.nn.Parameter(learner64.ctx_init.clone())
    fast64 = _ctx_gradient(learner64, weights.double())
    assert exact.dtype == fast64.dtype == torch.float64
    terms = text_forward_terms(tiny_clip) * len(CLASSES)
    assert_within(fast64, exact, rounding_bound(exact, torch.float64, terms), "fp64 fast gradient")
    learner = PromptLearner(tiny_clip, CLASSES)
    assert_within(_ctx_gradient(learner, weights), exact, rounding_bound(exact, torch.float32, terms),
                  "fp32 fast gradient vs fp64 reference")
    learner.reset()


def test_generic_tower_path_matches_fast_path(tiny_clip, clip64):
    fast = PromptLearner(tiny_clip, CLASSES)
    plain = PromptLearner(tiny_clip, CLASSES, shared_prefix=False)
    assert fast.fast and not plain.fast
    with torch.no_grad():
        exact = PromptLearner(clip64, CLASSES, shared_prefix=False).text_features()
        bound = rounding_bound(exact, torch.float32, text_forward_terms(tiny_clip))
        # each within the bound of the exact value, so within twice it of each other
        assert_within(fast.text_features(), exact, bound, "fast path")
        assert_within(plain.text_features(), exact, bound, "generic path")


def _probability_bound(clip, feature_bound: float) -> float:
    """|dp| <= 1/2 max|dz| for a softmax; z = scale * <t, v> with unit t, v of dimension d, and both
    factors off by at most `feature_bound` per element: |dz| <= scale * 2 * sqrt(d) * feature_bound."""
    return 0.5 * clip.logit_scale * 2 * math.sqrt(clip.embed_dim) * feature_bound


@pytest.mark.parametrize("steps", [1, 2])
def test_tpt_matches_straightforward_reference(tiny_clip, sample_images, steps):
    labels = LabelSet.create(CLASSES)
    options = TPTOptions(n_views=16, steps=steps, selection_p=0.25)
    method = TPT(tiny_clip)
    prompt = ReferencePrompt(tiny_clip, CLASSES)
    for seed, image in enumerate(sample_images.values()):
        ours = method.predict(_request(tiny_clip, image, labels, options, seed))
        ref = reference_tpt(tiny_clip, prompt, _views(tiny_clip, image, 16, seed), selection_p=0.25, steps=steps)
        # two fp32 computations of the same probabilities, each within the bound of the exact value
        bound = 2 * _probability_bound(tiny_clip, rounding_bound(torch.ones(1), torch.float32,
                                                                 text_forward_terms(tiny_clip)))
        assert_within(ours.probs, ref["probs"], bound, f"TPT probabilities, image {seed}")
        top2 = ref["probs"].topk(2).values
        if float(top2[0] - top2[1]) > 2 * bound:  # top-1 is only defined beyond the rounding band
            assert int(ours.probs.argmax()) == int(ref["probs"].argmax())


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
def test_chunked_backward_gives_the_same_gradient_and_update(clip64, sample_images, chunk):
    """In float64, so the comparison sees algebra, not rounding: chunking only reorders the sum of
    per-chunk gradients (error <= the fp64 bound dg). Adam's step lr * m/(sqrt(v) + eps) is a ratio of
    gradient moments, so a relative gradient error r moves each element by <= 2 r lr per step;
    with r = dg / 1e-8 (no element of a gradient of size ~10 comes within 1e-8 of zero, except with
    probability ~1e-7) that is < 1e-5 over 2 steps."""
    with torch.no_grad():  # encode_images returns fp32 by contract; the model itself stays fp64
        feats = F.normalize(clip64.model.encode_image(_views(clip64, sample_images["coffee"], 16, 3).double()), dim=-1)
    scale = clip64.logit_scale
    lr, steps = 5e-3, 2
    results = {}
    for name, size in (("one chunk", len(CLASSES)), ("chunked", chunk)):
        learner = PromptLearner(clip64, CLASSES)
        learner.ctx = torch.nn.Parameter(learner.ctx_init.clone())
        with learner.episode():
            out = tune_prompt(learner, feats, scale, 0.25, lr, steps, 0.01, chunk_size=size)
            results[name] = (learner.save(), out["selected"], out["losses"])
    (ctx_a, sel_a, loss_a), (ctx_b, sel_b, loss_b) = results.values()
    assert ctx_a.dtype == torch.float64 and torch.equal(sel_a, sel_b)
    terms = text_forward_terms(clip64) * len(CLASSES)
    assert_within(loss_a, loss_b, 2 * rounding_bound(loss_a, torch.float64, terms), "losses")
    gradient_error = 2 * rounding_bound(torch.tensor(100.0), torch.float64, terms)  # |g| < 100 here
    assert_within(ctx_a, ctx_b, steps * 2 * (gradient_error / 1e-8) * lr, "context after Adam")
    assert not torch.equal(ctx_a, PromptLearner(clip64, CLASSES).ctx_init)  # the steps did move it


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
    # two fp32 gradients of the same function, each within the fp32 bound of the exact one
    bound = 2 * rounding_bound(full_grad, torch.float32, text_forward_terms(tiny_clip) * len(CLASSES))
    assert_within(learner.ctx.grad, full_grad, bound, "chunked gradient")
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
