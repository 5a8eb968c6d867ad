"""A user's own data, first try: non-square images of mixed sizes, 4 classes, a datalist with relative
paths in another working directory, the documented commands, and checkpoints that refuse other data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, TINY_NET
from monai.bundle import ConfigParser, run

from custom.data.phantoms import OWN_DATA_LABELS as LABELS
from custom.data.phantoms import write_own_data_example as write_dataset

#: 4 labelled, 2 unlabelled (one of each 2D size: LiteMedSAM encodes each 32x32 tile of them before
#: stage 2's first step, about 1.5 s a tile on one core), 2 validation and 2 test cases
TINY_COUNTS = {"training": 4, "unlabeled": 2, "validation": 2, "test": 2}

BUNDLE = CONFIGS.parent
TRAIN = str(CONFIGS / "train.json")
TRAIN_3D = str(CONFIGS / "train_3d.json")
EVALUATE = str(CONFIGS / "evaluate.json")
INFER = str(CONFIGS / "inference.json")
INFER_3D = str(CONFIGS / "inference_3d.json")

#: a schedule of seconds
TINY_RUN = {"batch_size": 2, "pretrain_batch_size": 2, "iterations_per_epoch": 2, "max_epochs": 2}
TINY_RUN |= {"pretrain_epochs": 2, "val_interval": 1, **TINY_NET}


def _bundle_run(cwd: Path, run_id: str, configs: list[str], **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` as a user types it, in ``cwd``."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(configs)]
    cmd += ["--bundle_root", str(BUNDLE)]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def own2d(tmp_path_factory) -> SimpleNamespace:
    """Stage 2 (stage 1 run implicitly) on 40x56 and 48x36 images of 0.8 mm pixels with 4 classes, from
    another folder, each stage shorter than the validation interval; pixdim and normalisation planned
    from the data (its own spacing), the patch given."""
    work = tmp_path_factory.mktemp("own2d")
    write_dataset(work / "data", [(40, 56), (48, 36)], (0.8, 0.8), TINY_COUNTS)
    settings = {
        "use_embedded_data": False,
        "datalist": "data/datalist.json",
        "ckpt_dir": "runs/models",
        "output_dir": "runs/eval",
        "teacher_cache_dir": "runs/cache",
        "roi_size": [32, 32],
        **TINY_RUN,
        "val_interval": 3,  # 2 epochs a stage: each must still validate once and save its checkpoint
    }
    proc = _bundle_run(work, "training", [TRAIN], **settings)
    return SimpleNamespace(work=work, settings=settings, log=proc.stdout + proc.stderr)


def test_own_2d_data_trains_both_stages_with_its_classes_and_folders(own2d):
    models = own2d.work / "runs" / "models"
    assert "running stage 1 (pretrain) first" in own2d.log
    for name in ("pretrain.pt", "model.pt", "stage2_last.pt"):  # stage 1 wrote into the custom ckpt_dir too
        record = torch.load(models / name, map_location="cpu", weights_only=True)["record"]
        assert record["num_classes"] == 4 and record["class_names"] == list(LABELS.values())[1:], name
        assert record["labelled_cases"].startswith("4 cases") and record["spatial_dims"] == 2
        assert record["pixdim"] == [0.8, 0.8], name  # planned: the data's own spacing
        assert record["roi_size"] == [32, 32] and record["normalisation"]["kind"] == "zscore_foreground", name
        assert record["plan"]["overridden"] == ["roi_size", "batch_size", "pretrain_batch_size"], name
    # both stages from the same plan, written to the run folder with the fingerprint it came from
    plan = json.loads((own2d.work / "runs" / "eval" / "plan.json").read_text())
    assert plan == record["plan"] and plan["fingerprint"]["median_spacing"] == [0.8, 0.8]
    assert (own2d.work / "runs" / "eval" / "fingerprint.json").is_file()
    assert "training plan (every value can be given on the command line)" in own2d.log


def test_own_2d_inference_and_evaluation(own2d, monkeypatch):
    """Inference and evaluation take the spacing, patch and normalisation the checkpoint was trained
    with from its record (no --pixdim or --roi_size given), and refuse another spacing."""
    work = own2d.work
    _bundle_run(work, "inference", [INFER], ckpt_path="runs/models/model.pt", input_dir="data/images",
                output_dir="runs/seg", **TINY_NET)  # fmt: skip
    parser = ConfigParser()
    parser.read_config(INFER)
    parser.update({"ckpt_path": str(work / "runs" / "models" / "model.pt")})
    assert list(parser.get_parsed_content("inferer").roi_size) == [32, 32]  # not the config's 128 x 128
    assert parser.get_parsed_content("normalisation")["kind"] == "zscore_foreground"
    for image in sorted((work / "data" / "images").glob("*.nii.gz")):
        source = nib.load(image)
        seg = nib.load(work / "runs" / "seg" / image.name.replace(".nii.gz", "_seg.nii.gz"))
        assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
        assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2, 3}
    settings = {k: v for k, v in own2d.settings.items() if k in ("use_embedded_data", "datalist")}
    _in_process(work, monkeypatch, "evaluate", [TRAIN, EVALUATE], ckpt_path="runs/models/model.pt",
                report_dir="runs/report", output_dir="runs/eval", **settings, **TINY_NET)  # fmt: skip
    report = json.loads((work / "runs" / "report" / "report.json").read_text())
    assert list(report["metrics"]["test_dice"]) == ["gm", "wm_a", "wm_b"] and report["num_cases"] == 2
    with pytest.raises(SystemExit, match=r"model.pt: .*pixdim"):
        _in_process(work, monkeypatch, "inference", [INFER], ckpt_path="runs/models/model.pt", pixdim=[1.0, 1.0],
                    input_dir="data/images", output_dir="runs/seg_other", roi_size=[32, 32], **TINY_NET)  # fmt: skip


def _in_process(work: Path, monkeypatch, run_id: str, configs: list[str], **overrides) -> None:
    monkeypatch.chdir(work)
    run(run_id, config_file=configs, bundle_root=str(BUNDLE), **overrides)


def _other_labels(own2d, name: str) -> dict:
    """The same images with one labelled case's label changed: another training set."""
    data = own2d.work / name
    shutil.copytree(own2d.work / "data", data)
    label = data / "labels" / "case_000.nii.gz"
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), label)
    return {**own2d.settings, "datalist": f"{name}/datalist.json"}


