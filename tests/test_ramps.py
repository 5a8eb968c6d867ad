import math

import pytest
from ignite.engine import Engine

from custom.handlers.ramps import (
    KeptFractionSchedule,
    ScheduleHandler,
    ThresholdSchedule,
    WeightSchedule,
    gate_schedule,
    sigmoid_rampup,
)


def test_sigmoid_rampup_shape():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(500, 100) == 1.0


def test_threshold_schedule_start_middle_end():
    ln3 = math.log(3)
    ramped = ThresholdSchedule(num_classes=3, ramp_iters=100)
    assert ramped(0) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * ln3)
    assert ramped(50) == pytest.approx((0.75 + 0.25 * math.exp(-1.25)) * ln3)
    assert ramped(100) == pytest.approx(ln3) and ramped(1000) == pytest.approx(ln3)
    fixed = ThresholdSchedule(num_classes=3, ramp_iters=100, ramped=False, start=0.8)
    assert fixed(0) == fixed(50) == fixed(100) == pytest.approx(0.8 * ln3)


def test_kept_fraction_schedule_relaxes_or_tightens_and_the_gate_picks_its_schedule():
    relax = KeptFractionSchedule(ramp_iters=100, start=0.5, end=0.8)
    assert relax(0) == pytest.approx(0.5 + 0.3 * math.exp(-5)) and relax(100) == pytest.approx(0.8)
    tighten = KeptFractionSchedule(ramp_iters=100, start=0.9, end=0.6)
    assert tighten(0) > tighten(50) > tighten(100) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="kept fraction"):
        KeptFractionSchedule(ramp_iters=100, start=0.0)
    assert isinstance(gate_schedule("quantile", 4, 100), KeptFractionSchedule)
    entropy = gate_schedule("entropy", 4, 100)
    assert isinstance(entropy, ThresholdSchedule) and entropy(100) == pytest.approx(math.log(4))


class Recorder:
    """Takes scheduled values as the stage 2 iteration does (``set_schedule``)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def set_schedule(self, name: str, value: float) -> None:
        self.values[name] = value


def test_each_schedule_has_one_meaning_and_its_own_name():
    assert gate_schedule("entropy", 3, 10).name == "entropy_threshold"  # nats
    assert gate_schedule("quantile", 3, 10).name == "keep_fraction"  # a fraction of each pseudo-class
    assert WeightSchedule(1.0, 10).name == "unsup_weight"


def test_schedule_handler_hands_the_value_to_the_iteration_before_each_iteration():
    target = Recorder()
    seen = []
    engine = Engine(lambda e, b: seen.append((e.state.iteration, target.values["unsup_weight"])))
    ScheduleHandler(WeightSchedule(max_weight=2.0, ramp_iters=4), target).attach(engine)
    assert target.values == {"unsup_weight": pytest.approx(2.0 * sigmoid_rampup(0, 4))}  # set while configured
    engine.run([0] * 6, max_epochs=1)
    assert [i for i, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert [w for _, w in seen] == pytest.approx([2.0 * sigmoid_rampup(t, 4) for t in range(6)])
    assert seen[-1][1] == 2.0
    assert not hasattr(engine.state, "unsup_weight")


def test_without_an_iteration_the_value_goes_to_the_engine_state_as_before():
    seen = []
    engine = Engine(lambda e, b: seen.append(e.state.gate_threshold))
    ScheduleHandler(gate_schedule("entropy", 3, 4), name="gate_threshold").attach(engine)
    engine.run([0] * 2, max_epochs=1)
    assert seen == pytest.approx([ThresholdSchedule(3, 4)(t) for t in range(2)])


def test_the_old_gate_threshold_name_stops_with_one_line_naming_the_new_ones(tiny_iteration):
    with pytest.raises(SystemExit, match="'entropy_threshold'.*'keep_fraction'") as err:
        ScheduleHandler(gate_schedule("entropy", 3, 4), tiny_iteration, name="gate_threshold")
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit, match="not 'threshold'"):
        ScheduleHandler(gate_schedule("entropy", 3, 4), tiny_iteration, name="threshold")


@pytest.fixture
def tiny_iteration():
    import torch

    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss

    return SemiSupervisedIteration(EntropyGate("specialized"), PseudoLabelLoss(), torch.nn.Identity())
