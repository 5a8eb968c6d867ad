"""Stage 2 pieces: the EMA teacher, the shared spatial augmentation, the two data streams."""

import math

import pytest
import torch
from conftest import CONFIGS, TINY_NET, configured
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from custom.data.streams import TwoStreamLoader
from custom.engines.uncol import random_flip_rot90


def _ema_from_config(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"bundle_root": str(tmp_path), "device": "$torch.device('cpu')", **TINY_NET})
    return parser.get_parsed_content("network"), parser.get_parsed_content("ema"), parser


def test_ema_teacher_moves_toward_the_student_at_the_configured_rate(tmp_path):
    student, ema, parser = _ema_from_config(tmp_path)
    decay = parser.get_parsed_content("ema_decay")
    warmup = parser.get_parsed_content("ema#warmup_iters")
    assert decay == 0.99
    teacher = ema.ema_model
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training

    def step(engine, _):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1.0)  # the student moves by +1 every iteration

    engine = Engine(step)
    before = {}
    engine.add_event_handler(
        Events.ITERATION_STARTED, lambda _: before.update({k: v.clone() for k, v in teacher.state_dict().items()})
    )
    ema.attach(engine)
    engine.run([0] * (warmup + 3), max_epochs=1)
    # after warm-up: ema <- decay * ema + (1 - decay) * student, for every parameter
    assert engine.state.ema_momentum == pytest.approx(1 - decay)
    for name in ("patch_embed.weight", "blocks.3.mlp.linear1.weight", "head.conv.conv.bias"):
        expected = decay * before[name] + (1 - decay) * student.state_dict()[name]
        assert torch.allclose(teacher.state_dict()[name], expected, atol=1e-5), name
    assert all(p.grad is None for p in teacher.parameters())


def test_flip_rot90_applies_one_transform_to_every_tensor():
    g = torch.Generator().manual_seed(0)
    image = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    label = image.clone().long()
    mask = image.clone() * 2
    out_image, out_label, out_mask = random_flip_rot90([image, label, mask], generator=g)
    assert torch.equal(out_image.long(), out_label) and torch.equal(out_image * 2, out_mask)
    seen = set()
    for _ in range(20):
        (out,) = random_flip_rot90([image[:1]], generator=g)
        seen.add(tuple(out.flatten()[:3].tolist()))
    assert len(seen) == 8  # all 4 rotations x 2 flips occur


def test_non_square_batches_keep_their_shape_under_the_random_flip_rotation():
    g = torch.Generator().manual_seed(0)
    image = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
    seen = set()
    for _ in range(30):
        out_image, out_label = random_flip_rot90([image, image.long()], generator=g)
        assert out_image.shape == image.shape and torch.equal(out_image.long(), out_label)
        seen.add(tuple(out_image[0].flatten()[:3].tolist()))
    assert len(seen) == 4  # identity, half-turn and the two flips: every shape-preserving view occurs


def test_two_streams_iterate_in_lockstep():
    loader = TwoStreamLoader([1, 2, 3], ["a", "b"])
    assert len(loader) == 2
    assert list(loader) == [{"labelled": 1, "unlabelled": "a"}, {"labelled": 2, "unlabelled": "b"}]


def test_generalized_output_is_reused_only_for_identical_prompts(lite_teacher):
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss
    from custom.networks.student import UnCoLStudent

    torch.manual_seed(0)
    ema = UnCoLStudent(spatial_dims=2, **{"hidden_size": 48, "mlp_dim": 96, "num_heads": 2, "feature_size": 8})
    weak = torch.randn(2, 1, 32, 32)
    reusing = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), ema, lite_teacher)
    fresh = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), ema, lite_teacher, reuse_generalized=False)
    first = reusing.teacher_probs(weak)[1]
    second = reusing.teacher_probs(weak)[1]  # same images, same EMA, same boxes: no decoder call
    assert reusing.generalized_reused == 2 and reusing.generalized_calls == 4
    assert torch.equal(first, second) and torch.equal(second, fresh.teacher_probs(weak)[1])
    with torch.no_grad():  # the EMA teacher changes: new prompts, so the decoder runs again
        for p in ema.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    changed = reusing.teacher_probs(weak)[1]
    assert torch.equal(changed, fresh.teacher_probs(weak)[1])


