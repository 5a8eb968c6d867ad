"""Connected components of a trained student's test predictions: where its false positives are.

    python -m research.bench.component_audit --setting 3d_patch --fraction 1.0 --seed 0 --method supervised \
        --out research/results/component_audit/3d_patch_1.0_supervised_seed0.json

Runs the bundle's evaluation (``evaluate.json``: sliding-window inference, softmax, inversion to the
image's grid, argmax) of one sweep run on its validation and test splits and, per class and case,
counts the predicted connected components (full connectivity: 26 neighbours in 3D), the share of
predicted voxels outside the largest one, the share of those stray voxels that lie on no
ground-truth voxel of the class, and Dice / HD95 (mm) as predicted and with only each class's
largest component kept (the bundle's ``largest_component_labels`` post-processing,
:mod:`custom.data.postprocess`). Which post-processing to adopt is read from the validation split;
the test split is reported beside it.

    python -m research.bench.component_audit --report-only

rebuilds the ``component-audit`` table of research/results.md from the committed JSONs in
``research/results/component_audit/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.metrics import DiceMetric
from scipy import ndimage

from custom.data.postprocess import KeepLargestComponentd, largest_component
from custom.metrics import PhysicalHausdorffDistanceMetric
from research.bench.sweep import CONFIGS, EVALUATE, commit, setting_overrides, train_configs

ROOT = Path(__file__).resolve().parents[2]


SPLITS = ("validation", "test")
RESULTS = ROOT / "research" / "results" / "component_audit"
PAGE = ROOT / "research" / "results.md"
METHOD_NAMES = {"supervised": "supervised only", "mean_teacher": "Mean Teacher", "distilled_supervised":
                "distillation + supervised", "uncol": "UnCoL (both teachers)"}  # fmt: skip


def keep_largest(pred: torch.Tensor) -> torch.Tensor:
    """One-hot ``(1 + C, *S)`` prediction with every foreground class cut to its largest component by
    the bundle's own post-processing (``largest_component_labels``)."""
    classes = len(pred)
    labels = KeepLargestComponentd("pred", range(1, classes))({"pred": pred.argmax(0, keepdim=True)})["pred"]
    return torch.nn.functional.one_hot(labels[0].long(), classes).movedim(-1, 0).to(pred)


def components(pred: np.ndarray, truth: np.ndarray) -> tuple[int, float, float]:
    """Of one class's predicted mask and its ground truth (bool): the number of connected components,
    the share of predicted voxels outside the largest one, and the share of those stray voxels that
    miss the ground truth."""
    count = ndimage.label(pred, structure=ndimage.generate_binary_structure(pred.ndim, pred.ndim))[1]
    if count == 0:
        return 0, 0.0, 0.0
    stray = pred & ~largest_component(pred)
    share = float(stray.sum() / pred.sum())
    missed = float((stray & ~truth).sum() / stray.sum()) if stray.any() else 0.0
    return count, share, missed


def evaluate(parser: ConfigParser, classes: list[str]) -> list[dict]:
    """Per case: per class components and Dice / HD95 raw and with the largest component kept."""
    evaluator = parser.get_parsed_content("validate#evaluator")
    dice, hd95 = (
        DiceMetric(include_background=False),
        PhysicalHausdorffDistanceMetric(include_background=False, percentile=95),
    )
    cases: list[dict] = []

    def collect(engine) -> None:
        for item in engine.state.output:
            pred, label = item["pred"], item["label"]
            kept = keep_largest(pred)
            case = {"name": Path(str(item["image"].meta.get("filename_or_obj", ""))).name, "classes": {}}
            for variant, p in (("raw", pred), ("largest", kept)):
                d = dice(p[None], label[None])[0]
                h = hd95(p[None], label[None])[0]
                for c, name in enumerate(classes):
                    entry = case["classes"].setdefault(name, {})
                    entry[f"dice_{variant}"] = float(d[c])
                    entry[f"hd95_{variant}"] = float(h[c])
            for c, name in enumerate(classes):
                count, share, missed = components((pred[c + 1] > 0).cpu().numpy(), (label[c + 1] > 0).cpu().numpy())
                case["classes"][name] |= {"components": count, "stray_share": share, "stray_off_truth": missed}
            cases.append(case)

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, collect)
    evaluator.run()
    return cases


def summary(cases: list[dict], classes: list[str]) -> dict:
    """Per class, the mean (over the cases where it is defined) of every per-case figure."""
    out = {}
    for name in classes:
        out[name] = {}
        for key in cases[0]["classes"][name]:
            values = [v for case in cases if (v := case["classes"][name][key]) == v and abs(v) != float("inf")]
            out[name][key] = {"mean": round(statistics.fmean(values), 4) if values else None, "n": len(values)}
    return out


