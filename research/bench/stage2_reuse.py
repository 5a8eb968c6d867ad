"""Stage 2 with the generalized teacher's output reused within a box tolerance: how often the mask
decoder is skipped, what it saves in wall time, and what it does to test Dice.

    python -m research.bench.stage2_reuse [--tolerances 0 1 2] [--mean-teacher] [--out research/work/stage2_reuse]

One stage 1 checkpoint (pretrain.json, both distillation paths), then stage 2 (train.json, both
teachers) once per tolerance, same seed and data, each followed by evaluate.json. The embedded 2D
task at the default size and budget. The teacher's encoder cache is filled before the first timed
run; results accumulate in the JSON across invocations. Prints a Markdown table and writes ``<out>/stage2_reuse.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from monai.bundle import ConfigParser, run

from research.bench.sweep import warm_teacher_cache

ROOT = Path(__file__).resolve().parents[2]


CONFIGS = ROOT / "bundle" / "configs"
TRAIN, PRETRAIN, EVALUATE = (str(CONFIGS / f) for f in ("train.json", "pretrain.json", "evaluate.json"))


def train_stage2(overrides: dict) -> dict:
    """Run train.json's ``initialize`` and ``run`` in this process; return the iteration's reuse counters."""
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update(overrides)
    for item in ("initialize", "run"):
        parser.get_parsed_content(item)
    iteration = parser.get_parsed_content("semi_supervised_iteration")
    return {"decoder_visits": iteration.generalized_calls, "reused": iteration.generalized_reused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "research" / "work" / "stage2_reuse"))
    parser.add_argument("--tolerances", nargs="+", type=float, default=[0.0, 1.0, 2.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mean-teacher", action="store_true", help="also time a Mean Teacher stage 2 (reference)")
    args = parser.parse_args()
    out = Path(args.out)
    shared = {
        "dataset_dir": str(out / "data" / "phantom2d"),
        "teacher_cache_dir": str(out / "teacher_cache"),
        "seed": args.seed,
        "config_dir": str(CONFIGS),
    }
    stage1 = out / "stage1"
    if not (stage1 / "models" / "pretrain.pt").is_file():
        run("pretrain", config_file=[TRAIN, PRETRAIN], bundle_root=str(stage1), **shared)
    saved = out / "stage2_reuse.json"
    results = json.loads(saved.read_text())["results"] if saved.is_file() else {}
    warm_teacher_cache([TRAIN], {"bundle_root": str(out), **shared})
    runs = {f"{t:g}": {"teachers": "both", "reuse_tolerance": t} for t in args.tolerances}
    if args.mean_teacher:
        runs["Mean Teacher"] = {"teachers": "specialized"}
    for name, overrides in runs.items():
        root = out / name.replace(" ", "_")
        (root / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy(stage1 / "models" / "pretrain.pt", root / "models" / "pretrain.pt")
        start = time.perf_counter()
        counts = train_stage2({"bundle_root": str(root), **overrides, **shared})
        seconds = time.perf_counter() - start
        run("evaluate", config_file=[TRAIN, EVALUATE], bundle_root=str(root), **shared)
        report = json.loads((root / "eval" / "report" / "report.json").read_text())
        results[name] = {"stage2_seconds": round(seconds, 1), **counts, **report["metrics"]}
        saved.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print("| stage 2 (reuse tolerance, px) | decoder skipped | stage 2 wall time | organ Dice | lesion Dice |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        d = r["test_dice"]
        skipped = f"{r['reused'] / r['decoder_visits']:.0%}" if r["decoder_visits"] else "-"
        print(
            f"| {name} | {skipped} | {r['stage2_seconds']:.0f} s | "
            f"{d['organ']['mean']:.3f} | {d['lesion']['mean']:.3f} |"
        )


if __name__ == "__main__":
    main()