def test_checkpoints_of_another_training_stop_the_run_and_stay_untouched(own2d, monkeypatch):
    models = own2d.work / "runs" / "models"
    before = {p.name: p.read_bytes() for p in models.glob("*.pt")}
    settings = _other_labels(own2d, "changed")
    with pytest.raises(SystemExit, match=r"runs/models/pretrain\.pt: labelled_cases 4 cases, sha256 \w+ here "):
        _in_process(own2d.work, monkeypatch, "training", [TRAIN], **settings)
    with pytest.raises(SystemExit, match=r"use a fresh --ckpt_dir"):
        _in_process(own2d.work, monkeypatch, "training", [TRAIN], **settings, resume=True)
    foreign = own2d.work / "foreign" / "models"
    foreign.mkdir(parents=True)
    shutil.copy(models / "stage2_last.pt", foreign)
    with pytest.raises(SystemExit, match=r"foreign/models/stage2_last\.pt: labelled_cases"):
        _in_process(own2d.work, monkeypatch, "training", [TRAIN], **{**settings, "ckpt_dir": str(foreign)},
                    resume=True)  # fmt: skip
    assert before == {p.name: p.read_bytes() for p in models.glob("*.pt")}


def test_fine_tune_from_starts_stage2_from_a_checkpoint_of_other_data(own2d, monkeypatch, capfd):
    settings = {**_other_labels(own2d, "finetune"), "ckpt_dir": "finetune_runs/models", "max_epochs": 1}
    pretrain = str(own2d.work / "runs" / "models" / "pretrain.pt")
    _in_process(own2d.work, monkeypatch, "training", [TRAIN], **settings, fine_tune_from=pretrain)
    out, err = capfd.readouterr()
    assert f"stage 2 fine-tunes {pretrain} (trained for: labelled_cases" in out + err
    assert not (own2d.work / "finetune_runs" / "models" / "pretrain.pt").exists()  # no stage 1 was run
    assert (own2d.work / "finetune_runs" / "models" / "model.pt").is_file()


def test_datalist_labels_and_explicit_classes_must_agree(own2d, monkeypatch):
    settings = {**own2d.settings, "ckpt_dir": "never/models"}
    with pytest.raises(SystemExit, match=r"data/datalist\.json: its 'labels' declare 4 classes .* num_classes is 5"):
        _in_process(own2d.work, monkeypatch, "training", [TRAIN], **settings, num_classes=5,
                    class_names=["a", "b", "c", "d"])  # fmt: skip
    with pytest.raises(SystemExit, match=r"names 2 classes, but num_classes 4 has 3 foreground classes"):
        _in_process(own2d.work, monkeypatch, "training", [TRAIN], **settings, class_names=["a", "b"])
    assert not (own2d.work / "never").exists()


