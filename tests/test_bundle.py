"""Real ``monai.bundle run`` workflows on a tiny generated dataset: train, infer, evaluate, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, TINY_NET, save_student, tiny_train_overrides
from monai.bundle import ConfigParser, ConfigWorkflow, run

from custom.handlers.checkpoints import student_state

TRAIN = str(CONFIGS / "train.json")
INFER = str(CONFIGS / "inference.json")
EVALUATE = str(CONFIGS / "evaluate.json")
DIAGNOSTICS = str(CONFIGS / "diagnostics.json")


def _cli_value(v):
    return json.dumps(v) if isinstance(v, list) else str(v)


def _cli(run_id: str, configs: list[str], overrides: dict) -> subprocess.CompletedProcess:
    config_arg = configs[0] if len(configs) == 1 else json.dumps(configs)
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_arg]
    for key, value in overrides.items():
        cmd += [f"--{key}", _cli_value(value)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """UnCoL stage 2 through the documented command line; with no stage 1 checkpoint it runs stage 1 first."""
    root = tmp_path_factory.mktemp("bundle2d")
    proc = _cli("training", [TRAIN], {**tiny_train_overrides(root), "log_every": 1})
    return SimpleNamespace(root=root, stdout=proc.stdout)


def _start_from_stage1(trained, root) -> None:
    """Give the bundle at ``root`` the fixture's stage 1 checkpoint, so a training run there is stage 2 only."""
    (root / "models").mkdir()
    shutil.copy(trained.root / "models" / "pretrain.pt", root / "models" / "pretrain.pt")


def test_training_runs_stage1_first_then_stage2_and_logs_the_gate(trained):
    assert "running stage 1 (pretrain) first" in trained.stdout
    # stage 1 ran on the very data stage 2 uses (the tiny 32x32 set), not a regenerated default set
    assert "on this configuration" in trained.stdout
    datalist = json.loads((trained.root / "data" / "phantom2d" / "datalist.json").read_text())
    assert datalist["generator"]["shape"] == [32, 32] and len(datalist["test"]) == 2
    assert "stage 2 starts from the stage 1 student" in trained.stdout
    for stat in (
        "gate_kept",
        "gate_from_generalized",
        "gate_from_specialized",
        "gate_entropy_threshold",
        "loss_pseudo",
        "loss_sup",
        "val_mean_dice",
    ):
        assert stat in trained.stdout, stat
    for name in ("pretrain.pt", "model.pt", "stage2_last.pt"):
        assert (trained.root / "models" / name).is_file(), name


def test_training_writes_a_loadable_checkpoint(trained):
    parser = ConfigParser({**ConfigParser.load_config_file(TRAIN), "bundle_root": str(trained.root)})
    parser.update(TINY_NET)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(student_state(trained.root / "models" / "model.pt"), strict=True)


def test_inference_builds_the_student_its_checkpoint_records(tmp_path):
    """A checkpoint of a student other than the default (narrower, 4 classes, residual blocks in 2D) runs
    with inference.json and evaluate.json as they are: the architecture comes from its record."""
    from custom.networks.student import UnCoLStudent

    tiny = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 2, "feature_size": 4}
    student = UnCoLStudent(2, 1, 5, decoder="vnet", full_resolution="single", **tiny)
    ckpt = save_student(student, tmp_path / "model.pt", class_names=("a", "b", "c", "d"))
    parser = ConfigParser({**ConfigParser.load_config_file(INFER), "bundle_root": str(tmp_path)})
    parser["ckpt_path"] = str(ckpt)
    network = parser.get_parsed_content("network_def")
    built = (network.feature_size, network.hidden_size, network.out_channels, network.decoder, network.full_resolution)
    assert built == (4, 48, 5, "vnet", "single")
    network.load_state_dict(student_state(ckpt), strict=True)
    parser.get_parsed_content("checkpoint_check")  # the record's own student: the check passes
    evaluation = ConfigParser()
    evaluation.read_config([TRAIN, EVALUATE])
    evaluation.update({"bundle_root": str(tmp_path), "ckpt_path": str(ckpt)})
    assert evaluation.get_parsed_content("network_def").feature_size == 4


