"""Paired runs: where a task's data, teacher cache and stage 1 checkpoints go."""

from research.bench import method_sweep, switch_probe
from research.bench.paired_runs import PairedRuns


def test_the_3d_task_is_one_spec_and_one_work_folder_for_the_probe_and_the_sweep():
    """The switch probe's ``current`` and the sweep's ``uncol`` train the same stage 1 on ``embedded3d``: one
    spec (no copy to drift) and one folder, so either one's stage 1 and teacher encodings serve the other."""
    probe, sweep = switch_probe.TASKS["embedded3d"], method_sweep.TASKS["embedded3d"]
    assert {k: v for k, v in probe.items() if k != "arms"} == {k: v for k, v in sweep.items() if k != "verdict_pairs"}
    assert switch_probe.PROBE.task_work("embedded3d") == method_sweep.SWEEP.task_work("embedded3d")
    assert switch_probe.PROBE.task_work("embedded2d") == switch_probe.WORK / "embedded2d"  # the others: their own


def test_a_task_without_shared_work_keeps_its_folder_under_its_runner(tmp_path):
    runs = PairedRuns({"a": {}, "b": {"shared_work": "common"}}, {}, tmp_path / "results", tmp_path / "work" / "probe")
    assert runs.task_work("a") == tmp_path / "work" / "probe" / "a"
    assert runs.task_work("b") == tmp_path / "work" / "common"
