"""Stage 2 comparison on the embedded 2D task: supervised only, Mean Teacher, UnCoL, fully supervised.

    python bench/stage2_compare.py [--out bundle/eval/stage2_compare] [--stage1 bundle/eval/stage1_ablation]

Every method gets the same budget: stage 1 (pretrain.json's iterations) then stage 2 (train.json's
iterations), same seed, through the bundle's own configs:

- supervised only: stage 1 without distillation, stage 2 with the pseudo-label weight at 0;
- Mean Teacher: stage 1 without distillation, stage 2 with the specialized (EMA) teacher only;
- UnCoL: stage 1 with both distillation paths, stage 2 with both teachers;
- fully supervised: all training cases labelled, otherwise as supervised only.

``--stage1`` reuses the ``none`` and ``both`` checkpoints of ``bench/stage1_ablation.py``.
Writes ``<out>/stage2_compare.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai.bundle import run  # noqa: E402

CONFIGS = ROOT / "bundle" / "configs"
TRAIN, PRETRAIN, EVALUATE = (str(CONFIGS / f) for f in ("train.json", "pretrain.json", "evaluate.json"))

METHODS = {
    "supervised only": {"stage1": "none", "stage2": {"teachers": "specialized", "max_unsup_weight": 0.0}},
    "Mean Teacher": {"stage1": "none", "stage2": {"teachers": "specialized"}},
    "UnCoL": {"stage1": "both", "stage2": {"teachers": "both"}},
    "fully supervised": {
        "stage1": "none",
        "stage2": {"teachers": "specialized", "max_unsup_weight": 0.0, "unlabelled_key": "training"},
        "data": {"embedded_data#labelled_fraction": 1.0},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bundle" / "eval" / "stage2_compare"))
    parser.add_argument("--stage1", default=None, help="output folder of bench/stage1_ablation.py to reuse")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for name in args.methods:
        method = METHODS[name]
        root = out / name.replace(" ", "_")
        data = method.get("data", {})
        dataset = str(out / ("data_full" if data else "data") / "phantom2d")
        shared = {
            "bundle_root": str(root),
            "dataset_dir": dataset,
            "seed": args.seed,
            "config_dir": str(CONFIGS),
            "teacher_cache_dir": str(out / "teacher_cache"),
            **data,
        }
        (root / "models").mkdir(parents=True, exist_ok=True)
        reuse = Path(args.stage1 or "") / method["stage1"] / "models" / "pretrain.pt"
        start = time.perf_counter()
        if args.stage1 and not data and reuse.is_file():
            shutil.copy(reuse, root / "models" / "pretrain.pt")
        else:
            run("pretrain", config_file=[TRAIN, PRETRAIN], distillation=method["stage1"], **shared)
        run("training", config_file=TRAIN, **shared, **method["stage2"])
        seconds = time.perf_counter() - start
        run("evaluate", config_file=[TRAIN, EVALUATE], **shared)
        report = json.loads((root / "eval" / "report" / "report.json").read_text())
        results[name] = {"seconds": round(seconds, 1), **report["metrics"]}
        (out / "stage2_compare.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print("| method (10 % labels unless noted) | organ Dice | lesion Dice | organ HD95 mm | lesion HD95 mm |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        d, h = r["test_dice"], r["test_hd95"]
        dice = (
            f"{d['organ']['mean']:.3f} ± {d['organ']['std']:.3f} | {d['lesion']['mean']:.3f} ± {d['lesion']['std']:.3f}"
        )
        print(f"| {name} | {dice} | {h['organ']['mean']:.1f} | {h['lesion']['mean']:.1f} |")


if __name__ == "__main__":
    main()
