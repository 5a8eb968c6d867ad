import math

import numpy as np
import pytest
import torch

from custom.data.phantoms import PhantomConfig, make_case
from custom.losses.distillation import pool_to_grid
from custom.teachers.generalized import GeneralizedTeacher, compose_class_probs
from custom.teachers.prompts import Prompts
from custom.teachers.targets import distillation_targets


def _phantom(shape=(128, 96), seed=2):
    image, label = make_case(PhantomConfig(shape=shape).resolved(), np.random.default_rng([seed, 0]))
    return torch.from_numpy(image)[None, None], torch.from_numpy(label.astype(np.int64))[None, None]


def _dice(a, b):
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def test_box_prompts_segment_a_non_square_phantom(lite_teacher):
    """Real zero-shot quality: boxes map correctly through resize/pad and masks back to the input grid."""
    image, label = _phantom()
    out = lite_teacher(image, labels=label)
    pred = out.probs.argmax(1)
    assert _dice(pred == 1, label[:, 0] == 1) > 0.85
    if (label == 2).any():
        assert _dice(pred == 2, label[:, 0] == 2) > 0.5


def test_2d_output_shapes_ranges_and_abstention(lite_teacher):
    image, label = _phantom(shape=(64, 48), seed=4)
    images = torch.cat([image, image])
    labels = torch.cat([label, label.clamp(max=1)])  # second copy: no lesion -> no lesion prompt
    out = lite_teacher(images, labels=labels)
    assert out.valid.tolist() == [[True, bool((label == 2).any())], [True, False]]
    assert out.probs.shape == (2, 3, 64, 48)
    assert out.probs.min() >= 0 and out.probs.max() <= 1
    assert torch.allclose(out.probs.sum(1), torch.ones(2, 64, 48), atol=1e-5)
    assert out.embedding.shape == (2, 256, 64, 64)  # the padded square, for the mask decoder
    assert set(out.features) == {"enc1", "enc2", "enc3"}
    # 64x48 fills 256x192 of the padded 256x256 input: the maps keep its 64x48 cells
    assert out.features["enc1"].shape == (2, 160, 64, 48) and out.features["enc3"].shape == (2, 320, 64, 48)
    assert out.fusion.shape == (2, 2, 256, 64, 48)
    assert torch.equal(out.features["enc2"], lite_teacher.encode(images)["enc2"][..., :48])
    # abstention for an absent class: zero probability and zero fusion features for it
    assert out.probs[1, 2].max() == 0 and out.fusion[1, 1].abs().max() == 0
    assert out.fusion[1, 0].abs().max() > 0
    # the image encoder sees the same image twice: identical features
    assert torch.allclose(out.features["enc2"][0], out.features["enc2"][1])


def test_no_prompt_at_all_gives_the_uniform_maximum_entropy_map(lite_teacher):
    image, _ = _phantom(shape=(32, 32))
    out = lite_teacher(image)
    assert torch.allclose(out.probs, torch.full_like(out.probs, 1 / 3))
    entropy = -(out.probs * out.probs.log()).sum(1)
    assert torch.allclose(entropy, torch.full_like(entropy, math.log(3)))
    assert not out.valid.any() and out.fusion.abs().max() == 0


def test_square_images_keep_the_full_maps_unchanged(lite_teacher):
    image, label = _phantom(shape=(32, 32), seed=3)
    out = lite_teacher(image, labels=label)
    enc = lite_teacher.encode(image)
    assert out.features["enc1"].shape == (1, 160, 64, 64) and out.fusion.shape == (1, 2, 256, 64, 64)
    assert all(torch.equal(out.features[k], enc[k]) for k in out.features)
    maps = torch.randn(2, 3, 64, 64)
    assert lite_teacher.crop_to_image(maps, (96, 96)) is maps


def _coverage(cells: int, cells_per_pixel: float, span: tuple[int, int]) -> torch.Tensor:
    """Fraction of each of ``cells`` unit cells inside image pixels ``[a, b)`` (``cells_per_pixel`` per pixel)."""
    lo, hi = span[0] * cells_per_pixel, span[1] * cells_per_pixel
    edges = torch.arange(cells, dtype=torch.float64)
    return (torch.clamp(edges + 1, max=hi) - torch.clamp(edges, min=lo)).clamp(0, 1).float()


