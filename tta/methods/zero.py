"""ZERO: test-time adaptation with "zero" temperature (Farina et al., NeurIPS 2024; repo FarinaMatteo/zero).

Per request: 64 views (original + 63 random resized crops with flips), one batched forward of the
frozen image encoder, keep the gamma = 0.3 lowest-entropy views, and let each kept view vote for
its argmax class (softmax at temperature -> 0). No backprop, no state.

Ties are broken greedily: walk the remaining (less confident) views from most to least confident
and take the first whose argmax is among the tied classes, as the reference does since
FarinaMatteo/zero cbd7949 ("bugfix greedy_break": `greedy_break(ties, sorted_l[k:])`, entropy
order; before it walked them in input order). If no remaining view votes for a tied class, the
tied class with the highest logit on the original view wins. Deliberate difference there: the
reference's `break_sample_tie` masks with `logit[~ties]` on *integer* class indices, i.e. bitwise
NOT (classes -t-1, counted from the end), not the complement of the ties, so it can return a class
that was not tied at all, and it reads the first remaining view rather than the original one.
Ours always answers one of the tied classes (the vote's own winners) and lets the one unaugmented
observation decide. The returned probabilities are the vote shares (the winner gets the
reference's +1 after a tie-break).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta.faults import check_deadline
from tta.features import encode_images
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, check, register
from tta.scoring import entropy, n_confident
from tta.views import ViewSpec, make_views


@dataclass(frozen=True)
class ZeroOptions(MethodOptions):
    """Defaults of the ZERO repository (gamma 0.3, updated from the paper's 0.1)."""

    n_views: int = 64
    gamma: float = 0.3
    augmix: bool = False

    def validate(self) -> None:
        check(1 <= self.n_views <= 512, "n_views must be in [1, 512]")
        check(0.0 < self.gamma <= 1.0, "gamma must be in (0, 1]")


def zero_vote(logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """Vote counts [C] from view logits [N, C] (any positive scale; entropy uses them as given)."""
    order = torch.argsort(entropy(logits), descending=False)
    k = n_confident(logits.shape[0], gamma)
    kept, rest = order[:k], order[k:]
    votes = torch.bincount(logits[kept].argmax(-1), minlength=logits.shape[1]).to(logits.dtype)
    top = votes.max()
    ties = torch.nonzero(votes == top).flatten()
    if ties.numel() > 1:
        winner = None
        for pred in logits[rest].argmax(-1).tolist():
            if pred in ties.tolist():
                winner = pred
                break
        if winner is None:
            winner = int(ties[logits[0, ties].argmax()])
        votes[winner] += 1
    return votes


@register
class Zero(Method):
    name = "zero"
    scope = "episodic"
    Options = ZeroOptions
    description = "majority vote of the most confident augmented views; forward only, ~TPT accuracy"
    batch_encoding = "views"

    def predict(self, request: MethodInput) -> MethodOutput:
        opts: ZeroOptions = request.options  # type: ignore[assignment]
        clip = self.clip
        with request.timer.stage("augment"):
            views = make_views(request.image, clip.image_size, clip.mean, clip.std,
                               ViewSpec(n_views=opts.n_views, augmix=opts.augmix),
                               generator=request.generator, device=clip.device)
        check_deadline(request.deadline, "encoding")
        with request.timer.stage("encode"):
            feats = encode_images(clip, views)
        with request.timer.stage("predict"):
            logits = clip.logit_scale * feats @ request.text_features.t()
            votes = zero_vote(logits, opts.gamma)
            probs = votes / votes.sum()
        zeroshot = logits[0].softmax(-1)
        return MethodOutput(probs=probs, zeroshot_probs=zeroshot, image_features=feats[0],
                            extra={"votes": int(votes.max().item())})
