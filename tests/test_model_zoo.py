"""Model-zoo distribution: metadata valid against MONAI's schema, network in/out as declared, and a
TorchScript export of the student alone, all through ``python -m monai.bundle``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, REPO, save_student

#: the MONAI metadata schema, provided beside the project (no network here; see ../shared/monai/README.md);
#: UNCOL_META_SCHEMA points elsewhere, e.g. for a clone that does not sit beside ../shared
SCHEMA = Path(os.environ.get("UNCOL_META_SCHEMA", REPO.parent / "shared" / "monai" / "meta_schema_20240725.json"))
META = str(CONFIGS / "metadata.json")


def _bundle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_metadata_is_valid_and_complete():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channels == {"0": "background", "1": "organ", "2": "lesion"}
    for key in ("task", "authors", "license", "monai_version", "pytorch_version", "required_packages_version"):
        assert meta[key], key
    assert (REPO / "bundle" / "LICENSE").is_file() and (REPO / "bundle" / "docs" / "data_license.txt").is_file()
    if not SCHEMA.is_file():  # validating offline needs the schema file; nothing else can stand in for it
        pytest.skip(f"{SCHEMA}: MONAI metadata schema not on this machine (set UNCOL_META_SCHEMA)")
    out = _bundle("verify_metadata", "--meta_file", META, "--filepath", str(SCHEMA))
    assert out.returncode == 0 and "metadata is verified with no error" in out.stdout + out.stderr, out.stderr


def test_the_package_and_the_bundle_have_one_version():
    import tomllib

    package = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert package == meta["version"], "pyproject.toml and bundle/configs/metadata.json give different versions"
    assert meta["version"] == max(meta["changelog"], key=lambda v: tuple(map(int, v.split("."))))


SHAPE_3D = '["16*n", "16*n", "16*n"]'
#: metadata.json describes the 2D default; the 3D variant overrides the declared shapes
META_3D = [f"--_meta_#network_data_format#{k}#spatial_shape" for k in ("inputs#image", "outputs#pred")]


@pytest.mark.parametrize("configs", [["inference.json"], ["inference.json", "inference_3d.json"]])
def test_network_input_and_output_match_the_metadata(configs):
    config_file = json.dumps([str(CONFIGS / c) for c in configs])
    shape_3d = [a for key in META_3D for a in (key, SHAPE_3D)] if len(configs) == 2 else []
    args = ["verify_net_in_out", "network_def", "--meta_file", META, "--config_file", config_file, "--n", "2"]
    out = _bundle(*args, *shape_3d)
    assert out.returncode == 0 and "verified with no error" in out.stdout + out.stderr, out.stderr


def test_ckpt_export_writes_torchscript_of_the_student_only(tmp_path):
    from custom.networks.student import UnCoLStudent

    torch.manual_seed(0)
    student = UnCoLStudent(spatial_dims=2).eval()
    ckpt = save_student(student, tmp_path / "model.pt")
    ts = tmp_path / "model.ts"
    out = _bundle(
        "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(ckpt), "--key_in_ckpt", "model",
        "--meta_file", META, "--config_file", str(CONFIGS / "inference.json"), "--ckpt_path", str(ckpt),
    )  # fmt: skip
    assert out.returncode == 0 and ts.is_file(), out.stderr
    exported = torch.jit.load(str(ts))
    assert set(exported.state_dict()) == set(student.state_dict())  # no teacher, no adapter, no projections
    x = torch.randn(1, 1, 64, 48)
    with torch.no_grad():
        assert torch.allclose(exported(x), student(x), atol=1e-5)
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(ts), _extra_files=extra)
    assert (
        json.loads(extra["metadata.json"])["version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]
    )
