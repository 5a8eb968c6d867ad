"""Bidirectional copy-paste: the boxes, the mixed images and what supervises each voxel."""

import pytest
import torch

from custom.engines.copy_paste import BidirectionalCopyPaste, copy_paste, random_boxes


@pytest.mark.parametrize("spatial", [(12, 20), (10, 6, 8)])
def test_each_sample_gets_one_box_of_the_ratio_of_every_side_inside_the_patch(spatial):
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(10):
        boxes = random_boxes((3, 2, *spatial), 0.5, g)
        assert boxes.shape == (3, 1, *spatial) and boxes.dtype == torch.bool
        for box in boxes[:, 0]:
            where = box.nonzero()
            sides = (where.max(0).values - where.min(0).values + 1).tolist()
            assert sides == [round(0.5 * n) for n in spatial]
            assert int(box.sum()) == torch.tensor(sides).prod()  # one solid box
            starts.add(tuple(where.min(0).values.tolist()))
    assert len(starts) > 5  # positions vary


def test_a_box_ratio_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="copy_paste_ratio must be in"):
        random_boxes((1, 1, 8, 8), 1.0, torch.Generator())
    with pytest.raises(ValueError, match="copy_paste_ratio must be in"):
        BidirectionalCopyPaste(ratio=0.0)


def test_mixes_go_both_ways_with_ground_truth_where_the_labelled_patch_shows():
    """3 labelled and 5 unlabelled 3D patches of 2 channels and 4 classes, not cubic: unlabelled ``i``
    mixes with labelled ``i mod 3``; inward mixes show the labelled box in the unlabelled patch, outward
    mixes the unlabelled box in the labelled patch; ground truth (weight 1) wherever the labelled patch
    shows, the pseudo-label with the gate's weight elsewhere."""
    g = torch.Generator().manual_seed(1)
    shape = (6, 10, 4)
    images, labels = torch.randn(3, 2, *shape, generator=g), torch.randint(0, 4, (3, 1, *shape), generator=g)
    unlabelled = torch.randn(5, 2, *shape, generator=g)
    pseudo = torch.randint(0, 4, (5, 1, *shape), generator=g).float()
    weights = torch.rand(5, 1, *shape, generator=g)
    mixed = BidirectionalCopyPaste(ratio=0.5, seed=3)(images, labels, unlabelled, pseudo, weights)
    boxes = random_boxes(unlabelled.shape, 0.5, torch.Generator().manual_seed(3))  # the same draws
    assert mixed.images.shape == (10, 2, *shape) and mixed.targets.shape == mixed.weights.shape == (10, 1, *shape)
    for i in range(5):
        box, j = boxes[i], i % 3
        inward, outward = i, 5 + i
        assert torch.equal(mixed.from_labelled[inward], box) and torch.equal(mixed.from_labelled[outward], ~box)
        for k, from_l in ((inward, box), (outward, ~box)):
            lab, unl = from_l.expand(2, *shape), ~from_l
            assert torch.equal(mixed.images[k][lab], images[j][lab])
            assert torch.equal(mixed.images[k][~lab], unlabelled[i][~lab])
            assert torch.equal(mixed.targets[k][from_l], labels[j][from_l].float())
            assert torch.equal(mixed.targets[k][unl], pseudo[i][unl])
            assert torch.equal(mixed.weights[k][from_l], torch.ones(int(from_l.sum())))
            assert torch.equal(mixed.weights[k][unl], weights[i][unl])


def test_patches_of_different_sizes_are_refused_with_the_reason():
    mix = BidirectionalCopyPaste()
    with pytest.raises(ValueError, match=r"one size, got \[8, 8\] and \[8, 16\]"):
        mix(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 16), torch.zeros(1, 1, 8, 16),
            torch.ones(1, 1, 8, 16))  # fmt: skip


def test_the_config_names_the_mode():
    assert copy_paste("none") is None
    assert copy_paste("bidirectional", 0.25).ratio == 0.25
    with pytest.raises(ValueError, match="copy_paste must be one of"):
        copy_paste("bcp")
