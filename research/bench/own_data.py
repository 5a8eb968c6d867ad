"""The README's "Train on your own data" commands, run as a new user would, on a dataset that is not
the embedded one: non-square 2D images of two sizes (176x208 and 160x192 pixels), 4 classes, a
Decathlon-style datalist with relative paths, from a working directory outside the repository.

    python -m research.bench.own_data [--work /tmp/own_data] [--quick]

Writes the dataset and the run under ``--work``, keeps the commands' output in
``research/results/own_data_2d.log`` and a summary (commands, seconds, test Dice and HD95 per
class) in ``research/results/own_data_2d.json``. The images are synthetic (three nested-ish
structures of different sizes and intensities under noise and a bias field): this checks that the
path works end to end on data shaped like a user's, it is not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from custom.data.phantoms import OWN_DATA_COUNTS as COUNTS
from custom.data.phantoms import OWN_DATA_LABELS as LABELS
from custom.data.phantoms import write_own_data_example as write_dataset

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle"
RESULTS = ROOT / "research" / "results"


def without_progress_bars(text: str) -> str:
    """``text`` without the progress-bar lines (tqdm and Ignite's ``ProgressBar``) a terminal overwrites."""
    bar = re.compile(r"\d+%\|")
    return "\n".join(line for line in text.splitlines() if line.strip() and not bar.search(line))


def readme_commands(python: str, schedule: list[str]) -> dict[str, list[str]]:
    """The three commands of the README's section, with ``BUNDLE`` filled in."""
    run = [python, "-m", "monai.bundle", "run"]
    root = ["--bundle_root", str(BUNDLE)]
    data = ["--use_embedded_data", "False", "--datalist", "my_data/datalist.json"]
    evaluate = json.dumps([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "evaluate.json")])
    return {
        "training": [*run, "training", "--config_file", str(BUNDLE / "configs" / "train.json"), *root, *data,
                     "--ckpt_dir", "my_run/models", "--output_dir", "my_run/eval", *schedule],
        "inference": [*run, "inference", "--config_file", str(BUNDLE / "configs" / "inference.json"), *root,
                      "--ckpt_path", "my_run/models/model.pt", "--input_dir", "my_scans",
                      "--output_dir", "my_run/segmentations"],
        "evaluate": [*run, "evaluate", "--config_file", evaluate, *root, *data,
                     "--ckpt_path", "my_run/models/model.pt", "--output_dir", "my_run/eval"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/uncol_own_data"))
    parser.add_argument("--quick", action="store_true", help="2 epochs of 4 iterations per stage (smoke run)")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    if (work / "my_run").exists():
        raise SystemExit(f"error: {work / 'my_run'} exists; give a fresh --work folder")
    datalist = write_dataset(work / "my_data", [(176, 208), (160, 192)], (1.0, 1.0))
    scans = work / "my_scans"
    scans.mkdir(exist_ok=True)
    for item in json.loads(datalist.read_text())["test"]:
        (scans / Path(item["image"]).name).symlink_to(datalist.parent / item["image"])
    schedule = ["--max_epochs", "2", "--pretrain_epochs", "2", "--iterations_per_epoch", "4"] if args.quick else []
    log_lines, seconds = [], {}
    for name, cmd in readme_commands(sys.executable, schedule).items():
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        seconds[name] = round(time.perf_counter() - start, 1)
        shown = shlex.join(cmd).replace(str(BUNDLE), "$BUNDLE").replace(sys.executable, "python")
        log_lines += [f"$ {shown}", proc.stdout + proc.stderr]
        if proc.returncode != 0:
            print("\n".join(log_lines)[-5000:])
            raise SystemExit(f"error: {name} failed with exit code {proc.returncode}")
    report = json.loads((work / "my_run" / "eval" / "report" / "report.json").read_text())
    segmentations = sorted(p.name for p in (work / "my_run" / "segmentations").glob("*_seg.nii.gz"))
    summary = {
        "command": "python -m research.bench.own_data" + (" --quick" if args.quick else ""),
        "image_sizes": [[176, 208], [160, 192]],
        "cases": COUNTS,
        "labels": LABELS,
        "seconds": seconds,
        "segmentations": len(segmentations),
        "test_dice": {k: round(v["mean"], 4) for k, v in report["metrics"]["test_dice"].items()},
        "test_hd95_mm": {k: round(v["mean"], 2) for k, v in report["metrics"]["test_hd95"].items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    text = without_progress_bars("\n".join(log_lines))
    (RESULTS / f"own_data_2d{suffix}.log").write_text(text.replace(str(work), "$WORK").replace(str(ROOT), "$REPO"))
    (RESULTS / f"own_data_2d{suffix}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
