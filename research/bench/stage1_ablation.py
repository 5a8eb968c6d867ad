"""Stage 1 ablation: test Dice per class for distillation none / visual / semantic / both.

    python -m research.bench.stage1_ablation [--out research/work/stage1_ablation] [--max_epochs 16] [--seed 0]

Each mode runs the bundle's own pretrain config (same data, seed and iterations), then the evaluate
config on its checkpoint. Writes ``<out>/stage1_ablation.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from monai.bundle import run

ROOT = Path(__file__).resolve().parents[2]


CONFIGS = ROOT / "bundle" / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "research" / "work" / "stage1_ablation"))
    parser.add_argument("--modes", nargs="+", default=["none", "visual", "semantic", "both"])
    parser.add_argument("--max_epochs", type=int, default=None, help="default: pretrain.json's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    data = str(ROOT / "bundle" / "data" / "phantom2d")
    shared = {"dataset_dir": data, "teacher_cache_dir": str(out / "teacher_cache"), "seed": args.seed}
    if args.max_epochs:
        shared["max_epochs"] = args.max_epochs
    results = {}
    for mode in args.modes:
        root = out / mode
        start = time.perf_counter()
        run(
            "pretrain",
            config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "pretrain.json")],
            bundle_root=str(root),
            distillation=mode,
            **shared,
        )
        seconds = time.perf_counter() - start
        run(
            "evaluate",
            config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
            bundle_root=str(root),
            ckpt_path=str(root / "models" / "pretrain.pt"),
            **shared,
        )
        report = json.loads((root / "eval" / "report" / "report.json").read_text())
        results[mode] = {"train_seconds": round(seconds, 1), **report["metrics"]}
    (out / "stage1_ablation.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print("| distillation | organ Dice | lesion Dice | organ HD95 | lesion HD95 | train s |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        d, h = r["test_dice"], r["test_hd95"]
        print(
            f"| {mode} | {d['organ']['mean']:.3f} ± {d['organ']['std']:.3f} | {d['lesion']['mean']:.3f} ± "
            f"{d['lesion']['std']:.3f} | {h['organ']['mean']:.1f} | {h['lesion']['mean']:.1f} | {r['train_seconds']} |"
        )


if __name__ == "__main__":
    main()