def test_training_resumes_from_its_last_checkpoint(trained, tmp_path, capfd):
    root = tmp_path / "resume"
    shutil.copytree(trained.root, root)
    run("training", config_file=TRAIN, **{**tiny_train_overrides(root), "resume": True, "max_epochs": 3})
    log = "".join(capfd.readouterr())
    assert "Epoch[3] Complete" in log and "Epoch[1] Complete" not in log  # only the missing epoch ran
    assert "running stage 1" not in log
    state = torch.load(root / "models" / "stage2_last.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 6 and state["trainer"]["max_epochs"] == 3
    assert set(state) == {"model", "ema", "optimizer", "lr_scheduler", "trainer", "best_checkpoint", "record"}


@pytest.mark.parametrize("teachers", ["specialized", "generalized"])
def test_each_teachers_setting_runs(trained, tmp_path, teachers):
    _start_from_stage1(trained, tmp_path)
    overrides = {**tiny_train_overrides(tmp_path), "max_epochs": 1, "teachers": teachers}
    workflow = ConfigWorkflow(config_file=TRAIN, run_id="training", **overrides)
    workflow.initialize()
    workflow.run()
    out = workflow.parser.get_parsed_content("train#trainer").state.output[0]
    workflow.finalize()
    expected = 0.0 if teachers == "specialized" else 1.0
    assert out["gate_kept"] > 0, "the gate kept no voxel: the pseudo-label term trained nothing"
    assert out["gate_from_generalized"] == expected
    assert (tmp_path / "models" / "model.pt").is_file()


def _stage2(configs: list[str], root, **overrides) -> tuple[dict, dict]:
    """One stage 2 run in process: its last output and its final student weights."""
    workflow = ConfigWorkflow(config_file=configs, run_id="training", **{**tiny_train_overrides(root), **overrides})
    workflow.initialize()
    workflow.run()
    out = workflow.parser.get_parsed_content("train#trainer").state.output[0]
    workflow.finalize()
    return out, student_state(root / "models" / "stage2_last.pt")


def test_the_diagnostics_overlay_audits_and_records_without_changing_the_training(trained, tmp_path):
    # teachers by_class: the reliability handler runs after the calibration (without owners the gate stops the run)
    settings = {"max_epochs": 1, "gate": "quantile", "calibration": "temperature", "teachers": "by_class"}
    plain, with_diagnostics = tmp_path / "plain", tmp_path / "diagnostics"
    for root in (plain, with_diagnostics):
        root.mkdir()
        _start_from_stage1(trained, root)
    out, weights = _stage2([TRAIN], plain, **settings)
    assert out["gate_keep_fraction"] > 0 and "gate_entropy_threshold" not in out  # the quantile gate's own cut
    assert not (plain / "eval" / "calibration.jsonl").exists()
    _, audited = _stage2([TRAIN, DIAGNOSTICS], with_diagnostics, **settings, audit_cases=2, audit_every=1)
    for name, value in weights.items():
        assert torch.equal(audited[name], value), name
    records = [json.loads(r) for r in (with_diagnostics / "eval" / "pseudo_label_audit.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2] and all(r["keep_fraction"] > 0 for r in records)
    assert 0.0 <= records[-1]["kept_accuracy_fg"] <= 1.0  # scored against the hidden labels
    calibration = (with_diagnostics / "eval" / "calibration.jsonl").read_text().splitlines()
    assert len(calibration) == 2 and "temperature" in json.loads(calibration[0])["specialized"]
    reliability = [json.loads(r) for r in (with_diagnostics / "eval" / "reliability.jsonl").read_text().splitlines()]
    assert len(reliability) == 2 and len(reliability[0]["owners"]) == len(reliability[0]["specialized"]) == 2


def test_stage2_can_continue_the_distillation(trained, tmp_path):
    _start_from_stage1(trained, tmp_path)
    overrides = {
        **tiny_train_overrides(tmp_path),
        "max_epochs": 1,
        "distillation": "both",  # its targets are served by the cache stage 1 filled (tiny_train_overrides)
    }
    workflow = ConfigWorkflow(config_file=TRAIN, run_id="training", **overrides)
    workflow.initialize()
    workflow.run()
    out = workflow.parser.get_parsed_content("train#trainer").state.output[0]
    extra = workflow.parser.get_parsed_content("distillation_modules")
    optimised = {id(p) for p in workflow.parser.get_parsed_content("optimizer").param_groups[0]["params"]}
    workflow.finalize()
    assert {"loss_visual", "loss_semantic", "loss_pseudo", "loss_sup"} <= set(out)
    assert len(extra) == 2 and {id(p) for p in extra.parameters()} <= optimised


def test_inference_writes_segmentation_in_the_input_space(trained, tmp_path):
    # an odd-sized image, flipped in x, 0.8 mm pixels, shifted origin: nothing like the training grid
    affine = np.array([[-0.8, 0, 0, 40.0], [0, 0.8, 0, -12.0], [0, 0, 1, 3.0], [0, 0, 0, 1]])
    src = tmp_path / "in"
    src.mkdir()
    image = np.random.default_rng(0).normal(0.4, 0.1, (37, 45)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), src / "case_a.nii.gz")
    out = tmp_path / "out"
    run(
        "inference",
        config_file=INFER,
        bundle_root=str(trained.root),
        input_dir=str(src),
        output_dir=str(out),
        roi_size=[32, 32],
        **TINY_NET,
    )
    seg = nib.load(out / "case_a_seg.nii.gz")
    assert seg.shape == (37, 45)
    assert np.allclose(seg.affine, affine)
    assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2}


def test_inference_never_writes_over_its_inputs(trained, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    image = src / "case_a.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32), np.float32), np.eye(4)), image)
    before = image.read_bytes()
    with pytest.raises(SystemExit, match=rf"{image}: the segmentation of {image} would overwrite an input image"):
        run(
            "inference",
            config_file=INFER,
            bundle_root=str(trained.root),
            input_dir=str(src),
            output_dir=str(src),
            output_postfix="",
            **TINY_NET,
        )
    assert image.read_bytes() == before and [p.name for p in src.iterdir()] == ["case_a.nii.gz"]


def test_unwritable_output_folder_stops_training_before_anything_runs(tmp_path):
    blocker = tmp_path / "models"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=rf"error: {blocker}: output folder is not writable"):
        run("training", config_file=TRAIN, **tiny_train_overrides(tmp_path))
    assert not (tmp_path / "eval").exists() and blocker.read_text() == "not a folder"  # stopped before stage 1


def test_evaluate_reports_dice_and_hd95_per_class(trained):
    run("evaluate", config_file=[TRAIN, EVALUATE], **tiny_train_overrides(trained.root))
    report = json.loads((trained.root / "eval" / "report" / "report.json").read_text())
    assert report["split"] == "test" and report["num_cases"] == 2
    assert set(report["metrics"]) == {"test_dice", "test_hd95"}
    for metric in report["metrics"].values():
        assert set(metric) == {"organ", "lesion"}
    organ = report["metrics"]["test_dice"]["organ"]
    assert 0.0 <= organ["mean"] <= 1.0 and organ["n"] == 2
    assert (trained.root / "eval" / "report" / "test_dice_raw.csv").is_file()


def test_missing_datalist_stops_training_with_one_clear_message(tmp_path):
    missing = tmp_path / "nowhere" / "datalist.json"
    with pytest.raises(SystemExit) as exc:
        run(
            "training",
            config_file=TRAIN,
            bundle_root=str(tmp_path),
            use_embedded_data=False,
            datalist=str(missing),
            **TINY_NET,
        )
    assert str(exc.value) == f"error: {missing}: datalist file does not exist"
    assert not (tmp_path / "models").exists()


def test_bad_label_stops_training_before_it_starts(tiny_dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset.parent, data)
    entry = json.loads((data / "datalist.json").read_text())["training"][0]
    label = data / entry["label"]
    nib.save(nib.Nifti1Image(np.full((32, 32), 7, np.uint8), np.eye(4)), label)
    with pytest.raises(SystemExit, match=rf"{label.name}: label values \[7\] are outside the declared classes"):
        run(
            "training",
            config_file=TRAIN,
            bundle_root=str(tmp_path),
            use_embedded_data=False,
            datalist=str(data / "datalist.json"),
            **TINY_NET,
        )


def test_train_config_reads_as_a_zoo_config():
    lines = (CONFIGS / "train.json").read_text().splitlines()
    assert len(lines) <= 400 and max(map(len, lines)) <= 200
    for name in ("train.json", "pretrain.json", "evaluate.json", "multi_gpu_train.json", "diagnostics.json"):
        assert "tracking_params" not in ConfigParser.load_config_file(str(CONFIGS / name)), name  # derived, not listed


def test_inference_and_training_build_the_same_network():
    train, infer = ConfigParser.load_config_file(TRAIN), ConfigParser.load_config_file(INFER)
    # inference builds the checkpoint's own student (its record's architecture); without a file, train.json's
    assert infer["student"]["_target_"].endswith("recorded_network")
    given = ("_target_", "spatial_dims", "out_channels")
    architecture = {k: v for k, v in train["network_def"].items() if k not in given}
    student = {**infer["student"]["default"], "in_channels": 1}
    assert {k: student[k] for k in architecture} == architecture
    assert infer["network_def"]["_target_"] == train["network_def"]["_target_"]
    assert all(infer["network_def"][k] == f"$@student['{k}']" for k in student if k != "in_channels")
    assert train["spatial_dims"] == infer["spatial_dims"]
    # orientation, spacing, patch and normalisation come from the checkpoint's record (training plans all
    # but the orientation from the data); the defaults stand in only without a file
    for key in ("axcodes", "pixdim", "roi_size", "normalisation"):
        assert infer[key]["_target_"].endswith("recorded_value") and infer[key]["key"] == key, key
    assert infer["axcodes"]["default"] == train["axcodes"]
    # inference takes the number of classes from the checkpoint's training record
    assert infer["num_classes"]["_target_"].endswith("recorded_value")


def test_training_killed_mid_run_resumes_from_its_last_epoch(trained, tmp_path):
    """SIGKILL a real training process after its second epoch's checkpoint, then resume it with one flag."""
    import os
    import signal
    import time

    _start_from_stage1(trained, tmp_path)  # stage 2's states are what is resumed
    overrides = {**tiny_train_overrides(tmp_path), "max_epochs": 5}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN]
    for key, value in overrides.items():
        cmd += [f"--{key}", _cli_value(value)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    models = tmp_path / "models"
    deadline = time.time() + 600
    while not list(models.glob("checkpoint_epoch=[2-4].pt")):
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before epoch 2"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (models / "stage2_last.pt").exists()  # killed: no end-of-run state
    resumed = _cli("training", [TRAIN], {**overrides, "resume": "True"})
    log = resumed.stdout + resumed.stderr
    assert "resuming from" in log and "Epoch[1] Complete" not in log and "Epoch[5] Complete" in log
    assert f"the last 3 training states in {models}/checkpoint_epoch=N.pt" in log
    assert f"the best model in {models}/model.pt" in log
    state = torch.load(models / "stage2_last.pt", map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 5 * 2 and state["trainer"]["max_epochs"] == 5
    assert sorted(p.name for p in models.glob("checkpoint_epoch=*.pt")) == [
        f"checkpoint_epoch={n}.pt" for n in (3, 4, 5)
    ]
