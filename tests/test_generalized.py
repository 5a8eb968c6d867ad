import math

import numpy as np
import pytest
import torch

from custom.data.phantoms import PhantomConfig, make_case
from custom.teachers.generalized import GeneralizedTeacher, compose_class_probs
from custom.teachers.prompts import Prompts


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
    assert out.embedding.shape == (2, 256, 64, 64)
    assert set(out.features) == {"enc1", "enc2", "enc3"}
    assert out.features["enc1"].shape == (2, 160, 64, 64) and out.features["enc3"].shape == (2, 320, 64, 64)
    assert out.fusion.shape == (2, 2, 256, 64, 64)
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
