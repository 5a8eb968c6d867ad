import pytest
import torch

from custom.teachers.prompts import prompts_from_labels


def _labels():
    lbl = torch.zeros(2, 1, 20, 30, dtype=torch.long)
    lbl[0, 0, 2:10, 5:25] = 1  # organ: rows 2..9, cols 5..24
    lbl[0, 0, 4:6, 8:11] = 2  # lesion: rows 4..5, cols 8..10
    lbl[1, 0, 10:15, 0:3] = 1  # second image: organ only
    return lbl


def test_boxes_are_xyxy_per_class_with_absent_classes_invalid():
    p = prompts_from_labels(_labels(), num_classes=3)
    assert p.valid.tolist() == [[True, True], [True, False]]
    assert p.boxes[0, 0].tolist() == [5, 2, 24, 9]  # x along width, y along height
    assert p.boxes[0, 1].tolist() == [8, 4, 10, 5]
    assert p.boxes[1, 0].tolist() == [0, 10, 2, 14]
    assert p.points is None


def test_one_hot_and_channel_less_labels_give_the_same_boxes():
    lbl = _labels()
    onehot = torch.nn.functional.one_hot(lbl[:, 0], 3).permute(0, 3, 1, 2).float()
    ref = prompts_from_labels(lbl, 3)
    for other in (prompts_from_labels(onehot, 3), prompts_from_labels(lbl[:, 0], 3)):
        assert torch.equal(other.boxes, ref.boxes) and torch.equal(other.valid, ref.valid)


def test_jitter_moves_edges_within_the_fraction_and_the_image():
    lbl = _labels()
    exact = prompts_from_labels(lbl, 3).boxes
    g = torch.Generator().manual_seed(0)
    moved = [prompts_from_labels(lbl, 3, box_jitter=0.2, generator=g).boxes for _ in range(20)]
    size = (exact[0, 0, 2:] - exact[0, 0, :2] + 1).repeat(2)
    deltas = torch.stack([m[0, 0] - exact[0, 0] for m in moved]).abs()
    assert (deltas <= 0.2 * size + 1e-4).all() and deltas.max() > 0
    for m in moved:
        assert (m[..., 0] <= m[..., 2]).all() and (m[..., 1] <= m[..., 3]).all()
        assert m.min() >= 0 and m[..., [0, 2]].max() <= 29 and m[..., [1, 3]].max() <= 19
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(
        prompts_from_labels(lbl, 3, box_jitter=0.2, generator=g1).boxes,
        prompts_from_labels(lbl, 3, box_jitter=0.2, generator=g2).boxes,
    )


def test_points_lie_inside_their_class():
    lbl = _labels()
    p = prompts_from_labels(lbl, 3, with_boxes=False, with_points=True, generator=torch.Generator().manual_seed(1))
    assert p.boxes is None
    for i in range(2):
        for k in range(2):
            if p.valid[i, k]:
                x, y = p.points[i, k].long().tolist()
                assert lbl[i, 0, y, x] == k + 1


def test_rejects_volumes():
    with pytest.raises(ValueError, match="2D label maps"):
        prompts_from_labels(torch.zeros(1, 1, 4, 4, 4), 3)


def _blobs():
    """One 24x32 image: class 1 as two separated blobs (rows 2..6 x cols 3..8 and rows 14..20 x cols 20..29)
    plus a 2-pixel speck, class 2 as one blob whose halves touch only diagonally."""
    lbl = torch.zeros(1, 1, 24, 32, dtype=torch.long)
    lbl[0, 0, 2:7, 3:9] = 1  # 30 pixels
    lbl[0, 0, 14:21, 20:30] = 1  # 70 pixels: the largest, first slot
    lbl[0, 0, 22, 0:2] = 1  # 2 pixels: below min_component_size
    lbl[0, 0, 10:12, 10:12] = 2
    lbl[0, 0, 12:14, 12:14] = 2  # touches the block above at a corner only: the same (8-connected) component
    return lbl


