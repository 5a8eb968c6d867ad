import math

import numpy as np
import pytest
import torch
from conftest import configured

from custom.data.phantoms import PhantomConfig, make_case
from custom.losses.distillation import pool_to_grid
from custom.losses.pseudo_label import EntropyGate, shannon_entropy
from custom.teachers.generalized import GeneralizedTeacher, compose_class_probs
from custom.teachers.mask_decoder import decode_masks
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


def _two_discs(centres, h=128, w=128, radius=12, seed=0):
    """A grey image with two bright discs of one class far apart, and its label."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    label = torch.zeros(h, w, dtype=torch.long)
    for cy, cx in centres:
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
    image = 0.3 + 0.05 * yy / h + 0.4 * label.float() + 0.03 * torch.randn(h, w, generator=g)
    return image[None, None], label[None, None]


@pytest.mark.parametrize("centres", [((32, 30), (96, 100)), ((64, 20), (64, 108))])
def test_one_box_per_component_segments_two_far_apart_discs(lite_teacher, centres):
    """One box per class spans both discs and the background between; one box per disc, masks united,
    recovers both (Dice 0.26 / 0.55 with one box, 0.99 / 0.99 with a box per disc, on this machine)."""
    image, label = _two_discs(centres)
    one_box = lite_teacher(image, labels=label)
    with configured(lite_teacher, box_mode="component"):
        per_disc = lite_teacher(image, labels=label)
        prompts = lite_teacher.make_prompts(label)
    assert prompts.components[0, 0].tolist() == [True, True, False, False]
    dice_one = _dice(one_box.probs.argmax(1) == 1, label[:, 0] == 1)
    dice_per = _dice(per_disc.probs.argmax(1) == 1, label[:, 0] == 1)
    print(f"two discs at {centres}: Dice one box per class {dice_one:.3f}, one box per component {dice_per:.3f}")
    assert dice_per > 0.95 and dice_per > dice_one + 0.3
    # the same output contract: shapes, validity, a proper distribution, fusion for the prompted class
    assert per_disc.probs.shape == one_box.probs.shape and torch.equal(per_disc.valid, one_box.valid)
    assert torch.allclose(per_disc.probs.sum(1), torch.ones(1, 128, 128), atol=1e-5)
    assert per_disc.fusion.shape == one_box.fusion.shape and per_disc.fusion[0, 1].abs().max() == 0
    targets = distillation_targets(per_disc, [8, 8])  # stage 1's targets work unchanged
    assert targets["fusion"].shape == (1, 512, 8, 8) and targets["valid"].tolist() == [[True, False]]


def test_component_mode_in_3d_is_slice_wise(lite_teacher):
    image_a, label_a = _two_discs(((8, 8), (24, 24)), h=32, w=32, radius=4)
    image_b, label_b = _phantom(shape=(32, 32), seed=3)
    volume = torch.stack([image_a, image_b], -1)  # (1, 1, 32, 32, 2): slices on axis 2
    labels = torch.stack([label_a, label_b], -1)
    with configured(lite_teacher, box_mode="component"):
        out = lite_teacher(volume, labels=labels, with_fusion=False)
        slice0 = lite_teacher(image_a, labels=label_a, with_fusion=False)
    assert out.probs.shape == (1, 3, 32, 32, 2) and out.valid.shape == (1, 2, 2)
    assert torch.allclose(out.probs[..., 0], slice0.probs, atol=1e-5)


def test_uniform_abstention_shares_the_background_outside_the_prompted_masks(lite_teacher):
    """The lesion has no prompt in the second copy: with ``abstain="uniform"`` the teacher says nothing
    about it outside the organ's mask (background and lesion equally likely, entropy ln 2 where the organ
    is surely absent) and exactly what it said before inside; "zero" is today's output."""
    image, label = _phantom(shape=(64, 64), seed=2)
    assert (label == 2).any()
    images, labels = torch.cat([image, image]), torch.cat([label, label.clamp(max=1)])
    zero = lite_teacher(images, labels=labels, with_fusion=False)
    with configured(lite_teacher, abstain="uniform"):
        uniform = lite_teacher(images, labels=labels, with_fusion=False)
    assert torch.equal(uniform.valid, zero.valid) and zero.valid.tolist() == [[True, True], [True, False]]
    assert torch.equal(uniform.probs[0], zero.probs[0])  # every class prompted: nothing to abstain on
    z, u = zero.probs[1], uniform.probs[1]
    inside = z[1] > 0.5  # the organ's mask (with only the organ prompted, its channel is its mask)
    assert inside.any() and (~inside).any()
    assert torch.equal(u[:, inside], z[:, inside])  # unchanged inside the prompted mask
    assert torch.equal(u[1], z[1])  # the prompted class keeps its share everywhere
    outside = ~inside
    assert torch.equal(u[0][outside], u[2][outside]) and torch.allclose(u[0][outside], z[0][outside] / 2)
    assert torch.allclose(u.sum(0), torch.ones(64, 64), atol=1e-6)
    far = outside & (z[1] < 1e-3)
    entropy_u, entropy_z = shannon_entropy(u[None])[0, 0], shannon_entropy(z[None])[0, 0]
    assert far.float().mean() > 0.3
    assert torch.allclose(entropy_u[far], torch.full_like(entropy_u[far], math.log(2)), atol=0.01)
    assert entropy_z[far].max() < 0.01  # today: near-certain background where the lesion may lie
    # an unsure specialized teacher (entropy 0.64 < ln 2) now wins the gate there instead of losing it
    spec = torch.tensor([0.8, 0.1, 0.1]).view(1, 3, 1, 1).expand(1, 3, 64, 64)
    gate = EntropyGate("both")
    assert gate(spec, z[None], 10.0).from_generalized[0, 0][far].all()
    assert not gate(spec, u[None], 10.0).from_generalized[0, 0][far].any()
    # an image without any prompt stays uniform over all classes
    with configured(lite_teacher, abstain="uniform"):
        nothing = lite_teacher(image, with_fusion=False)
    assert torch.allclose(nothing.probs, torch.full_like(nothing.probs, 1 / 3))
    with pytest.raises(ValueError, match="abstain"):
        compose_class_probs(torch.zeros(1, 2, 4, 4), torch.ones(1, 2, dtype=torch.bool), abstain="half")