def test_prompts_count_as_the_same_within_the_reuse_tolerance():
    from custom.engines.uncol import same_prompts
    from custom.teachers.prompts import Prompts

    valid = torch.tensor([[True, False]])
    boxes = torch.tensor([[[10.0, 12.0, 30.0, 40.0], [0.0, 0.0, 0.0, 0.0]]])
    moved = boxes + torch.tensor([1.0, -1.0, 0.0, 1.0])
    assert same_prompts(Prompts(valid, boxes), Prompts(valid, boxes))
    assert not same_prompts(Prompts(valid, boxes), Prompts(valid, moved))  # exact by default
    assert same_prompts(Prompts(valid, boxes), Prompts(valid, moved), tolerance=1.0)
    assert not same_prompts(Prompts(valid, boxes), Prompts(valid, boxes + 2.0), tolerance=1.0)
    assert not same_prompts(Prompts(valid, boxes), Prompts(~valid, boxes), tolerance=5.0)  # other classes


def test_generalized_teacher_on_volumes_is_slice_wise_and_reused_per_slice(lite_teacher):
    """3D stage 2: the generalized teacher's pseudo-label probabilities equal its own slice-wise 3D
    output, and a volume that comes back with the same EMA prediction reuses every slice."""
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss

    torch.manual_seed(0)
    ema = torch.nn.Conv3d(1, 3, 3, padding=1)  # any 3-class voxel classifier stands in for the EMA student
    weak = torch.randn(1, 1, 32, 32, 2)
    step = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), ema, lite_teacher)
    spec, gen = step.teacher_probs(weak)
    assert gen.shape == spec.shape == (1, 3, 32, 32, 2)
    labels = spec.argmax(1, keepdim=True)
    assert labels.unique().numel() == 3, "both foreground classes are prompted"
    expected = lite_teacher(weak, labels=labels, with_fusion=False).probs
    assert torch.allclose(gen, expected, atol=1e-5)
    assert not torch.allclose(gen[..., 0], gen[..., 1])  # each slice has its own output
    assert step.reused_share == 0.0
    again = step.teacher_probs(weak)[1]
    assert step.generalized_reused == 2 and step.generalized_calls == 4
    assert torch.equal(again, gen)
    assert step.reused_share == 1.0  # logged as generalized_reused: a share of the slices, not slices per volume


def test_a_slice_stride_prompts_every_kth_slice_and_leaves_the_rest_uniform(tmp_path):
    """3D stage 2 with ``slice_stride`` 2: the generalized teacher decodes half of each volume's slices (one
    offset a step, the same in every volume) and abstains on the others with the uniform distribution, so
    an entropy gate gives those slices to the specialized teacher."""
    from custom.engines.uncol import SemiSupervisedIteration, every_kth_slice
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss
    from custom.teachers.generalized import GeneralizedTeacher
    from custom.teachers.prompts import Prompts

    torch.manual_seed(0)
    lite_teacher = GeneralizedTeacher("litemedsam", num_classes=3, cache_dir=tmp_path)  # each slice encoded once
    ema = torch.nn.Conv3d(1, 3, 3, padding=1)
    weak = torch.randn(1, 1, 32, 32, 4)
    every = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), ema, lite_teacher, reuse_generalized=False)
    strided = SemiSupervisedIteration(
        EntropyGate("both"), PseudoLabelLoss(), ema, lite_teacher, reuse_generalized=False, slice_stride=2
    )
    full = every.teacher_probs(weak)[1]
    for _ in range(2):
        gen = strided.teacher_probs(weak)[1]
        decoded = [z for z in range(4) if not torch.allclose(gen[..., z], torch.full_like(gen[..., z], 1 / 3))]
        assert decoded in ([0, 2], [1, 3])
        assert torch.allclose(gen[..., decoded], full[..., decoded], atol=1e-5)
    # component slots are dropped with their slice: no prompt of an abstaining slice reaches the decoder
    prompts = Prompts(torch.ones(6, 2, dtype=torch.bool), components=torch.ones(6, 2, 3, dtype=torch.bool))
    kept = every_kth_slice(prompts, slices=3, stride=2, offset=1)
    assert kept.valid[:, 0].tolist() == [False, True, False, False, True, False]
    assert len(kept.prompt_index()[0]) == 2 * 2 * 3
    with pytest.raises(ValueError, match="slice_stride"):
        SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), ema, lite_teacher, slice_stride=0)


