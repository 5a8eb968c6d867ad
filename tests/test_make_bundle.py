"""The self-contained bundle of ``make bundle`` trains and infers from another working directory,
importing its own copy of ``custom/``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import nibabel as nib
from conftest import TINY_NET, tiny_train_overrides

from scripts.make_bundle import build


def _run(run_id: str, configs: list, overrides: dict, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps([str(c) for c in configs])]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the bundle's own custom/
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_exported_bundle_trains_and_infers_from_any_directory(tmp_path):
    folder = build(tmp_path / "dist", weights=False)
    assert (folder / "custom" / "engines" / "uncol.py").is_file() and (folder / "LICENSE").is_file()
    with zipfile.ZipFile(tmp_path / "dist" / "uncol_monai.zip") as archive:
        assert "uncol_monai/configs/train.json" in archive.namelist()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    configs = folder / "configs"
    overrides = {**tiny_train_overrides(folder), "config_dir": str(configs)}
    train = _run("training", [configs / "train.json"], overrides, cwd=elsewhere)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (folder / "models" / "model.pt").is_file() and (folder / "models" / "pretrain.pt").is_file()
    infer = _run("inference", [configs / "inference.json"],
                 {"bundle_root": str(folder), "roi_size": [32, 32], **TINY_NET}, cwd=elsewhere)  # fmt: skip
    assert infer.returncode == 0, infer.stderr[-3000:]
    segs = sorted((folder / "eval" / "segmentations").glob("*_seg.nii.gz"))
    assert len(segs) == 2 and nib.load(segs[0]).shape == (32, 32)