def test_a_2d_checkpoint_refuses_a_3d_inference_config(own2d, monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=r"model\.pt: spatial_dims 2 here 3"):
        _in_process(own2d.work, monkeypatch, "inference", [INFER, INFER_3D], ckpt_path="runs/models/model.pt",
                    input_dir="data/images", output_dir=str(tmp_path / "seg"), **TINY_NET)  # fmt: skip
    assert not list(tmp_path.glob("seg/*.nii.gz"))


def test_own_3d_volumes_of_mixed_sizes_train_and_infer(tmp_path, monkeypatch):
    # one unlabelled volume (16 slices): stage 2 encodes every unlabelled slice with LiteMedSAM before its
    # first step (about 1.2 s a slice on 2 cores), so each further volume costs the test 20 s
    counts = {**TINY_COUNTS, "unlabeled": 1}
    # the unlabelled volume (the 5th case) is 44 x 24 x 16, padded to 48 x 32: two in-plane tiles of the roi
    write_dataset(tmp_path / "data", [(44, 24, 16), (28, 32, 20)], (1.25, 1.25, 2.0), counts)
    settings = {
        "use_embedded_data": False,
        "datalist": "data/datalist.json",
        "ckpt_dir": "runs/models",
        "output_dir": "runs/eval",
        "roi_size": [32, 32, 16],
        "teacher_cache_dir": "runs/cache",
        "pretrain_distillation": "none",  # stage 1's targets slice by slice are test_generalized's job
        "teachers": "both",  # UnCoL's stage 2: LiteMedSAM slice by slice on the unlabelled patches
        "gate": "quantile",  # class-wise quantiles: keep_start (0.5) of each class's voxels at the start
        "disagreement": "mask",
        "class_guard": "prior",  # where the labelled class shares expect a class, only it is supervised
        "copy_paste": "bidirectional",  # labelled and unlabelled patches mixed both ways (non-cubic 3D boxes)
        "feature_dropout": 0.5,
        **TINY_RUN,
        "max_epochs": 1,
        "pretrain_epochs": 1,
        "log_every": 1,
    }
    log = _bundle_run(tmp_path, "training", [TRAIN, TRAIN_3D], **settings)
    assert "running stage 1 (pretrain) first" in log.stdout + log.stderr
    # before the first step, the warm-up encoded the unlabelled volume's 16 whole slices (once, not once per
    # in-plane tile: stage 2 gives LiteMedSAM each patch's whole slices)
    warm_up = "teacher cache warm-up: 1 unlabelled images, 16 distinct slice crops, 0 already cached, 16 encoded"
    assert warm_up in log.stdout + log.stderr
    shares = [float(v) for v in re.findall(r"gate_from_generalized: ([0-9.]+)", log.stdout + log.stderr)]
    kept = [float(v) for v in re.findall(r"gate_kept: ([0-9.]+)", log.stdout + log.stderr)]
    guarded = [float(v) for v in re.findall(r"gate_guarded: ([0-9.]+)", log.stdout + log.stderr)]
    assert len(shares) == 2 and len(kept) == 2 and len(guarded) == 2  # one line per iteration
    # the gate keeps some voxels and rejects others: at most keep_start by the quantiles, fewer once the
    # voxels where the teachers disagree are masked too
    assert all(0.0 < k <= 0.55 for k in kept), kept
    assert all(0.0 < s <= 1.0 for s in shares), shares  # and the generalized teacher supplies some of them
    # the generalized teacher took part: its embeddings (one per slice crop) are in the cache
    embeddings = list((tmp_path / "runs" / "cache").glob("*/*.pt"))
    assert len(embeddings) >= 16 and all(e.stat().st_size < 2.2e6 for e in embeddings)
    record = torch.load(tmp_path / "runs" / "models" / "model.pt", map_location="cpu", weights_only=True)["record"]
    assert record["spatial_dims"] == 3 and record["num_classes"] == 4 and record["pixdim"] == [1.25, 1.25, 2.0]
    _in_process(tmp_path, monkeypatch, "inference", [INFER, INFER_3D], ckpt_path="runs/models/model.pt",
                input_dir="data/images", output_dir="runs/seg", roi_size=[32, 32, 16], **TINY_NET)  # fmt: skip
    for image in sorted((tmp_path / "data" / "images").glob("*.nii.gz")):
        source = nib.load(image)
        seg = nib.load(tmp_path / "runs" / "seg" / image.name.replace(".nii.gz", "_seg.nii.gz"))
        assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