class _FixedPrediction(torch.nn.Module):
    """Stands in for the EMA student: returns confident logits of a fixed class map, whatever the input."""

    def __init__(self, labels: torch.Tensor, num_classes: int = 3) -> None:
        super().__init__()
        one_hot = torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, 1).float()
        self.logits = 10.0 * one_hot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), *self.logits.shape[1:])


def test_prompts_move_from_the_patch_to_the_slice_it_was_cut_from():
    from custom.engines.uncol import shift_prompts
    from custom.teachers.prompts import Prompts

    valid = torch.tensor([[True]])
    moved = shift_prompts(Prompts(valid, torch.tensor([[[1.0, 2.0, 5.0, 9.0]]]), torch.tensor([[[3.0, 4.0]]])), 32, 16)
    assert moved.boxes.tolist() == [[[17.0, 34.0, 21.0, 41.0]]]  # x (columns) + left, y (rows) + top
    assert moved.points.tolist() == [[[19.0, 36.0]]] and torch.equal(moved.valid, valid)


def test_generalized_teacher_on_whole_slices_is_cut_to_the_patch(tmp_path):
    """3D stage 2 with each patch's whole slices: the generalized teacher's probabilities are its output
    on the whole slices, prompted with the EMA teacher's boxes moved into the slice, cut to the patch;
    a patch covering the whole slice gives exactly what the patch alone gives."""
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss
    from custom.teachers.generalized import GeneralizedTeacher

    lite_teacher = GeneralizedTeacher(cache_dir=tmp_path)  # every call below shares the slices' encodings

    torch.manual_seed(0)
    context = torch.randn(1, 64, 48, 2)  # whole slices of 64 rows x 48 columns, the patch's 2 slices
    top, left = 32, 16
    patch_labels = torch.zeros(1, 32, 32, 2, dtype=torch.long)
    patch_labels[0, 4:12, 6:20, 0] = 1
    patch_labels[0, 18:28, 2:10, 0] = 2
    patch_labels[0, 10:20, 12:30, 1] = 2
    step = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), _FixedPrediction(patch_labels), lite_teacher)
    weak = context[None, :, top : top + 32, left : left + 32]
    starts = torch.tensor([[top, left, 0]])
    spec, gen = step.teacher_probs(weak, [context], starts)
    assert gen.shape == spec.shape == (1, 3, 32, 32, 2)
    slice_labels = torch.zeros(1, 1, 64, 48, 2, dtype=torch.long)  # the patch's classes placed in the slice
    slice_labels[..., top : top + 32, left : left + 32, :] = patch_labels
    expected = lite_teacher(context[None], labels=slice_labels, with_fusion=False, with_features=False).probs
    assert torch.allclose(gen, expected[..., top : top + 32, left : left + 32, :], atol=1e-5)
    assert not torch.allclose(gen, step.teacher_probs(weak)[1], atol=1e-2), "the patch alone is another input"
    again = step.teacher_probs(weak, [context], starts)[1]  # same slices, same window, same boxes: reused
    assert step.generalized_reused == 2 and torch.equal(again, gen)
    step.set_temperatures(1.0, torch.tensor([2.0, 0.5]))  # a recalibration keeps the stored masks ...
    recalibrated = step.teacher_probs(weak, [context], starts)[1]
    assert step.generalized_reused == 4
    with configured(lite_teacher, mask_temperature=torch.tensor([2.0, 0.5])):  # ... and tempers them anew
        fresh = lite_teacher(context[None], labels=slice_labels, with_fusion=False, with_features=False).probs
    assert torch.allclose(recalibrated, fresh[..., top : top + 32, left : left + 32, :], atol=1e-5)
    assert not torch.allclose(recalibrated, gen, atol=1e-2)
    lite_teacher.mask_temperature = 1.0

    whole = torch.zeros(1, 64, 48, 2, dtype=torch.long)
    whole[:, top : top + 32, left : left + 32] = patch_labels
    covering = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), _FixedPrediction(whole), lite_teacher)
    in_context = covering.teacher_probs(context[None], [context], torch.zeros(1, 3, dtype=torch.long))[1]
    assert torch.equal(in_context, covering.teacher_probs(context[None])[1])


def _component_prompts():
    from custom.teachers.prompts import Prompts

    components = torch.tensor([[[True, True], [True, False]]])  # (B, C, M): class 1 has two components
    boxes = torch.tensor([[[[10.0, 12.0, 30.0, 40.0], [50.0, 52.0, 60.0, 70.0]], [[5.0, 5.0, 9.0, 9.0], [0.0] * 4]]])
    return Prompts(components.any(-1), boxes, components=components)


