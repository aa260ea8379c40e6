"""Views: original first, crops/flips seeded and batched."""

from __future__ import annotations

import torch

from tta.views import ViewSpec, base_view, make_views, normalize, sample_crop_boxes

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_first_view_is_the_center_crop_and_shapes(sample_images):
    image = sample_images["chelsea"]
    views = make_views(image, 64, MEAN, STD, ViewSpec(n_views=16), torch.Generator().manual_seed(0))
    assert views.shape == (16, 3, 64, 64)
    assert torch.allclose(views[0], normalize(base_view(image, 64), MEAN, STD))
    assert not torch.allclose(views[1], views[2])


def test_views_are_reproducible_under_a_seed_and_vary_without(sample_images):
    image = sample_images["coffee"]
    a = make_views(image, 32, MEAN, STD, ViewSpec(n_views=8), torch.Generator().manual_seed(3))
    b = make_views(image, 32, MEAN, STD, ViewSpec(n_views=8), torch.Generator().manual_seed(3))
    c = make_views(image, 32, MEAN, STD, ViewSpec(n_views=8), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_boxes_respect_scale_and_ratio():
    boxes = sample_crop_boxes(500, 300, 400, ViewSpec(), torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 400).all() and (boxes[:, 3] <= 300).all()
    area = (w * h) / (300 * 400)
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert ((w / h) > 0.7).all() and ((w / h) < 1.4).all()


def test_augmix_variant_runs_and_differs(sample_images):
    image = sample_images["rocket"]
    plain = make_views(image, 32, MEAN, STD, ViewSpec(n_views=6), torch.Generator().manual_seed(1))
    mixed = make_views(image, 32, MEAN, STD, ViewSpec(n_views=6, augmix=True), torch.Generator().manual_seed(1))
    assert mixed.shape == plain.shape
    assert torch.equal(mixed[0], plain[0]) and not torch.allclose(mixed[1:], plain[1:])
