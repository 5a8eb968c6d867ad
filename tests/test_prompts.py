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