def test_component_mode_gives_one_tight_box_per_blob_largest_first():
    p = prompts_from_labels(_blobs(), 3, box_mode="component", with_points=True, generator=torch.Generator())
    assert p.boxes.shape == (1, 2, 4, 4) and p.points.shape == (1, 2, 4, 2) and p.components.shape == (1, 2, 4)
    assert p.components.tolist() == [[[True, True, False, False], [True, False, False, False]]]
    assert p.valid.tolist() == [[True, True]]
    assert p.boxes[0, 0, 0].tolist() == [20, 14, 29, 20]  # x0, y0, x1, y1 of the larger blob
    assert p.boxes[0, 0, 1].tolist() == [3, 2, 8, 6]
    assert p.boxes[0, 1, 0].tolist() == [10, 10, 13, 13]
    assert p.boxes[0, :, 2:].abs().sum() == 0 and p.boxes[0, 1, 1:].abs().sum() == 0  # unused slots stay zero
    for k, slot in [(0, 0), (0, 1), (1, 0)]:  # each point lies inside its own component's box and class
        x, y = p.points[0, k, slot].long().tolist()
        x0, y0, x1, y1 = p.boxes[0, k, slot].long().tolist()
        assert _blobs()[0, 0, y, x] == k + 1 and x0 <= x <= x1 and y0 <= y <= y1
    # the per-class box of the same labels spans both blobs, the speck and the tissue between
    assert prompts_from_labels(_blobs(), 3).boxes[0, 0].tolist() == [0, 2, 29, 22]


def test_component_limits_size_and_count():
    lbl = _blobs()
    largest = prompts_from_labels(lbl, 3, box_mode="component", max_components=1)
    assert largest.boxes.shape == (1, 2, 1, 4) and largest.boxes[0, 0, 0].tolist() == [20, 14, 29, 20]
    every = prompts_from_labels(lbl, 3, box_mode="component", min_component_size=1)
    assert every.components[0, 0].tolist() == [True, True, True, False]
    assert every.boxes[0, 0, 2].tolist() == [0, 22, 1, 22]  # the speck, now kept, comes last
    only_specks = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    only_specks[0, 0, 1, 1] = only_specks[0, 0, 5, 5] = 1
    none = prompts_from_labels(only_specks, 3, box_mode="component")
    assert not none.valid.any() and not none.components.any()  # every component too small: no prompt
    with pytest.raises(ValueError, match="box_mode"):
        prompts_from_labels(lbl, 3, box_mode="blob")
    with pytest.raises(ValueError, match="max_components"):
        prompts_from_labels(lbl, 3, box_mode="component", max_components=0)


def test_component_jitter_stays_in_the_image_and_near_its_component():
    g = torch.Generator().manual_seed(0)
    exact = prompts_from_labels(_blobs(), 3, box_mode="component")
    for _ in range(10):
        moved = prompts_from_labels(_blobs(), 3, box_mode="component", box_jitter=0.2, generator=g)
        assert torch.equal(moved.components, exact.components)
        box, ref = moved.boxes[0, 0, 1], exact.boxes[0, 0, 1]
        size = (ref[2:] - ref[:2] + 1).repeat(2)
        assert ((box - ref).abs() <= 0.2 * size + 1e-4).all()
        used = moved.boxes[moved.components]
        assert used.min() >= 0 and used[:, [0, 2]].max() <= 31 and used[:, [1, 3]].max() <= 23


def _probabilities(labels: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` probabilities putting ``confidence`` on each pixel's label, the rest shared equally."""
    onehot = torch.nn.functional.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).float()
    conf = confidence[:, None]
    return onehot * conf + (1 - onehot) * (1 - conf) / 2


def test_confidence_filter_drops_prompts_of_uncertain_components():
    lbl = _blobs()
    confidence = torch.full(lbl[:, 0].shape, 0.9)
    confidence[0, 2:7, 3:9] = 0.4  # the smaller class-1 blob: still its argmax (0.4 > 0.3), but unsure
    probs = _probabilities(lbl, confidence)
    assert torch.equal(probs.argmax(1, keepdim=True), lbl)
    kept = prompts_from_labels(probs, 3, box_mode="component", min_confidence=0.5)
    assert kept.components.tolist() == [[[True, False, False, False], [True, False, False, False]]]
    assert kept.boxes[0, 0, 0].tolist() == [20, 14, 29, 20]  # only the confident blob is prompted
    # off by default, and hard labels count as certain: the same regions as without the filter
    unfiltered = prompts_from_labels(lbl, 3, box_mode="component").components
    assert torch.equal(prompts_from_labels(probs, 3, box_mode="component").components, unfiltered)
    assert torch.equal(prompts_from_labels(lbl, 3, box_mode="component", min_confidence=0.99).components, unfiltered)
    # one prompt per class: a class whose mean probability over its region is too low gets none
    by_class = prompts_from_labels(_probabilities(lbl, torch.where(lbl[:, 0] == 2, 0.45, 0.9)), 3, min_confidence=0.5)
    assert by_class.valid.tolist() == [[True, False]] and by_class.boxes[0, 0].tolist() == [0, 2, 29, 22]
    with pytest.raises(ValueError, match="3 channels"):
        prompts_from_labels(probs[:, :2], 3, min_confidence=0.5)
