"""ZERO equals a straightforward re-computation of its vote on the same views."""

from __future__ import annotations

from collections import Counter

import torch

from tta.engine import Engine
from tta.features import encode_images
from tta.methods.zero import zero_vote
from tta.text import LabelSet
from tta.views import ViewSpec, make_views

LABELS = ["cat", "dog", "car", "rocket", "coffee cup", "person", "tree", "house"]


def _straightforward_vote(logits: torch.Tensor, gamma: float) -> list[int]:
    rows = logits.tolist()
    def row_entropy(row):
        p = torch.tensor(row).softmax(-1)
        return float(-(p * p.log()).sum())
    order = sorted(range(len(rows)), key=lambda i: row_entropy(rows[i]))
    keep = max(1, int(len(rows) * gamma))
    counts = Counter(max(range(len(r)), key=r.__getitem__) for r in (rows[i] for i in order[:keep]))
    votes = [counts.get(c, 0) for c in range(len(rows[0]))]
    best = max(votes)
    tied = [c for c, v in enumerate(votes) if v == best]
    if len(tied) > 1:
        for i in order[keep:]:
            pred = max(range(len(rows[i])), key=rows[i].__getitem__)
            if pred in tied:
                votes[pred] += 1
                break
        else:
            votes[max(tied, key=lambda c: rows[0][c])] += 1
    return votes


def test_zero_matches_a_direct_recomputation_on_real_photos(tiny_clip, sample_images):
    labels = LabelSet.create(LABELS)
    engine = Engine(tiny_clip, labels)
    for name, image in sample_images.items():
        prediction = engine.predict(image, method="zero", seed=7)
        views = make_views(image, tiny_clip.image_size, tiny_clip.mean, tiny_clip.std, ViewSpec(n_views=64),
                           torch.Generator().manual_seed(7))
        logits = tiny_clip.logit_scale * encode_images(tiny_clip, views) @ engine.text_cache.get(tiny_clip, labels).t()
        votes = torch.tensor(_straightforward_vote(logits, 0.3), dtype=torch.float32)
        assert torch.allclose(prediction.probs, votes / votes.sum()), name


def test_zero_tie_break_uses_the_less_confident_views():
    # views 0,1 are confident and disagree (class 0 vs 1); view 2 (less confident) prefers class 1
    logits = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 1.0, 0.5], [0.2, 0.0, 0.1]])
    votes = zero_vote(logits, gamma=0.5)
    assert votes.tolist() == [1.0, 2.0, 0.0]
