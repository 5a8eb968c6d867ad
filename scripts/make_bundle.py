"""Build the self-contained, model-zoo style bundle: ``dist/uncol_monai/`` and ``dist/uncol_monai.zip``.

    python scripts/make_bundle.py [--out dist] [--name uncol_monai] [--models bundle/models] [--no-weights]

The bundle is what a user of the trained model gets, nothing else: ``configs/``, the user docs
(``docs/*.md`` and ``docs/data_license.txt``), ``models/model.pt`` (the student's weights and its
training record, all that inference loads) with its TorchScript export ``models/model.ts``,
``LICENSE``, ``large_files.yml``, ``requirements.txt`` and a copy of ``custom/`` (Python sources only)
at its root, where every config's ``initialize`` puts it on ``sys.path`` (``@import_custom_code``).
Training state (``pretrain.pt``, ``stage2_last.pt``, ``checkpoint_epoch=N.pt``), research results and
caches stay behind; a file outside that list stops the build with one line naming it.

The configs default ``bundle_root`` to ``.``, so the commands of the bundle's ``docs/README.md`` run
from the unzipped folder (the one holding ``configs/``); from any other working directory pass
``--bundle_root <folder>``:

    python -m monai.bundle run inference --config_file <folder>/configs/inference.json --bundle_root <folder> \\
        --input_dir <images>
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what the bundle ships besides ``custom/**/*.py``, as patterns over its paths (``*`` stays within one folder)
SHIPPED = (
    "LICENSE",
    "large_files.yml",
    "requirements.txt",
    "configs/*.json",
    "configs/logging.conf",
    "docs/*.md",
    "docs/data_license.txt",
    "models/model.pt",
    "models/model.ts",
)
#: the only entries of ``model.pt`` that inference reads (``CheckpointLoader`` and the record check)
MODEL_KEYS = ("model", "record")


def build(
    out: Path,
    name: str = "uncol_monai",
    weights: bool = True,
    models: Path | None = None,
    source: Path | None = None,
) -> Path:
    """Write ``out/name/`` and ``out/name.zip``; return the folder.

    Args:
        out: folder that receives the bundle folder and its zip.
        name: the bundle's name (folder, zip and the zip's top folder).
        weights: ship the trained model (``models/model.pt`` is then required); False leaves ``models/`` empty.
        models: where the trained ``model.pt`` is read from (default: the source's ``bundle/models``).
        source: the repository to package (default: this one), holding ``bundle/``, ``custom/`` and
            ``requirements.txt``.
    """
    source = Path(source or ROOT)
    bundle = source / "bundle"
    target = out / name
    archive = out / f"{name}.zip"
    archive.unlink(missing_ok=True)  # a refused build must not leave an older zip looking current
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copytree(bundle / "configs", target / "configs")
    (target / "docs").mkdir()
    for doc in sorted((bundle / "docs").iterdir()):
        if doc.is_file() and (doc.suffix == ".md" or doc.name == "data_license.txt"):
            shutil.copy(doc, target / "docs" / doc.name)
    for f in ("LICENSE", "large_files.yml"):
        shutil.copy(bundle / f, target / f)
    shutil.copy(source / "requirements.txt", target / "requirements.txt")
    shutil.copytree(source / "custom", target / "custom", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    set_bundle_root(target / "configs")
    (target / "models").mkdir()
    if weights:
        ship_model(Path(models or bundle / "models") / "model.pt", target / "models" / "model.pt")
        export_torchscript(target)
    refused = unshipped(target)
    if refused:
        shown = ", ".join(refused[:10]) + (f" and {len(refused) - 10} more" if len(refused) > 10 else "")
        raise SystemExit(f"error: {target}: refusing to ship files that are not the bundle's user files: {shown}")
    shutil.make_archive(str(out / name), "zip", root_dir=out, base_dir=name)
    return target


def set_bundle_root(configs: Path) -> None:
    """Point every config that sets ``bundle_root`` at ``.`` (the bundle's own folder), editing only that
    line so the configs keep their layout."""
    for path in sorted(configs.glob("*.json")):
        text = path.read_text()
        if '"bundle_root"' not in text:
            continue
        edited = re.sub(r'^(\s*"bundle_root"\s*:\s*)"[^"]*"', r'\1"."', text, count=1, flags=re.M)
        if json.loads(edited).get("bundle_root") != ".":
            raise SystemExit(f"error: {path}: cannot set its top-level bundle_root to '.'")
        path.write_text(edited)


def ship_model(src: Path, dst: Path) -> None:
    """Write the student's weights and training record of checkpoint ``src`` to ``dst``, nothing else:
    a user's inference loads only those, and optimizer or EMA state would only make the bundle larger."""
    import torch

    if not src.is_file():
        raise SystemExit(f"error: {src}: no trained model; train the bundle first (make demo) or pass --no-weights")
    state = torch.load(src, map_location="cpu", weights_only=True)
    if not (isinstance(state, dict) and all(isinstance(state.get(k), dict) for k in MODEL_KEYS)):
        raise SystemExit(
            f"error: {src}: not a bundle model checkpoint (it needs the student's weights under 'model' and its "
            "training record under 'record', as the bundle's training writes them)"
        )
    dropped = sorted(set(state) - set(MODEL_KEYS))
    if dropped:
        print(f"{src}: shipping {' and '.join(MODEL_KEYS)} only, leaving out {', '.join(dropped)}")
    weights = {k: v.detach().clone() for k, v in state["model"].items()}  # no storage shared with other state
    torch.save({"model": weights, "record": state["record"]}, dst)


def export_torchscript(target: Path) -> None:
    """``models/model.ts``: the student alone, via MONAI's ``ckpt_export`` (metadata and config embedded),
    built with the architecture recorded in ``model.pt`` (MONAI copies only the weights whose shapes
    match, so a network of another size would otherwise be exported untrained); stops if the export
    does not hold ``model.pt``'s weights."""
    import torch

    target = target.resolve()
    models, configs = target / "models", target / "configs"
    ckpt = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    network = {k: v for k, v in ckpt["record"].get("network", {}).items() if k != "class" and v is not None}
    config_file = str(configs / "inference.json")
    if network.get("spatial_dims") == 3 and (configs / "inference_3d.json").is_file():
        config_file = json.dumps([config_file, str(configs / "inference_3d.json")])
    overrides = [a for k, v in network.items() for a in (f"--network_def#{k}", str(v))]
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
         "--filepath", str(models / "model.ts"), "--ckpt_file", str(models / "model.pt"), "--key_in_ckpt", "model",
         "--meta_file", str(configs / "metadata.json"), "--config_file", config_file,
         "--bundle_root", str(target), *overrides],
        check=True,
        cwd=target,  # the bundle's own custom/ builds the network
    )  # fmt: skip
    with warnings.catch_warnings():  # TorchScript's deprecation notice: the zoo format is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        exported = torch.jit.load(str(models / "model.ts"), map_location="cpu").state_dict()
    trained = ckpt["model"]
    if set(exported) != set(trained) or any(not torch.equal(exported[k], trained[k]) for k in trained):
        raise SystemExit(f"error: {models / 'model.ts'}: the TorchScript export does not hold model.pt's weights")


