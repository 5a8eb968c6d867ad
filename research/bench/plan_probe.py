"""Plan versus defaults on probe datasets shaped like users' data (issue 36).

Each probe trains stage 1 without distillation (supervised Dice + CE on the labelled cases: what the plan
changes is how images are read, not the method) twice per (split seed, seed) pair:

- ``plan``: nothing given; the bundle plans pixdim, roi_size, normalisation and batch sizes from the data;
- ``defaults``: the values the bundle used before it planned (version 0.8.0), given on the command line.

Both are evaluated on the test split with ``evaluate.json`` (the checkpoint's own plan). Probes:
``colin27`` and ``macaque`` (real MRI slices, 181x217 at 1 mm and 168x206 at 0.5 mm, research/data/
real_brain.py; the split seed picks the labelled slices), ``ct2d`` (CT-like, binary, 160x120 at 0.75 mm)
and ``aniso3d`` (0.8x0.8x5 mm, 10 slices) from research/data/probes.py.

    python -m research.bench.plan_probe --probe macaque [--pairs 4] [--report-only]

Runs resume from their JSONs (research/results/plan_probe/<probe>/<arm>_split<S>_seed<K>.json); the table
goes to research/results.md's ``plan-probes`` section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from research.bench.paired import PAIR_ORDER, mean_dice, mean_dice_spread, paired_t, per_class
from research.bench.report import replace_section, write_json
from research.bench.sweep import CONFIGS, EVALUATE, PRETRAIN, ROOT, TRAIN, commit, portable

RESULTS = ROOT / "research" / "results" / "plan_probe"
WORK = ROOT / "research" / "work" / "plan_probe"

#: the bundle's settings before it planned from the data (train.json / train_3d.json at 0.8.0)
DEFAULTS = {
    2: {"pixdim": [1.0, 1.0], "roi_size": [128, 128], "normalisation": "zscore", "pretrain_batch_size": 6},
    3: {"pixdim": [1.25, 1.25, 2.0], "roi_size": [96, 96, 64], "normalisation": "zscore", "pretrain_batch_size": 6},
}
#: stage 1 budget: 24 epochs of 25 iterations, where full supervision's validation Dice levels off on
#: macaque and the embedded 2D phantoms (research/results/real/learning_curve_*.json: flat from ~epoch 23).
#: aniso3d: 8 epochs of batch 2, short of a plateau: the defaults arm pads every volume to 96x96x64 and
#: takes about 4 s a step on 2 cores
PROBES = {
    "colin27": {"task": "colin27", "fraction": 0.1, "spatial_dims": 2, "epochs": 24},
    "macaque": {"task": "macaque", "fraction": 0.1, "spatial_dims": 2, "epochs": 24},
    "ct2d": {"data": "ct2d", "labelled": 4, "spatial_dims": 2, "epochs": 24},
    "aniso3d": {
        "data": "aniso3d",
        "labelled": 4,
        "spatial_dims": 3,
        "epochs": 8,
        "bundle": {"pretrain_batch_size": 2},
    },
}


def datalist_for(probe: str, split_seed: int) -> Path:
    spec = PROBES[probe]
    if "task" in spec:
        from research.data.real_brain import prepare

        return prepare(
            WORK / probe / "data" / f"split{split_seed}",
            spec["task"],
            labelled_fraction=spec["fraction"],
            seed=split_seed,
        )
    from research.data.probes import split_datalist, write_probe

    return split_datalist(write_probe(spec["data"], WORK / probe / "data"), spec["labelled"], split_seed)


#: the arms: what each gives on the command line (of the old defaults), the rest planned. ``plan`` and
#: ``defaults`` are the comparison; the two ablations each take one old setting back into the plan, to
#: say which part of the plan a difference comes from
ARMS = {
    "plan": (),
    "defaults": ("pixdim", "roi_size", "normalisation", "pretrain_batch_size"),
    "plan_old_spacing": ("pixdim",),
    "plan_old_normalisation": ("normalisation",),
}
DEFAULT_ARMS = ("plan", "defaults")


def arm_overrides(probe: str, arm: str) -> dict:
    spec = PROBES[probe]
    old = DEFAULTS[spec["spatial_dims"]]
    return {**{k: old[k] for k in ARMS[arm]}, **spec.get("bundle", {})}


def run_one(probe: str, arm: str, split_seed: int, seed: int) -> dict:
    from monai.bundle import run

    spec = PROBES[probe]
    out = RESULTS / probe / f"{arm}_split{split_seed}_seed{seed}.json"
    if out.is_file():
        return json.loads(out.read_text())
    datalist = datalist_for(probe, split_seed)
    root = WORK / probe / "runs" / f"{arm}_split{split_seed}_seed{seed}"
    shutil.rmtree(root, ignore_errors=True)
    configs = [TRAIN, *([str(CONFIGS / "train_3d.json")] if spec["spatial_dims"] == 3 else [])]
    overrides = {
        "use_embedded_data": False,
        "datalist": str(datalist),
        "config_dir": str(CONFIGS),
        "seed": seed,
        "pretrain_distillation": "none",
        "pretrain_epochs": spec["epochs"],
        "val_interval": 2,
        **arm_overrides(probe, arm),
    }
    start = time.perf_counter()
    run("pretrain", config_file=[*configs, PRETRAIN], bundle_root=str(root), **overrides)
    seconds = round(time.perf_counter() - start, 1)
    ckpt = root / "models" / "pretrain.pt"
    run("evaluate", config_file=[*configs, EVALUATE], bundle_root=str(root), ckpt_path=str(ckpt), **overrides)
    report = json.loads((root / "eval" / "report" / "report.json").read_text())
    plan = json.loads((root / "eval" / "plan.json").read_text())
    result = {
        "probe": probe,
        "arm": arm,
        "split_seed": split_seed,
        "seed": seed,
        "commit": commit(),
        "seconds": seconds,
        "overrides": portable(overrides),
        "plan": {k: plan[k] for k in ("pixdim", "roi_size", "normalisation", "pretrain_batch_size", "overridden")},
        "fingerprint": {k: plan["fingerprint"][k] for k in ("median_spacing", "median_shape", "num_labelled")},
        "metrics": report["metrics"],
        "num_test_cases": report.get("num_cases"),
    }
    write_json(out, result)
    return result


def x(values) -> str:
    return " × ".join(f"{v:g}" for v in values)


def table(results_dir: Path = RESULTS) -> str:
    lines = [
        "| probe (data) | arm | pairs | pixdim | roi_size | normalisation | test Dice per class, mean ± sample std "
        "over pairs | mean Dice | arm − defaults (± SE) | arm higher on | p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for probe in PROBES:
        runs = [json.loads(p.read_text()) for p in sorted((results_dir / probe).glob("*.json"))]
        by_arm = {a: {(r["split_seed"], r["seed"]): r for r in runs if r["arm"] == a} for a in ARMS}
        if not set(by_arm["plan"]) & set(by_arm["defaults"]):
            continue
        first = True
        for arm in [a for a in ARMS if a != "defaults"] + ["defaults"]:
            pairs = sorted(set(by_arm[arm]) & set(by_arm["defaults"]))
            if not pairs:
                continue
            paired = ("", "", "")
            if arm != "defaults":
                diffs = [mean_dice(by_arm[arm][k]) - mean_dice(by_arm["defaults"][k]) for k in pairs]
                mean, se, p = paired_t(diffs)
                paired = (f"{mean:+.3f} ± {se:.3f}", f"{sum(d > 0 for d in diffs)} of {len(pairs)}", f"{p:.3g}")
            else:
                pairs = sorted(by_arm["defaults"])
            fp = by_arm[arm][pairs[0]]["fingerprint"]
            data = f"{x(fp['median_shape'])} at {x(fp['median_spacing'])} mm"
            rs = [by_arm[arm][k] for k in pairs]
            plan = rs[0]["plan"]
            head = f"{probe} ({data})" if first else ""
            first = False
            lines.append(
                f"| {head} | {arm} | {len(pairs)} | {x(plan['pixdim'])} | {x(plan['roi_size'])} | "
                f"{plan['normalisation']['kind']} | {per_class(rs)} | {mean_dice_spread(rs)} | {' | '.join(paired)} |"
            )
    commits = sorted({json.loads(p.read_text())["commit"] for p in results_dir.glob("*/*.json")})
    lines += [
        "",
        f"Stage 1 without distillation, evaluated on each probe's test split; commits {', '.join(commits)}. "
        'Pairs are (labelled subset, seed); each arm is paired with the defaults on the pairs both have. "±" per '
        "class and on mean Dice: sample std over pairs; on the difference: its standard error; p: two-sided "
        "paired t-test. `plan_old_spacing` / `plan_old_normalisation`: the plan with the old pixdim / the old "
        "whole-image z-score. "
        "Command: `python -m research.bench.plan_probe --probe <probe>`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", choices=sorted(PROBES), action="append", help="default: every probe")
    parser.add_argument("--pairs", type=int, default=4, help="(split seed, seed) pairs per arm")
    parser.add_argument("--arm", choices=sorted(ARMS), action="append", help="default: plan and defaults")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        for probe in args.probe or list(PROBES):
            for split_seed, seed in PAIR_ORDER[: args.pairs]:
                for arm in args.arm or DEFAULT_ARMS:
                    result = run_one(probe, arm, split_seed, seed)
                    dice = mean_dice(result)
                    print(f"{probe} {arm} split {split_seed} seed {seed}: mean Dice {dice:.3f}", flush=True)
    text = table()
    print(text)
    replace_section(ROOT / "research" / "results.md", "plan-probes", text)


if __name__ == "__main__":
    main()
