"""Real ``monai.bundle run`` workflows on a tiny generated dataset: train, infer, evaluate, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, TINY_NET, tiny_train_overrides
from monai.bundle import ConfigParser, run

TRAIN = str(CONFIGS / "train.json")
INFER = str(CONFIGS / "inference.json")
EVALUATE = str(CONFIGS / "evaluate.json")


def _cli_value(v):
    return json.dumps(v) if isinstance(v, list) else str(v)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train through the documented command line, as a user would, and return the bundle root."""
    root = tmp_path_factory.mktemp("bundle2d")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN]
    for key, value in tiny_train_overrides(root).items():
        cmd += [f"--{key}", _cli_value(value)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "val_mean_dice" in proc.stdout
    return root


def test_training_writes_a_loadable_checkpoint(trained):
    ckpt = trained / "models" / "model.pt"
    assert ckpt.is_file()
    net = ConfigParser.load_config_file(TRAIN)["network_def"]
    parser = ConfigParser({**ConfigParser.load_config_file(TRAIN), "bundle_root": str(trained)})
    parser.update(TINY_NET)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True), strict=True)
    assert net["_target_"] == "custom.networks.student.UnCoLStudent"


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
        bundle_root=str(trained),
        input_dir=str(src),
        output_dir=str(out),
        roi_size=[32, 32],
        **TINY_NET,
    )
    seg = nib.load(out / "case_a_seg.nii.gz")
    assert seg.shape == (37, 45)
    assert np.allclose(seg.affine, affine)
    assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2}


def test_evaluate_reports_dice_and_hd95_per_class(trained):
    run("evaluate", config_file=[TRAIN, EVALUATE], **tiny_train_overrides(trained))
    report = json.loads((trained / "eval" / "report" / "report.json").read_text())
    assert report["split"] == "test" and report["num_cases"] == 2
    assert set(report["metrics"]) == {"test_dice", "test_hd95"}
    for metric in report["metrics"].values():
        assert set(metric) == {"organ", "lesion"}
    organ = report["metrics"]["test_dice"]["organ"]
    assert 0.0 <= organ["mean"] <= 1.0 and organ["n"] == 2
    assert (trained / "eval" / "report" / "test_dice_raw.csv").is_file()


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


def test_3d_variant_trains(tmp_path):
    overrides = tiny_train_overrides(tmp_path, spatial_dims=3)
    overrides.update(
        {
            "embedded_data#shape": [32, 32, 16],
            "roi_size": [32, 32, 16],
            "train_patch": [32, 32, 16],
            "max_epochs": 1,
            "iterations_per_epoch": 1,
            "network_def#hidden_size": 48,
        }
    )
    run("training", config_file=[TRAIN, str(CONFIGS / "train_3d.json")], **overrides)
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["patch_embed.weight"].ndim == 5  # a 3D convolution: the 3D student was trained


def test_inference_and_training_build_the_same_network():
    train, infer = ConfigParser.load_config_file(TRAIN), ConfigParser.load_config_file(INFER)
    assert train["network_def"] == infer["network_def"]
    for key in ("spatial_dims", "num_classes", "axcodes", "pixdim", "roi_size"):
        assert train[key] == infer[key], key
