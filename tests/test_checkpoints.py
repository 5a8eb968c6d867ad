"""Checkpoints survive kills: atomic writes, the last K states kept across a resume, the best model kept."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from ignite.engine import Engine, Events

from custom.data.plan import Plan
from custom.handlers.checkpoints import (
    AtomicCheckpointSaver,
    TrainingRecord,
    latest_checkpoint,
    numbered_checkpoints,
    read_record,
    recorded_plan,
    recorded_value,
    save_atomically,
)

# A child process that starts writing ``state`` to the path in argv[1] and hangs inside the write,
# halfway through pickling (after touching argv[1] + ".inside"), until it is killed.
KILLED_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from custom.handlers.checkpoints import save_atomically

    class HangsWhilePickled:
        def __reduce__(self):
            open(sys.argv[1] + ".inside", "w").close()
            time.sleep(600)

    state = {"weights": torch.ones(1000), "never": HangsWhilePickled()}
    if sys.argv[2] == "atomic":
        save_atomically(state, sys.argv[1])
    else:
        torch.save(state, sys.argv[1])
    """
)


def _kill_during_write(path, mode: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path), mode], cwd=os.getcwd())
    inside = path.with_name(path.name + ".inside")
    deadline = time.time() + 120
    while not inside.is_file():
        assert proc.poll() is None and time.time() < deadline, "the writer never started writing"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_kill_during_an_atomic_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "stage2_last.pt"
    save_atomically({"epoch": torch.tensor(3)}, path)
    _kill_during_write(path, "atomic")
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert (tmp_path / ".stage2_last.pt.partial").is_file()  # the unfinished write, never under the real name


def test_a_kill_during_a_plain_torch_save_corrupts_the_file(tmp_path):
    """What the atomic write protects against: the same kill in a plain ``torch.save`` loses the file."""
    path = tmp_path / "stage2_last.pt"
    torch.save({"epoch": torch.tensor(3)}, path)
    _kill_during_write(path, "plain")
    with pytest.raises(Exception):  # noqa: B017 - torch raises different errors for different truncations
        torch.load(path, weights_only=True)


def _epoch_trainer(model: torch.nn.Module) -> Engine:
    def step(engine, batch):
        with torch.no_grad():
            model.weight.add_(1.0)
        return 0.0

    return Engine(step)


def test_last_k_states_are_kept_across_a_resume_and_their_place_is_logged(tmp_path, caplog):
    model = torch.nn.Linear(1, 1, bias=False)
    (tmp_path / ".checkpoint_epoch=9.pt.partial").write_bytes(b"half a file")

    def saver():
        return AtomicCheckpointSaver(
            str(tmp_path),
            {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)},
            save_interval=1,
            n_saved=2,
            save_final=True,
            final_filename="stage2_last.pt",
        )

    first = _epoch_trainer(model)
    saver().attach(first)
    with caplog.at_level(logging.INFO, logger="custom.handlers.checkpoints"):
        first.run(range(2), max_epochs=4)
    assert f"the last 2 training states in {tmp_path}/checkpoint_epoch=N.pt" in caplog.text
    assert f"the end-of-run state in {tmp_path}/stage2_last.pt" in caplog.text
    assert "an unfinished checkpoint write from a killed run" in caplog.text
    assert not list(tmp_path.glob(".*.partial"))
    assert [n for n, _ in numbered_checkpoints(tmp_path)] == [3, 4]

    # a new process resumes at epoch 4 and keeps going: the old run's files count towards the last 2
    second = _epoch_trainer(model)
    saver().attach(second)
    second.state.epoch, second.state.iteration = 4, 8
    second.run(range(2), max_epochs=7)
    assert [n for n, _ in numbered_checkpoints(tmp_path)] == [6, 7]
    last = torch.load(tmp_path / "checkpoint_epoch=7.pt", weights_only=True)
    assert last["model"]["weight"].item() == pytest.approx(model.weight.item())


def _evaluator_with_scores(scores: list[float]) -> Engine:
    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def score(engine):
        engine.state.metrics["val_mean_dice"] = scores[engine.state.epoch - 1]

    return evaluator


def test_the_best_model_is_only_replaced_by_a_better_one_after_a_resume(tmp_path):
    model = torch.nn.Linear(1, 1, bias=False)

    def best_saver():
        return AtomicCheckpointSaver(
            str(tmp_path),
            {"model": model},
            save_key_metric=True,
            key_metric_name="val_mean_dice",
            key_metric_filename="model.pt",
        )

    before = best_saver()
    evaluator = _evaluator_with_scores([0.5, 0.8])
    before.attach(evaluator)
    evaluator.run(range(1), max_epochs=2)
    best_weight = torch.load(tmp_path / "model.pt", weights_only=True)["weight"].clone()
    resumed_state = before.state_dict()  # saved with the training state

    with torch.no_grad():
        model.weight.fill_(123.0)
    after = best_saver()
    after.load_state_dict(resumed_state)
    evaluator = _evaluator_with_scores([0.6])
    after.attach(evaluator)
    evaluator.run(range(1), max_epochs=1)  # 0.6 < 0.8: model.pt must stay the 0.8 model
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], best_weight)


