"""The step profiler's clocks on a small Ignite engine (no bundle run: the bench itself runs the bundle)."""

import json
import time

from ignite.engine import Engine, Events
from torch.profiler import record_function

from research.bench.profile_steps import PhaseProfile, StepClock, student_step_flops, table


class SlowLoader:
    """Yields ``n`` batches, each after sleeping ``seconds`` (the data time the clock must see)."""

    def __init__(self, n: int, seconds: float) -> None:
        self.n, self.seconds = n, seconds

    def __iter__(self):
        for i in range(self.n):
            time.sleep(self.seconds)
            yield i

    def __len__(self) -> int:
        return self.n


def test_step_clock_splits_data_iteration_and_each_handler_within_its_window():
    steps_run = []

    def step(engine, batch):
        with record_function("uncol/student_forward"):
            time.sleep(0.02)
        steps_run.append(engine.state.iteration)

    engine = Engine(step)

    def slow_handler(engine):
        time.sleep(0.01)

    engine.add_event_handler(Events.ITERATION_COMPLETED, slow_handler)
    clock = StepClock(3, 4, after=2)  # iterations 1-2 are warm-up, 5-6 the profiled window
    clock.attach(engine)
    phases = PhaseProfile(5, 6)
    phases.attach(engine)
    engine.run(SlowLoader(6, 0.015), max_epochs=1)

    assert steps_run == [1, 2, 3, 4, 5, 6]
    ms = clock.per_step_ms()
    assert ms["data"] >= 15 and ms["iteration function"] >= 20 and ms["iteration function, profiled"] >= 20
    (handler,) = [v for k, v in ms.items() if k.startswith("handler: ") and k.endswith("slow_handler")]
    assert handler >= 10
    # the step holds the iteration function and every handler, the data comes before it
    assert ms["step (without data)"] >= ms["iteration function"] + 10
    assert phases.phase_ms["student_forward"] >= 20


def test_student_step_flops_grow_with_the_batch():
    from custom.networks.student import UnCoLStudent

    network = UnCoLStudent(spatial_dims=2, out_channels=2, hidden_size=24, mlp_dim=48, num_heads=2, feature_size=4)
    one, two = (student_step_flops(network, [b, 1, 32, 48]) for b in (1, 2))
    assert one > 0 and abs(two / one - 2) < 0.01
    assert all(p.grad is None for p in network.parameters())  # the count leaves no gradients behind


def test_table_sets_labels_side_by_side_with_shares_of_the_step(tmp_path):
    for label, backward in (("before", 60.0), ("after", 30.0)):
        run = {
            "label": label,
            "case": "stage2_2d",
            "commit": "abc1234",
            "setting": "2d",
            "stage": 2,
            "method": "uncol",
            "step_ms": 100.0 if label == "before" else 70.0,
            "breakdown_ms": {"data": 10.0, "backward": backward, "handlers (other)": 30.0},
            "student_gflop_per_step": 1.0,
            "student_gflops": 10.0,
            "matmul_peak_gflops": 100.0,
        }
        (tmp_path / f"{label}_stage2_2d.json").write_text(json.dumps(run))
    text = table(tmp_path)
    assert "| part of the step | before (abc1234) ms | after (abc1234) ms |" in text
    assert "| backward | 60.0 (60 %) | 30.0 (43 %) |" in text
    assert "| **step** | **100.0** | **70.0** |" in text
    assert "10 % of 100.0" in text