def test_same_prompts_compares_every_component_box():
    from custom.engines.uncol import same_prompts
    from custom.teachers.prompts import Prompts

    a = _component_prompts()
    assert same_prompts(a, _component_prompts())
    second = _component_prompts()
    second.boxes[0, 0, 1, 2] += 2.0  # the second component of class 1 grows by 2 px
    assert not same_prompts(a, second, tolerance=1.0) and same_prompts(a, second, tolerance=2.0)
    first = _component_prompts()
    first.boxes[0, 0, 0] -= 1.0  # the first component moves 1 px
    assert not same_prompts(a, first) and same_prompts(a, first, tolerance=1.0)
    fewer = _component_prompts()
    fewer.components[0, 0, 1] = False  # a component dropped: the class is still prompted, the prompts differ
    fewer.boxes[0, 0, 1] = 0.0
    assert torch.equal(fewer.valid, a.valid) and not same_prompts(a, fewer, tolerance=100.0)
    per_class = Prompts(a.valid, a.boxes[:, :, 0])  # one box per class vs per component: never the same
    assert not same_prompts(a, per_class, tolerance=100.0) and not same_prompts(per_class, a, tolerance=100.0)
    assert same_prompts(a[0:1], a[torch.tensor([0])])  # slicing keeps every field


def test_stage2_prompts_per_component_from_the_ema_softmax_and_reuses_them(lite_teacher):
    """Stage 2 with every new switch on: the generalized teacher is prompted from the EMA teacher's
    softmax, so the confidence filter drops the blob it is unsure of; its output equals the teacher's own
    on those prompts, and an image that comes back with the same component boxes is reused."""
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss

    ema = torch.nn.Conv2d(1, 3, 1)  # logits (-x, x, 0): class 1 where the image is bright, surer the brighter
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([-1.0, 1.0, 0.0]).view(3, 1, 1, 1))
        ema.bias.zero_()
    weak = torch.full((2, 1, 32, 32), -1.0) + 0.05 * torch.randn(2, 1, 32, 32, generator=torch.Generator())
    weak[:, :, 2:11, 2:11] = 3.0  # p(class 1) = 0.95
    weak[:, :, 20:29, 20:29] = 0.5  # p(class 1) = 0.51: still the argmax, but unsure
    settings = {"box_mode": "component", "abstain": "uniform", "prompt_min_confidence": 0.7}
    with configured(lite_teacher, **settings):
        step = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), ema, lite_teacher)
        spec, gen = step.teacher_probs(weak)
        prompts = lite_teacher.make_prompts(spec)
        unfiltered = lite_teacher.make_prompts(spec.argmax(1, keepdim=True))
        assert unfiltered.components[:, 0].tolist() == [[True, True, False, False]] * 2
        assert prompts.components[:, 0].tolist() == [[True, False, False, False]] * 2  # only the sure blob
        assert prompts.boxes[0, 0, 0].tolist() == [2, 2, 10, 10] and prompts.valid.tolist() == [[True, False]] * 2
        expected = lite_teacher(weak, prompts=prompts, with_fusion=False).probs
        assert torch.allclose(gen, expected, atol=1e-5)
        far = torch.zeros(32, 32, dtype=torch.bool)
        far[16:, :12] = True  # far from the prompted blob: the unprompted lesion shares the background
        assert torch.equal(gen[:, 0][:, far], gen[:, 2][:, far])
        again = step.teacher_probs(weak)[1]
        assert step.generalized_reused == 2 and torch.equal(again, gen)
        with configured(lite_teacher, prompt_min_confidence=0.99):  # no region that sure: abstain everywhere
            unsure = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), ema, lite_teacher)
            assert torch.allclose(unsure.teacher_probs(weak)[1], torch.full_like(gen, 1 / 3))