def test_resume_skips_an_unreadable_newest_state_and_says_which(tmp_path, caplog):
    save_atomically({"trainer": {"epoch": 2}}, tmp_path / "checkpoint_epoch=2.pt")
    time.sleep(0.01)
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"PK\x03\x04 truncated")
    with caplog.at_level(logging.WARNING, logger="custom.handlers.checkpoints"):
        assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=2.pt")
    assert "checkpoint_epoch=3.pt: cannot be read" in caplog.text


def test_resume_without_any_state_stops_with_the_directory_named(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path}: no training state to resume from"):
        latest_checkpoint(tmp_path)


# -- the training record and the plan it keeps ------------------------------------------------------


def _plan(**changes) -> Plan:
    fields = {
        "spatial_dims": 2,
        "pixdim": [0.8, 0.8],
        "axcodes": "RA",
        "roi_size": [48, 64],
        "normalisation": {"kind": "zscore_foreground", "clip": None, "mean": None, "std": None},
        "batch_size": 2,
        "pretrain_batch_size": 6,
        "unlabelled_batch_size": 2,
        "memory_budget_gb": 8.0,
        "modality": "MR",
        "class_fractions": {"background": 0.9, "organ": 0.1},
        "fingerprint": {},
    }
    return Plan(**{**fields, **changes})


def _record(plan: Plan) -> TrainingRecord:
    network = torch.nn.Conv2d(1, 2, 1)
    network.spatial_dims, network.out_channels = 2, 2
    return TrainingRecord(network, plan.axcodes, plan.pixdim, ["organ"], None, plan.normalisation, plan.roi_size, plan)


def test_the_record_keeps_the_plan_and_compares_the_normalisation_not_the_patch(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"record": _record(_plan()).state_dict()}, path)
    other_patch = _record(_plan(roi_size=[32, 32], batch_size=1))
    other_patch.check(path)  # a stage may train with another patch or batch size
    with pytest.raises(
        SystemExit, match=r"model\.pt: normalisation \{'kind': 'zscore_foreground'.* here \{'kind': 'zscore'"
    ):
        _record(_plan(normalisation={"kind": "zscore"})).check(path)
    assert read_record(path)["plan"]["roi_size"] == [48, 64]


def test_recorded_plan_gives_the_checkpoints_plan_with_what_was_given_on_top(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"record": _record(_plan()).state_dict()}, path)
    plan = recorded_plan(path, roi_size=None, pixdim=None, normalisation=None)
    assert plan == _plan()
    given = recorded_plan(path, roi_size=[96, 96], normalisation="zscore")
    assert given.roi_size == [96, 96] and given.normalisation["kind"] == "zscore" and given.pixdim == [0.8, 0.8]
    assert given.overridden == ["normalisation", "roi_size"]
    # a record from before plans: its own geometry, the whole-image z-score, the patch given
    old = tmp_path / "old.pt"
    torch.save({"record": {"spatial_dims": 2, "num_classes": 3, "pixdim": [0.5, 0.5], "axcodes": "RA"}}, old)
    rebuilt = recorded_plan(old, roi_size=[64, 32])
    assert (rebuilt.pixdim, rebuilt.roi_size, rebuilt.normalisation["kind"]) == ([0.5, 0.5], [64, 32], "zscore")
    with pytest.raises(SystemExit, match=r"^error: .*old\.pt: its training record holds no plan; give --roi_size"):
        recorded_plan(old)


def test_a_record_from_before_a_field_existed_gets_what_those_checkpoints_were_trained_with(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"record": {"spatial_dims": 2, "num_classes": 3}}, old)
    assert recorded_value(old, "normalisation", {"kind": "zscore_foreground"}, {"kind": "zscore"}) == {"kind": "zscore"}
    assert recorded_value(tmp_path / "none.pt", "normalisation", {"kind": "zscore_foreground"}) == {
        "kind": "zscore_foreground"
    }
    with pytest.raises(SystemExit, match=r"old\.pt: no training record with 'pixdim'; give --pixdim"):
        recorded_value(old, "pixdim", [1.0, 1.0])


def test_a_network_recorded_before_full_resolution_existed_is_the_blocks_student(tmp_path):
    from custom.handlers.checkpoints import describe_network, recorded_network
    from custom.networks.student import UnCoLStudent

    tiny = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 2, "feature_size": 8}
    network = {k: v for k, v in describe_network(UnCoLStudent(2, **tiny)).items() if k != "full_resolution"}
    old = tmp_path / "old.pt"
    torch.save({"record": {"spatial_dims": 2, "num_classes": 3, "network": network}}, old)
    assert recorded_network(old)["full_resolution"] == "blocks"
    with pytest.raises(SystemExit, match=r"^error: .*absent\.pt: checkpoint file does not exist$"):
        recorded_network(tmp_path / "absent.pt")  # evaluation names the missing file, not a missing field
    TrainingRecord(UnCoLStudent(2, **tiny)).check(old)  # the student those checkpoints were
    with pytest.raises(SystemExit, match=r"old\.pt: network full_resolution blocks here single$"):
        TrainingRecord(UnCoLStudent(2, full_resolution="single", **tiny)).check(old)
