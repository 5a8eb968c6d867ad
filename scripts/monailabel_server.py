"""Serve the exported bundle in a real MONAI Label server (its stock ``monaibundle`` app), offline.

    make label-serve                      # make bundle + make label-install, then this script
    .venv-label/bin/python scripts/monailabel_server.py --bundle dist/uncol_monai --studies DIR [--port 8000]

MONAI Label runs in its own environment (``.venv-label``, see requirements-label.txt for why). This
script copies MONAI Label's stock ``monaibundle`` app out of the installed package, puts the bundle
in the app's ``model/`` folder and starts ``monailabel start_server`` with the model zoo switched off
(``zoo_source github``: a local bundle folder is used as is), SAM2 off and training off unless
``--train``. Then:

    curl -X POST "http://127.0.0.1:8000/infer/uncol_monai?image=<study id>&output=image" -o label.nii.gz

With ``--strategy`` the app also offers UnCoL's active-learning strategy (``scripts/monailabel_app.py``):

    curl -X POST "http://127.0.0.1:8000/activelearning/uncol_monai_uncertainty"     # {"id": <study>, ...}

With ``--train``, MONAI Label trains the bundle (stage 2 from its model.pt) on the studies' final labels:

    curl -X POST "http://127.0.0.1:8000/train/uncol_monai?run_sync=true" -H "Content-Type: application/json" \
         -d '{"max_epochs": 10, "device": "cpu", "val_split": 0.2}'
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def prepare_app(bundle: Path, app_dir: Path, python: str = sys.executable, strategy: bool = False) -> Path:
    """``app_dir``: MONAI Label's stock ``monaibundle`` app with ``bundle`` in its ``model/`` folder; with
    ``strategy``, extended by ``scripts/monailabel_app.py`` (UnCoL's active-learning strategy)."""
    if not (bundle / "configs" / "inference.json").is_file() or not (bundle / "models" / "model.pt").is_file():
        raise SystemExit(f"error: {bundle}: not an exported bundle with weights (run `make demo` then `make bundle`)")
    if not (app_dir / "main.py").is_file():
        app_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [python, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle"]
        subprocess.run([*cmd, "--output", str(app_dir.parent)], check=True, capture_output=True, text=True)
        if app_dir.name != "monaibundle":
            shutil.move(app_dir.parent / "monaibundle", app_dir)
    if strategy and not (app_dir / "stock_main.py").is_file():
        (app_dir / "main.py").rename(app_dir / "stock_main.py")
        shutil.copy(Path(__file__).with_name("monailabel_app.py"), app_dir / "main.py")
    target = app_dir / "model" / bundle.name
    shutil.rmtree(target, ignore_errors=True)

    def skip(folder: str, names: list[str]) -> set[str]:  # the bundle's own outputs, not custom/data
        return {n for n in names if n == "__pycache__" or (Path(folder) == bundle and n in ("eval", "data", "cache"))}

    shutil.copytree(bundle, target, ignore=skip)
    return app_dir


def server_command(
    app_dir: Path, studies: Path, model: str, port: int, python: str = sys.executable, train: bool = False
) -> list[str]:
    """The ``monailabel start_server`` command line for ``model`` (the bundle folder name); with ``train``,
    MONAI Label may also train the bundle on its labelled studies (``POST /train/<model>``)."""
    conf = {"models": model, "zoo_source": "github", "sam2": "false", "skip_trainers": str(not train).lower()}
    cmd = [python, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    return [*cmd, "--host", "127.0.0.1", "--port", str(port)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("dist/uncol_monai"))
    parser.add_argument("--studies", type=Path, required=True, help="folder of images to label (NIfTI)")
    parser.add_argument("--app-dir", type=Path, default=Path("dist/monailabel/monaibundle"))
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--strategy", action="store_true", help="add UnCoL's active-learning strategy")
    parser.add_argument("--train", action="store_true", help="let MONAI Label train the bundle (labelled studies)")
    args = parser.parse_args()
    app_dir = prepare_app(args.bundle.resolve(), args.app_dir.resolve(), strategy=args.strategy)
    cmd = server_command(app_dir, args.studies.resolve(), args.bundle.name, args.port, train=args.train)
    print(" ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