def _step_setup(seed: int = 0):
    """A tiny student, a pixelwise EMA stand-in (1x1 conv: the pseudo-label at a pixel depends only on
    that pixel), and one labelled + unlabelled batch of 32x32 images (strong view = weak view)."""
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceCELoss

    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss
    from custom.networks.student import UnCoLStudent

    torch.manual_seed(seed)
    student = UnCoLStudent(2, 1, 3, hidden_size=48, mlp_dim=96, num_heads=2, feature_size=8)
    ema = torch.nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([-2.0, 2.0, 0.5]).view(3, 1, 1, 1))
    g = torch.Generator().manual_seed(seed)
    weak = torch.randn(2, 1, 32, 32, generator=g)
    labelled = {
        "image": torch.randn(2, 1, 32, 32, generator=g),
        "label": torch.randint(0, 3, (2, 1, 32, 32), generator=g),
    }
    batch = {"labelled": labelled, "unlabelled": {"image": weak, "image_strong": weak.clone()}}
    seen: dict = {}

    class Recorded(PseudoLabelLoss):
        def forward(self, logits, pseudo, mask, **nesting):
            seen.update(pseudo=pseudo, mask=mask, **nesting)
            return super().forward(logits, pseudo, mask, **nesting)

    step = SemiSupervisedIteration(EntropyGate("specialized"), Recorded(), ema, seed=seed)
    inputs = []
    original = student.forward_features
    student.forward_features = lambda x: (inputs.append(x.detach().clone()), original(x))[1]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    trainer = SupervisedTrainer(
        torch.device("cpu"),
        1,
        [batch],
        student,
        optimizer,
        DiceCELoss(to_onehot_y=True, softmax=True),
        iteration_update=step,
    )
    return trainer, step, ema, batch, seen, inputs


def test_pseudo_label_and_mask_stay_aligned_with_the_students_flipped_rotated_view():
    """The student sees the strong view after a random flip/rotation; the pseudo-label it is trained on
    is the EMA teacher's label of exactly the pixels it sees (recomputed on the transformed view)."""
    trainer, step, ema, batch, seen, inputs = _step_setup()
    step.set_schedule("entropy_threshold", 0.9)
    trainer.run()
    student_view = inputs[0][2:]  # labelled images first, then the strong unlabelled view
    assert not torch.equal(student_view, batch["unlabelled"]["image"])  # the seed draws a real transform
    with torch.no_grad():
        expected = torch.softmax(ema(student_view), 1)
    assert torch.equal(seen["pseudo"], expected.argmax(1, keepdim=True))
    entropy = -(expected * expected.clamp_min(1e-8).log()).sum(1, keepdim=True)
    assert torch.equal(seen["mask"], (entropy < 0.9).float())  # the threshold reached the gate
    assert 0 < seen["mask"].mean() < 1


def test_zero_unsupervised_weight_is_exactly_the_supervised_step():
    from monai.engines import SupervisedTrainer

    trainer, step, ema, batch, seen, inputs = _step_setup()
    step.set_schedule("entropy_threshold", 0.9)
    step.set_schedule("unsup_weight", 0.0)
    reference, *_ = _step_setup()
    plain = SupervisedTrainer(
        torch.device("cpu"), 1, [batch["labelled"]], reference.network, reference.optimizer, reference.loss_function
    )
    trainer.run()
    plain.run()
    for (name, a), b in zip(trainer.network.state_dict().items(), plain.network.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert seen["mask"].sum() > 0  # the pseudo term had voxels to train on, and weighed 0


def test_a_gate_without_a_threshold_is_an_error_not_keep_nothing():
    trainer, *_ = _step_setup()
    with pytest.raises(RuntimeError, match="no threshold"):
        trainer.run()


def test_class_guard_keeps_a_class_the_ema_teacher_never_predicts_out_of_the_wrong_pseudo_labels():
    """The pixelwise EMA teacher never predicts class 2; with the guard, the unlabelled pixels where its
    class-2 probability is highest (as many as the labelled batch's class-2 share) are not supervised."""
    from custom.losses.pseudo_label import EntropyGate

    trainer, step, ema, batch, seen, inputs = _step_setup()
    step.gate = EntropyGate("specialized", "none", guard="prior")
    trainer.run()
    student_view = inputs[0][2:]
    with torch.no_grad():
        p2 = torch.softmax(ema(student_view), 1)[:, 2:3]
    labels = batch["labelled"]["label"]
    expected = math.ceil(float((labels == 2).float().mean()) * p2.numel())  # the prior from this batch alone
    guarded = seen["mask"] == 0
    assert int(guarded.sum()) == expected and 0 < expected < p2.numel()
    assert float(p2[guarded].min()) >= float(p2[~guarded].max())  # exactly the most class-2-like pixels
    assert trainer.state.output[0]["gate_guarded"] == pytest.approx(expected / p2.numel())  # decollated: per item


def test_nesting_reads_which_class_lies_inside_which_off_the_labelled_batch():
    """With ``nesting="labelled"`` the loss is told that class 2 lies inside class 1 in the labelled
    labels (a lesion in an organ); with the default it is told nothing."""
    trainer, step, ema, batch, seen, inputs = _step_setup()
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: setattr(e.state, "gate_threshold", 0.9))
    label = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    label[..., 4:20, 4:24] = 1
    label[..., 8:12, 10:14] = 2
    batch["labelled"]["label"] = label
    trainer.run()
    assert "parents" not in seen
    trainer, step, ema, batch, seen, inputs = _step_setup()
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: setattr(e.state, "gate_threshold", 0.9))
    batch["labelled"]["label"] = label
    step.pseudo_loss.nesting = "labelled"
    trainer.run()
    assert seen["parents"] == [None, None, 1] and step.parents == [None, None, 1]