def report_table(results: list[dict]) -> str:
    """One row per (run, split, class): components, stray share, and Dice / HD95 before and after."""
    rows = [
        "Every figure is the mean over the split's cases where it is defined (no spread is shown); Dice and "
        "HD95 as predicted and with only each class's largest connected component kept.",
        "",
        "| labelled | method | split | class | components | stray voxels | stray off the truth "
        "| Dice | Dice, largest kept | HD95 (mm) | HD95, largest kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(figure: dict, digits: int = 3) -> str:
        return "n/a" if figure["mean"] is None else f"{figure['mean']:.{digits}f}"

    for r in sorted(results, key=lambda r: (r["fraction"], list(METHOD_NAMES).index(r["method"]), r["seed"])):
        for split in SPLITS:
            for name, f in r["splits"][split]["summary"].items():
                cells = [f"{r['fraction']:.0%}", METHOD_NAMES[r["method"]], split, name, cell(f["components"], 1)]
                cells += [f"{100 * f['stray_share']['mean']:.1f} %", f"{100 * f['stray_off_truth']['mean']:.0f} %"]
                cells += [
                    cell(f["dice_raw"]),
                    cell(f["dice_largest"]),
                    cell(f["hd95_raw"], 1),
                    cell(f["hd95_largest"], 1),
                ]
                rows.append("| " + " | ".join(cells) + " |")
    minutes = sum(r["seconds"] for r in results) / 60
    commits = sorted({r["commit"] for r in results if r.get("commit")})
    at = f"at commit(s) {', '.join(commits)}" if commits else "the JSONs record no commit"
    rows.append(f"\nProduced by these commands after the sweep's runs ({minutes:.0f} min in all; {at}):\n")
    for r in results:
        name = f"{r['setting']}_{r['fraction']}_{r['method']}_seed{r['seed']}.json"
        rows.append(
            f"    python -m research.bench.component_audit --setting {r['setting']} --fraction {r['fraction']} "
            f"--method {r['method']} --seed {r['seed']} --out research/results/component_audit/{name}"
        )
    return "\n".join(rows)


def section_text(results_dir: Path = RESULTS) -> str:
    """The ``component-audit`` section from the committed JSONs (nothing is written)."""
    return report_table([json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))])


def report(page: Path = PAGE) -> None:
    from research.bench.report import replace_section

    replace_section(page, "component-audit", section_text())


def main(argv: list[str] | None = None) -> dict:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--setting", default="3d_patch")
    args.add_argument("--fraction", type=float, default=1.0)
    args.add_argument("--seed", type=int, default=0)
    args.add_argument("--method", default="supervised")
    args.add_argument("--work", type=Path, default=ROOT / "research" / "work" / "sweep")
    args.add_argument("--out", type=Path, help="the audit's JSON (required unless --report-only)")
    args.add_argument("--report-only", action="store_true", help="rebuild results.md's table from the JSONs")
    args.add_argument("--results-md", type=Path, default=PAGE, help="the page --report-only writes")
    opts = args.parse_args(argv)
    if opts.report_only:
        report(opts.results_md)
        return {}
    if opts.out is None:
        args.error("--out is required")
    work = opts.work / opts.setting
    run = work / f"fraction_{opts.fraction:g}" / f"seed{opts.seed}" / opts.method
    dataset = work / "data" / f"fraction_{opts.fraction:g}"
    overrides = setting_overrides(opts.setting, opts.fraction, opts.seed, dataset, work / "teacher_cache")
    start = time.perf_counter()
    result: dict = {"setting": opts.setting, "fraction": opts.fraction, "seed": opts.seed, "method": opts.method}
    result["commit"] = commit()
    result["splits"] = {}
    for split in SPLITS:
        parser = ConfigParser()
        parser.read_config([*train_configs(opts.setting), EVALUATE])
        parser.update({"bundle_root": str(run), **overrides, "validate#datalist#key": split})
        parser["validate#handlers"] = parser["validate#handlers"][:1]  # the checkpoint loader: no report written
        parser.get_parsed_content("embedded_data")
        parser.get_parsed_content("checkpoint_check")
        classes = parser.get_parsed_content("class_names")
        cases = evaluate(parser, classes)
        result["splits"][split] = {"summary": summary(cases, classes), "cases": cases}
    result["seconds"] = round(time.perf_counter() - start, 1)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2))
    for split in SPLITS:
        for name, figures in result["splits"][split]["summary"].items():
            cells = ", ".join(f"{k} {v['mean']}" for k, v in figures.items())
            print(f"{split} {name}: {cells}")
    return result


if __name__ == "__main__":
    assert CONFIGS.is_dir()
    main()