def _todays_teacher(teacher: GeneralizedTeacher, images: torch.Tensor, labels: torch.Tensor):
    """The teacher's 2D box pipeline as it was before per-component prompts and uniform abstention,
    written out: one exact box per present class, every prompt through the decoder, painter's order with
    probability 0 for an unprompted class. Returns ``(probs, fusion, valid)``."""
    b, c = len(images), teacher.num_classes - 1
    h, w = images.shape[-2:]
    valid = torch.zeros(b, c, dtype=torch.bool)
    boxes = torch.zeros(b, c, 4)
    for i in range(b):
        for k in range(c):
            ys, xs = torch.nonzero(labels[i, 0] == k + 1, as_tuple=True)
            if ys.numel():
                valid[i, k] = True
                boxes[i, k] = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
    with torch.inference_mode():
        embedding = teacher.encode(images)["embedding"]
        idx_i, idx_k = torch.nonzero(valid, as_tuple=True)
        nh, nw = teacher._resized_size(h, w)
        scale = torch.tensor([nw / w, nh / h])
        sparse, dense = teacher.model.prompt_encoder(
            points=None, boxes=boxes[idx_i, idx_k] * scale.repeat(2), masks=None
        )
        pe = teacher.model.prompt_encoder.get_dense_pe()
        low_res, tokens = decode_masks(teacher.model.mask_decoder, embedding, pe, sparse, dense, idx_i)
        mask_probs = torch.zeros(b, c, h, w)
        mask_probs[idx_i, idx_k] = torch.sigmoid(teacher.postprocess(low_res, (h, w)))[:, 0]
        fusion = torch.zeros(b, c, *embedding.shape[1:])
        fusion[idx_i, idx_k] = tokens.transpose(1, 2).reshape(len(idx_i), *embedding.shape[1:])
        probs = torch.zeros(b, c + 1, h, w)
        probs[:, 0] = 1.0
        area = (mask_probs > 0.5).flatten(2).sum(-1).float() + mask_probs.flatten(2).mean(-1)
        for i in range(b):
            order = [int(k) for k in torch.argsort(area[i], descending=True) if valid[i, k]]
            if not order:
                probs[i] = 1.0 / (c + 1)
            for k in order:
                probs[i] = probs[i] * (1 - mask_probs[i, k])
                probs[i, k + 1] += mask_probs[i, k]
        return probs, teacher.crop_to_image(fusion, (h, w)), valid


def test_defaults_reproduce_todays_outputs_bit_for_bit(lite_teacher):
    """The case of ``test_2d_output_shapes_ranges_and_abstention``: the default settings, and the new
    switches set to their defaults explicitly, give exactly what the pipeline gave before them."""
    image, label = _phantom(shape=(64, 48), seed=4)
    images, labels = torch.cat([image, image]), torch.cat([label, label.clamp(max=1)])
    probs, fusion, valid = _todays_teacher(lite_teacher, images, labels)
    out = lite_teacher(images, labels=labels)
    assert torch.equal(out.probs, probs) and torch.equal(out.fusion, fusion) and torch.equal(out.valid, valid)
    defaults = {"box_mode": "class", "min_component_size": 4, "max_components": 4, "prompt_min_confidence": 0.0}
    with configured(lite_teacher, abstain="zero", **defaults):
        explicit = lite_teacher(images, labels=labels)
    assert torch.equal(explicit.probs, probs) and torch.equal(explicit.fusion, fusion)
    built = GeneralizedTeacher("litemedsam", num_classes=3)
    assert (built.box_mode, built.min_component_size, built.max_components) == ("class", 4, 4)
    assert (built.prompt_min_confidence, built.abstain) == (0.0, "zero")


def test_feature_channels_from_the_shape_only_pass_match_real_features(lite_teacher):
    real = lite_teacher.encode(torch.randn(1, 1, 40, 32))
    assert lite_teacher.feature_channels == {k: real[k].shape[1] for k in lite_teacher.feature_names}
    assert all(p.device.type == "cpu" for p in lite_teacher.parameters())  # the weights stay where they were


def test_bad_switches_are_refused():
    with pytest.raises(ValueError, match="box_mode"):
        GeneralizedTeacher(box_mode="blob")
    with pytest.raises(ValueError, match="abstain"):
        GeneralizedTeacher(abstain="half")
    with pytest.raises(ValueError, match="max_components"):
        GeneralizedTeacher(max_components=0)
