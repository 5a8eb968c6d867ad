"""Build the self-contained, model-zoo style bundle: ``dist/uncol_monai/`` and ``dist/uncol_monai.zip``.

    python scripts/make_bundle.py [--out dist] [--name uncol_monai] [--no-weights]

The folder holds ``configs/``, ``docs/``, ``models/`` (the trained checkpoints found in
``bundle/models/``, plus a TorchScript export when ``model.pt`` is there), ``LICENSE``,
``large_files.yml``, ``requirements.txt`` and a copy of ``custom/`` at its root, where every config's
``initialize`` puts it on ``sys.path`` (``@import_custom_code``). Its configs default ``bundle_root``
to ``.``; from any other working directory pass ``--bundle_root <folder>``:

    python -m monai.bundle run training --config_file <folder>/configs/train.json --bundle_root <folder>
    python -m monai.bundle run inference --config_file <folder>/configs/inference.json --bundle_root <folder> \\
        --input_dir <images>
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
CONFIGS_WITH_ROOT = ("train.json", "inference.json")


def build(out: Path, name: str = "uncol_monai", weights: bool = True) -> Path:
    """Write ``out/name/`` and ``out/name.zip``; return the folder."""
    target = out / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copytree(BUNDLE / "configs", target / "configs")
    shutil.copytree(BUNDLE / "docs", target / "docs", ignore=shutil.ignore_patterns("*.tmp"))
    for f in ("LICENSE", "large_files.yml"):
        shutil.copy(BUNDLE / f, target / f)
    shutil.copy(ROOT / "requirements.txt", target / "requirements.txt")
    shutil.copytree(ROOT / "custom", target / "custom", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for config in CONFIGS_WITH_ROOT:
        path = target / "configs" / config
        content = json.loads(path.read_text())
        content["bundle_root"] = "."
        path.write_text(json.dumps(content, indent=4) + "\n")
    (target / "models").mkdir()
    if weights:
        for ckpt in sorted((BUNDLE / "models").glob("*.pt")):
            shutil.copy(ckpt, target / "models" / ckpt.name)
        if (target / "models" / "model.pt").is_file():
            export_torchscript(target)
    shutil.make_archive(str(out / name), "zip", root_dir=out, base_dir=name)
    return target


def export_torchscript(target: Path) -> None:
    """``models/model.ts``: the student alone, via MONAI's ``ckpt_export`` (metadata and config embedded)."""
    configs = target / "configs"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
         "--filepath", str(target / "models" / "model.ts"), "--ckpt_file", str(target / "models" / "model.pt"),
         "--key_in_ckpt", "model",
         "--meta_file", str(configs / "metadata.json"), "--config_file", str(configs / "inference.json"),
         "--bundle_root", str(target)],
        check=True,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "dist"))
    parser.add_argument("--name", default="uncol_monai")
    parser.add_argument("--no-weights", action="store_true", help="leave models/ empty")
    args = parser.parse_args(argv)
    target = build(Path(args.out), args.name, weights=not args.no_weights)
    print(f"bundle folder {target}\nbundle archive {target}.zip")


if __name__ == "__main__":
    main()