def unshipped(target: Path) -> list[str]:
    """The files under ``target`` that the bundle must not ship (not matching :data:`SHIPPED`), as paths
    relative to ``target``."""
    refused = []
    for path in sorted(p for p in target.rglob("*") if not p.is_dir()):
        rel = path.relative_to(target).as_posix()
        if rel.startswith("custom/"):
            shipped = rel.endswith(".py") and "__pycache__" not in rel.split("/")
        else:
            shipped = any(fnmatch.fnmatch(rel, p) and rel.count("/") == p.count("/") for p in SHIPPED)
        if not shipped:
            refused.append(rel)
    return refused


def megabytes(path: Path) -> str:
    """``path``'s size in MB (10^6 bytes), as the docs quote it."""
    return f"{path.stat().st_size / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "dist"))
    parser.add_argument("--name", default="uncol_monai")
    parser.add_argument("--models", default=str(ROOT / "bundle" / "models"), help="folder holding the trained model.pt")
    parser.add_argument("--no-weights", action="store_true", help="leave models/ empty")
    args = parser.parse_args(argv)
    target = build(Path(args.out), args.name, weights=not args.no_weights, models=Path(args.models))
    archive = target.with_name(f"{target.name}.zip")
    shipped = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    print(f"bundle folder {target}\nbundle archive {archive}: {megabytes(archive)}, {len(shipped)} files")
    for model in sorted((target / "models").glob("*")):
        print(f"  models/{model.name}: {megabytes(model)}")


if __name__ == "__main__":
    main()
