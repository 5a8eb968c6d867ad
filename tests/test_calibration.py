"""Temperature scaling of both teachers (custom/handlers/calibration.py)."""

import json
import math

import pytest
import torch
from ignite.engine import Engine
from monai.inferers import SimpleInferer

from custom.handlers.calibration import (
    TeacherCalibration,
    class_nll,
    fit_temperature,
    temper_masks,
)
from custom.teachers.generalized import compose_class_probs
from tests.conftest import configured


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with():
    g = torch.Generator().manual_seed(0)
    logits = 4.0 * torch.randn(20000, 3, generator=g)
    truth = torch.multinomial(torch.softmax(logits / 2.5, 1), 1, generator=g)[:, 0]
    where = torch.ones_like(truth, dtype=torch.bool)

    def nll(t: float) -> float:
        return class_nll(torch.log_softmax(logits / t, 1)[:, :, None], truth[:, None], where[:, None])

    assert fit_temperature(nll) == pytest.approx(2.5, rel=0.05)


def test_tempered_masks_broadcast_one_temperature_per_class():
    logits = torch.tensor([math.log(9.0), 0.0, -2.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(temper_masks(logits, 1.0), torch.sigmoid(logits).double())
    tempered = temper_masks(logits, torch.tensor([2.0, 1.0, 0.5]))
    assert tempered[0, 0, 0, 0] == pytest.approx(1 / (1 + math.exp(-math.log(9.0) / 2)))
    assert tempered[0, 1, 0, 0] == pytest.approx(0.5) and tempered[0, 2, 0, 0] == pytest.approx(1 / (1 + math.exp(4)))
    unprompted = torch.full((1, 1, 2, 2), float("-inf"))
    assert temper_masks(unprompted, 3.0).eq(0).all()


def _overconfident_ema() -> torch.nn.Module:
    """Logits (-20x, 20x, 0): class 1 wherever the image is bright, near-certain either way."""
    ema = torch.nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([-20.0, 20.0, 0.0]).view(3, 1, 1, 1))
        ema.bias.zero_()
    return ema


def test_calibration_softens_an_overconfident_ema_teacher_and_sets_both_temperatures(lite_teacher, tmp_path):
    """The EMA teacher is certain but wrong on a rim of every structure: the fitted temperature is
    above 1 and lowers its NLL and ECE; the generalized teacher gets one temperature per class, which its
    mask decoder then applies (what it outputs equals the fit's tempered masks), and its stored outputs
    are kept (logits, tempered when read)."""
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss

    cases = []
    for shift in (0, 3):
        image = torch.full((1, 48, 40), -1.0)
        image[:, 8 + shift : 24 + shift, 10:26] = 1.0
        label = torch.zeros(1, 48, 40)
        label[:, 11 + shift : 27 + shift, 12:28] = 1  # the truth is offset from what the EMA sees
        cases.append({"image": image, "label": label})
    with configured(lite_teacher, mask_temperature=1.0):
        step = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), _overconfident_ema(), lite_teacher)
        step._generalized_memo["stored"] = None
        handler = TeacherCalibration(step, cases, SimpleInferer(), output_file=tmp_path / "calibration.jsonl")
        engine = Engine(lambda e, b: None)
        handler.attach(engine)
        engine.run([0], max_epochs=1)
        records = [json.loads(line) for line in (tmp_path / "calibration.jsonl").read_text().splitlines()]
        assert len(records) == 2 == len(handler.records)  # at the start and after the epoch
        spec = records[-1]["specialized"]
        assert spec["temperature"] > 1.5 and spec["nll"][1] < spec["nll"][0] and spec["ece"][1] < spec["ece"][0]
        assert step.specialized_temperature == pytest.approx(spec["temperature"], rel=1e-3)
        gen = records[-1]["generalized"]
        assert len(gen["temperature"]) == 2 and gen["nll"][1] <= gen["nll"][0] + 1e-6
        assert torch.allclose(lite_teacher.mask_temperature, torch.tensor(gen["temperature"]), rtol=1e-3)
        assert "stored" in step._generalized_memo  # logits: the new temperature applies to them
        image = cases[0]["image"][None]
        prompts = lite_teacher.make_prompts(torch.softmax(_overconfident_ema()(image), 1))
        tempered = lite_teacher(image, prompts=prompts, with_fusion=False).probs
        with configured(lite_teacher, mask_temperature=1.0):
            out = lite_teacher(image, prompts=prompts, with_fusion=False)
        expected = compose_class_probs(temper_masks(out.mask_logits, lite_teacher.mask_temperature), out.valid)
        assert torch.allclose(tempered, expected.float(), atol=1e-5)


def test_calibration_none_attaches_nothing_and_an_unknown_mode_is_an_error():
    engine = Engine(lambda e, b: None)
    TeacherCalibration(None, [], SimpleInferer(), mode="none").attach(engine)
    assert not engine.has_event_handler(TeacherCalibration.__call__)
    with pytest.raises(ValueError, match="calibration"):
        TeacherCalibration(None, [], SimpleInferer(), mode="platt")
