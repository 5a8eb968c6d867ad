"""``make bundle`` ships the product and nothing else (configs, user docs, the trained model, ``custom/``
code, license files), and the commands of the shipped ``docs/README.md`` train and infer in the
unzipped bundle, importing its own copy of ``custom/``."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import REPO, TINY_NET, save_student, tiny_train_overrides

from scripts.make_bundle import build

NAME = "uncol_monai"
#: seed of the embedded tiny dataset the shipped model is recorded for (the README run is given it)
DATA_SEED = 0
#: what a training run leaves beside model.pt (stage 1, resumable state, per-epoch states)
TRAINING_STATE = ("pretrain.pt", "stage2_last.pt", "checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt")


@dataclass
class Shipped:
    """A bundle built from a tiny trained model, and what it was built from."""

    archive: Path
    model: dict  # the source model.pt's content
    labelled_cases: str  # fingerprint of the tiny run's labelled cases
    images: Path  # tiny test images to segment


def tiny_run_overrides() -> dict:
    """The tiny-size overrides of a bundle run, without paths into the repository (the unzipped bundle
    uses its own configs and folders)."""
    overrides = tiny_train_overrides(Path("."))
    del overrides["bundle_root"], overrides["config_dir"]
    return {**overrides, "embedded_data#seed": DATA_SEED}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Shipped:
    """``build`` on a models folder holding a tiny model.pt (recorded for the tiny embedded data, with
    EMA state in it) beside the training state a run leaves there."""
    from custom.data.phantoms import generate_dataset
    from custom.handlers.checkpoints import labelled_fingerprint
    from custom.networks.student import UnCoLStudent

    tmp = tmp_path_factory.mktemp("make_bundle")
    overrides = tiny_run_overrides()
    data = {k.split("#")[1]: v for k, v in overrides.items() if k.startswith("embedded_data#")}
    datalist = generate_dataset(tmp / "data", spatial_dims=2, **{**data, "shape": tuple(data["shape"])})
    training = json.loads(datalist.read_text())["training"]
    labelled = [{k: str(datalist.parent / v) for k, v in item.items()} for item in training]
    models = tmp / "models"
    models.mkdir()
    torch.manual_seed(0)
    student = UnCoLStudent(spatial_dims=2, **{k.split("#")[1]: v for k, v in TINY_NET.items()})
    state = torch.load(save_student(student, models / "model.pt"), weights_only=True)
    state["record"]["labelled_cases"] = labelled_fingerprint(labelled)  # as the tiny run records it
    torch.save({**state, "ema": state["model"]}, models / "model.pt")
    for name in TRAINING_STATE:
        torch.save({"model": state["model"], "optimizer": {}}, models / name)
    build(tmp / "dist", models=models)
    return Shipped(tmp / "dist" / f"{NAME}.zip", state, state["record"]["labelled_cases"], datalist.parent / "imagesTs")


def user_files() -> set[str]:
    """The paths (inside the bundle) of every file the bundle should ship, from the repository."""
    bundle = REPO / "bundle"
    docs = {p.name for p in (bundle / "docs").iterdir() if p.suffix == ".md" or p.name == "data_license.txt"}
    return {
        "LICENSE", "large_files.yml", "requirements.txt", "models/model.pt", "models/model.ts",
        *(f"configs/{p.name}" for p in (bundle / "configs").iterdir()),
        *(f"docs/{name}" for name in docs),
        *(p.relative_to(REPO).as_posix() for p in (REPO / "custom").rglob("*.py") if "__pycache__" not in p.parts),
    }  # fmt: skip


def test_zip_ships_user_files_and_no_training_state(shipped, tmp_path):
    with zipfile.ZipFile(shipped.archive) as archive:
        names = {n.removeprefix(f"{NAME}/") for n in archive.namelist() if not n.endswith("/")}
        archive.extractall(tmp_path)
    for name in TRAINING_STATE:
        assert f"models/{name}" not in names
    assert {n for n in names if n.startswith("models/")} == {"models/model.pt", "models/model.ts"}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert {"docs/README.md", "docs/data_license.txt", "custom/engines/uncol.py", "configs/train.json"} <= names
    assert not [n for n in names if n.startswith("docs/") and (n.count("/") > 1 or n.endswith((".json", ".png")))]
    assert names == user_files()
    for config in ("train.json", "inference.json"):  # the docs' commands run from the bundle's own folder
        assert json.loads((tmp_path / NAME / "configs" / config).read_text())["bundle_root"] == "."
    model = torch.load(tmp_path / NAME / "models" / "model.pt", weights_only=True)
    assert set(model) == {"model", "record"}  # the EMA state of the source is left out
    assert model["record"] == shipped.model["record"]
    for key, value in shipped.model["model"].items():
        assert torch.equal(model["model"][key], value), key
    exported = torch.jit.load(str(tmp_path / NAME / "models" / "model.ts")).state_dict()
    assert set(exported) == set(model["model"])  # the tiny network as trained, not the config's default size
    assert all(torch.equal(exported[k], v) for k, v in model["model"].items())


def _copy_source(dest: Path) -> Path:
    """A copy of what ``build`` reads from the repository (bundle files, custom/, requirements.txt)."""
    bundle = REPO / "bundle"
    shutil.copytree(bundle / "configs", dest / "bundle" / "configs")
    (dest / "bundle" / "docs").mkdir()
    for path in [*(bundle / "docs").iterdir(), bundle / "LICENSE", bundle / "large_files.yml"]:
        if path.is_file():
            shutil.copy(path, dest / path.relative_to(REPO))
    shutil.copy(REPO / "requirements.txt", dest / "requirements.txt")
    shutil.copytree(REPO / "custom", dest / "custom", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_build_leaves_research_files_out_and_refuses_other_files(tmp_path):
    source = _copy_source(tmp_path / "repo")
    docs = source / "bundle" / "docs"
    (docs / "results").mkdir()
    (docs / "results" / "sweep.json").write_text("{}")
    (docs / "figure.png").write_bytes(b"png")
    (docs / "sweep.log").write_text("log")
    strays = [source / "custom" / "teachers" / "litemedsam.pth", source / "bundle" / "configs" / "old" / "train.json"]
    for stray in strays:
        stray.parent.mkdir(exist_ok=True)
        stray.write_text("{}")
    out = tmp_path / "dist"
    with pytest.raises(SystemExit) as refused:
        build(out, weights=False, source=source)
    message = str(refused.value)
    assert "refusing" in message and "\n" not in message
    assert "custom/teachers/litemedsam.pth" in message and "configs/old/train.json" in message
    assert not (out / f"{NAME}.zip").exists()
    for stray in strays:
        stray.unlink()
    build(out, weights=False, source=source)
    with zipfile.ZipFile(out / f"{NAME}.zip") as archive:
        names = [n.removeprefix(f"{NAME}/") for n in archive.namelist()]
    assert sorted(n for n in names if n.startswith("docs/") and n != "docs/") == [
        f"docs/{p.name}" for p in sorted(docs.iterdir()) if p.suffix == ".md" or p.name == "data_license.txt"
    ]
    assert [n for n in names if n.startswith("models/")] == ["models/"]


def test_build_needs_a_trained_model_with_its_record(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    torch.save({"model": {}, "optimizer": {}}, models / "stage2_last.pt")
    with pytest.raises(SystemExit, match="model.pt: no trained model"):
        build(tmp_path / "dist", models=models)
    torch.save({"weight": torch.zeros(2)}, models / "model.pt")  # a plain state dict: inference would refuse it
    with pytest.raises(SystemExit, match="model.pt: not a bundle model checkpoint"):
        build(tmp_path / "dist", models=models)
    assert not (tmp_path / "dist" / f"{NAME}.zip").exists()


def readme_commands(readme: Path, run_ids: tuple[str, ...]) -> dict[str, list[str]]:
    """The ``python -m monai.bundle run <id>`` lines of the fenced bash block that opens the README's
    "Commands" section, split into arguments, by run id; fails naming what is missing."""
    lines = readme.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if re.fullmatch(r"#+ Commands\b.*", line)), len(lines))
    fence = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("#", "```"))), len(lines))
    if fence == len(lines) or lines[fence].strip() != "```bash":
        pytest.fail(f"{readme}: no fenced bash block opening a 'Commands' section (the shipped docs' commands)")
    end = next((i for i in range(fence + 1, len(lines)) if lines[i].startswith("```")), len(lines))
    block = "\n".join(lines[fence + 1 : end]).replace("\\\n", " ").splitlines()
    commands = {}
    for run_id in run_ids:
        found = [shlex.split(line) for line in block if re.match(rf"python -m monai\.bundle run {run_id}\b", line)]
        if not found:
            pytest.fail(f"{readme}: its Commands block has no 'python -m monai.bundle run {run_id}' line")
        commands[run_id] = found[0]
    return commands


def _run(argv: list[str], overrides: dict, cwd: Path) -> subprocess.CompletedProcess:
    """``argv`` (a ``python ...`` command line) with this interpreter and ``--key value`` overrides
    appended, in ``cwd``; without PYTHONPATH, so only the bundle's own custom/ can be imported."""
    cmd = [sys.executable, *argv[1:]]
    for key, value in overrides.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_readme_commands_train_and_infer_in_the_unzipped_bundle(shipped, tmp_path):
    with zipfile.ZipFile(shipped.archive) as archive:
        archive.extractall(tmp_path / "unzipped")
    root = tmp_path / "unzipped" / NAME
    commands = readme_commands(root / "docs" / "README.md", ("training", "inference"))
    train = _run(commands["training"], tiny_run_overrides(), cwd=root)
    assert train.returncode == 0, train.stderr[-3000:]
    trained = torch.load(root / "models" / "model.pt", weights_only=True)
    assert trained["record"]["labelled_cases"] == shipped.labelled_cases
    assert any(not torch.equal(v, shipped.model["model"][k]) for k, v in trained["model"].items())  # retrained
    assert (root / "models" / "pretrain.pt").is_file()  # stage 1 ran first, as no stage 1 is shipped
    infer_overrides = {"roi_size": [32, 32], **TINY_NET}
    infer = [str(shipped.images) if a == "<images>" else a for a in commands["inference"]]
    out = _run(infer, infer_overrides, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    segs = sorted((root / "eval" / "segmentations").glob("*_seg.nii.gz"))
    assert len(segs) == 2 and nib.load(segs[0]).shape == (32, 32)
    # from any other folder, with the configs' own import of the bundle's custom/
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = str(root / "configs" / "inference.json")
    argv = ["python", "-m", "monai.bundle", "run", "inference", "--config_file", config]
    paths = {"bundle_root": str(root), "input_dir": str(shipped.images), "output_dir": str(elsewhere / "segs")}
    out = _run(argv, {**paths, **infer_overrides}, cwd=elsewhere)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((elsewhere / "segs").glob("*_seg.nii.gz"))) == 2
