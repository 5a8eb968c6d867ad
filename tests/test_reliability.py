"""Each teacher's Dice per class and the class owners of ``teachers="by_class"`` (custom/handlers/reliability.py)."""

import math

import pytest
import torch
from ignite.engine import Engine
from monai.inferers import SimpleInferer

from custom.handlers.reliability import TeacherReliability, class_dice, owners_from_dice
from tests.conftest import configured


def test_class_dice_pools_the_cases_voxels_and_is_nan_for_a_class_in_neither():
    preds = [torch.tensor([[0, 1, 1, 0]]), torch.tensor([[1, 1, 0, 0, 0]])]
    truths = [torch.tensor([[0, 1, 0, 0]]), torch.tensor([[1, 0, 0, 0, 2]])]
    dice = class_dice(preds, truths, num_classes=4)
    assert dice[0] == pytest.approx(2 * 2 / (4 + 2))  # class 1: overlap 2, predicted 4, true 2
    assert dice[1] == 0.0 and math.isnan(dice[2])  # class 2 missed; class 3 nowhere
    assert owners_from_dice([0.5, 0.2, float("nan")], [0.5, 0.3, float("nan")]).tolist() == [False, True, False]


class _FixedPrediction(torch.nn.Module):
    """An EMA teacher that predicts the same class map (2D or 3D) whatever the image (confident logits)."""

    def __init__(self, classes: torch.Tensor, num_classes: int = 3) -> None:
        super().__init__()
        self.logits = 10.0 * torch.nn.functional.one_hot(classes, num_classes).movedim(-1, 0)[None].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), *self.logits.shape[1:])


def _case():
    """A non-square image: a bright rectangle (class 1) and a brighter disk (class 2); the EMA teacher gets
    the rectangle exactly but paints the disk as its bounding square."""
    h, w = 64, 48
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    truth = torch.zeros(h, w, dtype=torch.long)
    truth[6:26, 8:40] = 1
    disk = (yy - 45) ** 2 + (xx - 24) ** 2 <= 11**2
    truth[disk] = 2
    image = torch.full((1, h, w), -1.0)
    image[0][truth == 1] = 1.0
    image[0][truth == 2] = 2.0
    ema_classes = truth.clone()
    ema_classes[disk] = 0
    ema_classes[34:57, 13:36] = 2
    return image, truth, ema_classes


def test_each_class_goes_to_the_teacher_with_the_higher_dice_and_the_gate_reads_the_owners(lite_teacher):
    """LiteMedSAM, prompted with the square's box, finds the disk better than the square does; the EMA
    teacher's rectangle is exact. So class 1 stays the EMA teacher's, class 2 goes to LiteMedSAM, at the
    start and after every epoch, and the stage-2 gate fuses the two maps by those owners."""
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss

    image, truth, ema_classes = _case()
    ema = _FixedPrediction(ema_classes)
    with configured(lite_teacher, mask_temperature=1.0):
        step = SemiSupervisedIteration(EntropyGate("by_class", "none"), PseudoLabelLoss(), ema, lite_teacher)
        handler = TeacherReliability(step, [{"image": image, "label": truth[None].float()}], SimpleInferer())
        engine = Engine(lambda e, b: None)
        handler.attach(engine)
        engine.run([0], max_epochs=1)
        assert [r["iteration"] for r in handler.records] == [0, 1]
        record = engine.state.reliability
        square, disk = int((ema_classes == 2).sum()), int((truth == 2).sum())
        assert record["specialized"] == pytest.approx([1.0, round(2 * disk / (disk + square), 4)])
        assert record["generalized"][1] > record["specialized"][1] and record["generalized"][0] < 1.0
        assert record["owners"] == ["specialized", "generalized"] and step.class_owners.tolist() == [False, True]
        spec, gen, gated = step.pseudo_labels(image[None])
        expected = EntropyGate("by_class", "none")(spec, gen, 0.0, owners=torch.tensor([False, True]))
        assert torch.equal(gated.pseudo_label, expected.pseudo_label)
        assert gated.from_generalized[0, 0][truth == 2].float().mean() > 0.9  # the disk from LiteMedSAM
        assert not gated.from_generalized[0, 0][truth == 1].any()  # the rectangle from the EMA teacher


def test_reliability_attaches_only_to_a_by_class_gate(lite_teacher):
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss

    step = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), torch.nn.Conv2d(1, 3, 1), lite_teacher)
    engine = Engine(lambda e, b: None)
    TeacherReliability(step, [], SimpleInferer()).attach(engine)
    assert not engine.has_event_handler(TeacherReliability.__call__)
    assert step.class_owners is None


def test_volumes_are_measured_slice_by_slice_for_any_class_count(tmp_path):
    """A 3D patch with four classes: LiteMedSAM sees its slices along the slice axis; each foreground class
    gets a Dice per teacher and an owner, and the gate fuses the volumes by them."""
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss
    from custom.teachers.generalized import GeneralizedTeacher

    truth = torch.zeros(48, 32, 3, dtype=torch.long)
    truth[4:20, 6:26] = 1
    truth[26:40, 4:14] = 2
    truth[26:44, 18:28] = 3
    image = (truth.float() - 1.0)[None]
    ema_classes = truth.clone()
    ema_classes[ema_classes == 3] = 0  # the EMA teacher misses class 3 entirely
    ema = _FixedPrediction(ema_classes, num_classes=4)
    teacher = GeneralizedTeacher("litemedsam", num_classes=4, slice_axis=2)
    step = SemiSupervisedIteration(EntropyGate("by_class", "none"), PseudoLabelLoss(), ema, teacher)
    handler = TeacherReliability(step, [{"image": image, "label": truth[None].float()}], SimpleInferer())
    record = handler.measure(torch.device("cpu"))
    assert record["specialized"][:2] == [1.0, 1.0] and record["specialized"][2] == 0.0
    assert len(record["generalized"]) == 3 and record["owners"][:2] == ["specialized", "specialized"]
    # class 3 has no prompt (the EMA teacher never predicts it), so LiteMedSAM cannot win it either
    assert record["generalized"][2] == 0.0 and record["owners"][2] == "specialized"
    step.set_class_owners(torch.tensor([False, True, False]))
    spec, gen, gated = step.pseudo_labels(image[None])
    assert gated.pseudo_label.shape == (1, 1, 48, 32, 3)
    assert torch.equal(gated.from_generalized[0, 0], gated.pseudo_label[0, 0] == 2)