def test_copy_paste_trains_the_student_on_both_mixes_with_ground_truth_in_the_labelled_box():
    """The student's batch: the 2 labelled images, then 2 inward and 2 outward mixes; the pseudo-label
    loss sees the labelled targets (weight 1) where the labelled image shows, the EMA teacher's gated
    pseudo-label of the flipped view elsewhere."""
    from custom.engines.copy_paste import BidirectionalCopyPaste, random_boxes

    trainer, step, ema, batch, seen, inputs = _step_setup()
    step.set_schedule("entropy_threshold", 0.9)
    step.copy_paste = BidirectionalCopyPaste(ratio=0.5, seed=7)
    trainer.run()
    images, labels = batch["labelled"]["image"], batch["labelled"]["label"]
    student = inputs[0]
    assert student.shape[0] == 2 + 4 and torch.equal(student[:2], images)
    box = random_boxes((2, 1, 32, 32), 0.5, torch.Generator().manual_seed(7))
    from_labelled = torch.cat([box, ~box])
    assert torch.equal(student[2:][from_labelled], torch.cat([images, images])[from_labelled])
    assert torch.equal(seen["pseudo"][from_labelled], torch.cat([labels, labels])[from_labelled])
    assert bool((seen["mask"][from_labelled] == 1).all())
    view = torch.where(from_labelled, 0, student[2:])  # where the unlabelled (flipped) view shows
    with torch.no_grad():
        expected = torch.softmax(ema(view), 1)  # the pixelwise teacher labels each pixel on its own
    entropy = -(expected * expected.clamp_min(1e-8).log()).sum(1, keepdim=True)
    assert torch.equal(seen["pseudo"][~from_labelled], expected.argmax(1, keepdim=True)[~from_labelled])
    assert torch.equal(seen["mask"][~from_labelled], (entropy < 0.9).float()[~from_labelled])


def test_feature_dropout_reaches_the_decoder_for_the_unlabelled_rows_only():
    from custom.engines.uncol import drop_channels

    trainer, step, ema, batch, seen, inputs = _step_setup()
    step.set_schedule("entropy_threshold", 0.9)
    step.feature_dropout = 0.5
    encoded, decoded = [], []
    encode, decode = trainer.network.forward_features, trainer.network.decode
    trainer.network.forward_features = lambda x: (encoded.append(encode(x)), encoded[-1])[1]
    trainer.network.decode = lambda feats: (decoded.append(feats), decode(feats))[1]
    trainer.run()
    for name, x in decoded[0].items():
        clean = encoded[0][name]
        assert torch.equal(x[:2], clean[:2]), name  # the labelled rows reach the decoder as encoded
        per_channel = x[2:].flatten(2).abs().amax(2)
        dropped = per_channel == 0
        assert bool(dropped.any()) and bool((~dropped).any()), name  # whole channels dropped, not all
        kept = ~dropped[..., None].expand_as(x[2:].flatten(2))
        assert torch.allclose(x[2:].flatten(2)[kept], 2 * clean[2:].flatten(2)[kept]), name  # the rest scaled
    rows = {"a": torch.ones(3, 8, 4, 4, 4)}
    out = drop_channels(rows, 1, 0.5)["a"]
    assert torch.equal(out[:1], rows["a"][:1])  # rows before ``first`` untouched
    assert set(out[1:].unique().tolist()) <= {0.0, 2.0}  # the rest dropped or scaled by 1 / (1 - rate)