@pytest.mark.parametrize(
    ("shape", "rows", "cols"),
    [
        ((176, 208), (48, 80), (112, 128)),  # 54.25 of 64 rows: a fractional crop
        ((208, 176), (112, 128), (48, 80)),
        ((48, 112), (16, 32), (64, 80)),  # 27.5 of 64 rows
        ((64, 48), (16, 32), (32, 48)),  # 48 of 64 columns: a whole-cell crop
    ],
)
def test_cropped_maps_put_a_region_on_its_tokens(lite_teacher, shape, rows, cols):
    """A map over the padded frame marking where image rows ``rows`` x cols ``cols`` lie, cropped and pooled
    to the token grid (image size / 16), is on exactly the tokens of that region; uncropped it is not."""
    h, w = shape
    size, frame = lite_teacher.spec.image_size, 64
    nh, nw = lite_teacher._resized_size(h, w)
    marker = _coverage(frame, frame * nh / size / h, rows)[:, None] * _coverage(frame, frame * nw / size / w, cols)
    marker = marker.expand(2, 3, frame, frame)  # any leading dims
    cropped = lite_teacher.crop_to_image(marker, shape)
    assert cropped.shape == (2, 3, round(frame * nh / size), round(frame * nw / size))
    # the crop keeps the marked mass: each output cell averages an equal share of the image's box
    box_area = (frame * nh / size) * (frame * nw / size)
    assert cropped[0, 0].mean() * box_area == pytest.approx(float(marker[0, 0].sum()), rel=1e-5)
    grid = (h // 16, w // 16)
    expected = torch.zeros(grid, dtype=torch.bool)
    expected[rows[0] // 16 : rows[1] // 16, cols[0] // 16 : cols[1] // 16] = True
    tokens = pool_to_grid(cropped, grid)[1, 2]
    assert torch.equal(tokens > 0.5, expected)
    assert tokens[expected].min() > 0.6 and tokens[~expected].max() < 0.15
    assert not torch.equal(pool_to_grid(marker, grid)[1, 2] > 0.5, expected)  # the padded frame misplaces it


@pytest.mark.parametrize(("shape", "token"), [((64, 128), (2, 5)), ((48, 112), (1, 4)), ((128, 64), (5, 2))])
def test_a_structure_targets_land_on_its_tokens(lite_teacher, shape, token):
    """Non-square image with a bright structure filling one token vs the same image without it: the
    visual targets (and, prompted with the structure's box, its fusion target) change most on that token."""
    h, w = shape
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    without = 0.3 + 0.1 * yy + 0.05 * xx + 0.02 * torch.randn(h, w, generator=generator)
    without[0, 0], without[-1, -1] = 0.0, 1.0  # the same min-max normalisation for both images
    block = (slice(16 * token[0], 16 * token[0] + 16), slice(16 * token[1], 16 * token[1] + 16))
    with_structure = without.clone()
    with_structure[block] = 1.0
    label = torch.zeros(h, w, dtype=torch.long)
    label[block] = 1
    images = torch.stack([without, with_structure])[:, None]
    out = lite_teacher(images, labels=torch.stack([label, label])[:, None])
    assert out.valid[:, 0].all()
    grid = [h // 16, w // 16]
    targets = distillation_targets(out, grid)
    fusion_organ = targets["fusion"][:, :256]  # class 1's 256 channels
    for name, target in [*((k, targets[k]) for k in out.features), ("fusion", fusion_organ)]:
        change = (target[1] - target[0]).norm(dim=0)
        assert divmod(int(change.argmax()), grid[1]) == token, (name, change)


def test_painter_order_lets_a_nested_class_win_and_sums_to_one():
    organ = torch.zeros(8, 8)
    organ[1:7, 1:7] = 0.9
    lesion = torch.zeros(8, 8)
    lesion[3:5, 3:5] = 0.8
    probs = compose_class_probs(torch.stack([organ, lesion])[None], torch.tensor([[True, True]]))
    assert torch.allclose(probs.sum(1), torch.ones(1, 8, 8))
    assert probs[0, :, 4, 4].argmax() == 2 and probs[0, :, 2, 2].argmax() == 1 and probs[0, :, 0, 0].argmax() == 0
    assert probs[0, :, 4, 4].tolist() == pytest.approx([0.1 * 0.2, 0.9 * 0.2, 0.8])


def test_3d_runs_slice_wise_and_restacks(lite_teacher):
    image, label = _phantom(shape=(32, 32), seed=5)
    volume = torch.cat([image, image.flip(-1), image.flip(-2)], 1)[:, None]  # (1, 1, 3, 32, 32): slices on axis 0
    labels = torch.cat([label, label.flip(-1), torch.zeros_like(label)], 1)[:, None]
    teacher = lite_teacher
    teacher.slice_axis, teacher.slice_batch = 0, 2
    try:
        out = teacher(volume, labels=labels, with_fusion=False)
    finally:
        teacher.slice_axis, teacher.slice_batch = 2, 8
    assert out.probs.shape == (1, 3, 3, 32, 32)
    assert out.features["enc1"].shape == (1, 160, 3, 64, 64)
    assert out.valid.shape == (1, 3, 2) and not out.valid[0, 2].any()
    assert out.fusion is None
    # each restacked slice equals the 2D teacher on that slice
    slice1 = lite_teacher(volume[:, :, 1], labels=labels[:, :, 1], with_fusion=False)
    assert torch.allclose(out.probs[:, :, 1], slice1.probs, atol=1e-5)
    assert torch.allclose(out.features["enc3"][:, :, 1], slice1.features["enc3"], atol=1e-5)
    # the slice without labels abstains: uniform
    assert torch.allclose(out.probs[:, :, 2], torch.full_like(out.probs[:, :, 2], 1 / 3))


def test_3d_non_square_slices_restack_cropped_maps(lite_teacher):
    image, label = _phantom(shape=(32, 16), seed=6)
    volume = torch.stack([image, image.flip(-1)], -1)  # (1, 1, 32, 16, 2): 32x16 slices on axis 2
    labels = torch.stack([label, label.flip(-1)], -1)
    out = lite_teacher(volume, labels=labels)
    assert out.features["enc1"].shape == (1, 160, 64, 32, 2) and out.fusion.shape == (1, 2, 256, 64, 32, 2)
    assert out.embedding.shape == (1, 256, 64, 64, 2)
    slice1 = lite_teacher(volume[..., 1], labels=labels[..., 1])
    assert torch.allclose(out.features["enc2"][..., 1], slice1.features["enc2"], atol=1e-5)
    assert torch.allclose(out.fusion[..., 1], slice1.fusion, atol=1e-5)


def test_teacher_is_frozen_and_its_outputs_can_be_loss_targets(lite_teacher):
    assert not any(p.requires_grad for p in lite_teacher.parameters())
    lite_teacher.train()
    assert not lite_teacher.training and not lite_teacher.model.image_encoder.training
    before = {k: v.clone() for k, v in lite_teacher.state_dict().items()}
    image, label = _phantom(shape=(32, 32))
    out = lite_teacher(image, labels=label)
    student_feature = torch.zeros(1, 160, 64, 64, requires_grad=True)
    projection = torch.nn.Conv2d(160, 160, 1)
    loss = ((projection(student_feature) - out.features["enc1"]) ** 2).mean() + (
        out.probs * projection.weight.sum()
    ).mean()
    optimizer = torch.optim.SGD([student_feature, *projection.parameters()], lr=1.0)
    loss.backward()
    optimizer.step()
    assert student_feature.grad is not None
    assert all(p.grad is None for p in lite_teacher.parameters())
    after = lite_teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_explicit_prompts_and_bad_inputs(lite_teacher):
    image, _ = _phantom(shape=(32, 32))
    prompts = Prompts(valid=torch.tensor([[True, False]]), boxes=torch.tensor([[[4.0, 4.0, 20.0, 24.0], [0, 0, 0, 0]]]))
    out = lite_teacher(image, prompts=prompts, with_fusion=False)
    assert out.valid.tolist() == [[True, False]] and out.probs[0, 1].max() > 0.5
    with pytest.raises(ValueError, match="expected"):
        lite_teacher(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="prompt_type"):
        GeneralizedTeacher(prompt_type="scribble")
