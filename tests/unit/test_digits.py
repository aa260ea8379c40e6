"""The digits CLIP the suite trains itself: zero-shot well above chance, so accuracy tests mean something.

Stated statistics over 300 test images (one-sided 99.9 %, z = 3.09; tests/stats.py), so another
CPU's slightly different weights cannot cross them: measured on an Intel Xeon, clean 0.870 (lower
bound 0.81 > 0.7) and the rotation shift costs 36 points paired (lower bound 27 > 10 points).
"""

from __future__ import annotations

import math

import torch

from tests.stats import Z_999, paired
from tta.engine import Engine
from tta.testing.digits import DIGIT_CLASSNAMES, shift_images
from tta.text import LabelSet


def _hits(engine: Engine, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.tensor([engine.predict(img, method="zeroshot").label == DIGIT_CLASSNAMES[int(y)]
                         for img, y in zip(images, labels, strict=True)])


def test_digits_clip_zero_shot_is_well_above_chance(digits_clip, digits_data):
    _, _, test_images, test_labels = digits_data
    engine = Engine(digits_clip, LabelSet.create(DIGIT_CLASSNAMES))
    clean = _hits(engine, test_images[:300], test_labels[:300])
    rotated = _hits(engine, shift_images(test_images[:300], "rotate", 3), test_labels[:300])
    accuracy = float(clean.float().mean())
    print(f"\ndigits CLIP zero-shot accuracy: clean {accuracy:.3f}, rotated {float(rotated.float().mean()):.3f}"
          " (chance 0.100)")
    assert accuracy - Z_999 * math.sqrt(accuracy * (1 - accuracy) / len(clean)) > 0.7
    hurt = paired(clean, rotated)  # the shift used by the accuracy tests really hurts
    assert hurt.lower(Z_999) > 0.1, str(hurt)


def test_shifts_are_deterministic_and_change_the_images(digits_data):
    images = digits_data[2][:8]
    for kind in ("noise", "blur", "contrast", "rotate"):
        shifted = shift_images(images, kind, 3, seed=1)
        assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
        assert torch.equal(shifted, shift_images(images, kind, 3, seed=1))
        assert not torch.equal(shifted, images)