def test_the_soft_gate_needs_no_threshold_and_weights_the_pseudo_labels():
    from custom.losses.pseudo_label import EntropyGate

    trainer, step, ema, batch, seen, inputs = _step_setup()
    step.gate = EntropyGate("specialized", "soft")
    trainer.run()
    with torch.no_grad():
        expected = torch.softmax(ema(inputs[0][2:]), 1)
    entropy = -(expected * expected.clamp_min(1e-8).log()).sum(1, keepdim=True)
    assert torch.allclose(seen["mask"], 1 - entropy / math.log(3), atol=1e-6)
    assert "gate_entropy_threshold" not in trainer.state.output[0]


GATES = [("entropy", "entropy_threshold", 0.9), ("quantile", "keep_fraction", 0.5)]


@pytest.mark.parametrize("gate, name, value", GATES)
def test_each_gate_reads_its_own_schedule_and_logs_it_under_its_own_name(gate, name, value):
    from custom.losses.pseudo_label import EntropyGate

    other = "keep_fraction" if name == "entropy_threshold" else "entropy_threshold"
    for given in ({other: 0.01}, {other: 0.01, name: value}):  # the other gate's value is never read
        trainer, step, ema, batch, seen, inputs = _step_setup()
        step.gate = EntropyGate("specialized", gate)
        for key, v in given.items():
            step.set_schedule(key, v)
        if name not in given:
            with pytest.raises(RuntimeError, match=f"no threshold: attach a ScheduleHandler with its '{name}'"):
                trainer.run()
    trainer.run()
    out = trainer.state.output[0]
    assert out[f"gate_{name}"] == value and f"gate_{other}" not in out and "gate_threshold" not in out
    if gate == "quantile":  # half of each pseudo-class's pixels, however certain the teacher is
        assert out["gate_kept"] == pytest.approx(0.5, abs=0.01)
    assert step.scheduled(name) == value and step.gate_level() == value


def test_a_value_in_the_engine_state_still_reaches_the_step_and_the_old_name_is_refused():
    trainer, step, *_ = _step_setup()
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: setattr(e.state, "gate_threshold", 0.9))
    trainer.run()  # how configurations before 0.8 handed the gate its threshold
    assert trainer.state.output[0]["gate_entropy_threshold"] == 0.9 and step.gate_level(trainer) == 0.9
    with pytest.raises(ValueError, match="'entropy_threshold' .*'keep_fraction'"):
        step.set_schedule("gate_threshold", 0.9)


def test_handlers_interface_teachers_temperatures_class_counts_and_audited_pseudo_labels(lite_teacher):
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss

    ema = torch.nn.Conv2d(1, 3, 1)
    with configured(lite_teacher, mask_temperature=1.0):
        step = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), ema, lite_teacher)
        assert step.teachers == (ema, lite_teacher) and step.teachers.generalized is lite_teacher
        weak = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
        step.set_schedule("entropy_threshold", 0.9)
        spec, gen, gated = step.pseudo_labels(weak)
        assert step.generalized_calls == 0 and not step._generalized_memo  # nothing stored, nothing counted
        assert torch.equal(gated.mask, EntropyGate("both")(spec, gen, 0.9).mask)
        step.teacher_probs(weak)
        assert step._generalized_memo
        first = step.teacher_probs(weak)[1]
        step.set_temperatures(2.0, torch.tensor([1.5, 3.0]))
        assert step.specialized_temperature == 2.0 and lite_teacher.mask_temperature.tolist() == [1.5, 3.0]
        assert step._generalized_memo  # logits, which the new temperature does not make stale
        spec, gen = step.teacher_probs(weak)
        assert step.generalized_reused == 4 and not torch.allclose(gen, first, atol=1e-3)
        prompts = lite_teacher.make_prompts(spec)
        expected = lite_teacher(weak, prompts=prompts, with_fusion=False, with_features=False).probs
        assert torch.allclose(gen, expected, atol=1e-5)  # what the teacher gives at the new temperature
    specialized_only = SemiSupervisedIteration(EntropyGate("specialized"), PseudoLabelLoss(), ema, lite_teacher)
    assert specialized_only.teachers.generalized is None  # given, but not used
    assert specialized_only.class_voxels == (None, None)
    specialized_only.kept_class_voxels = torch.tensor([1, 2, 0])
    specialized_only.reset_class_voxels()
    assert specialized_only.class_voxels == (None, None)
