"""The digits CLIP the suite trains itself: zero-shot well above chance, so accuracy tests mean something."""

from __future__ import annotations

import torch

from tta.engine import Engine
from tta.testing.digits import DIGIT_CLASSNAMES, shift_images
from tta.text import LabelSet


def _accuracy(engine: Engine, images: torch.Tensor, labels: torch.Tensor) -> float:
    hits = [engine.predict(img, method="zeroshot").label == DIGIT_CLASSNAMES[int(y)] for img, y in zip(images, labels, strict=True)]
    return sum(hits) / len(hits)


def test_digits_clip_zero_shot_is_well_above_chance(digits_clip, digits_data):
    _, _, test_images, test_labels = digits_data
    engine = Engine(digits_clip, LabelSet.create(DIGIT_CLASSNAMES))
    clean = _accuracy(engine, test_images[:300], test_labels[:300])
    rotated = _accuracy(engine, shift_images(test_images[:300], "rotate", 3), test_labels[:300])
    print(f"\ndigits CLIP zero-shot accuracy: clean {clean:.3f}, rotated {rotated:.3f} (chance 0.100)")
    assert clean > 0.7
    assert rotated < clean  # the shift used by the accuracy tests really hurts


def test_shifts_are_deterministic_and_change_the_images(digits_data):
    images = digits_data[2][:8]
    for kind in ("noise", "blur", "contrast", "rotate"):
        shifted = shift_images(images, kind, 3, seed=1)
        assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
        assert torch.equal(shifted, shift_images(images, kind, 3, seed=1))
        assert not torch.equal(shifted, images)
