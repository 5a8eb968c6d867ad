"""Speed switches against the current defaults, paired by (labelled subset, seed) (issue 37).

A switch that changes the math (a narrower decoder, looser reuse of the generalized teacher's outputs)
becomes a default only if it is faster and not behind the current defaults. Each run here is what a
user's run is: stage 1 (``pretrain.json``, both distillation paths) then stage 2 (``train.json``'s UnCoL
defaults), 32 + 32 epochs (the sweep's 2D budget), the checkpoint chosen on validation Dice; it is then
evaluated on the validation split (what a choice may look at) and on the test split (what is reported).
Arms that train the same student share its stage 1 (same split, seed and network).

Tasks: ``embedded2d`` (the 128x128 phantoms, 60 training cases of which the split seed labels 6),
``colin27`` and ``macaque`` (real MRI slices at 10 %, research/data/real_brain.py; the split seed picks
the labelled slices), sizes from the bundle's plan as for a user; and ``embedded3d`` (the 160x160x96 phantoms, 20
training volumes of which the split seed labels 2, the sweep's ``3d_patch`` setting: 64x64x32 patches,
batch 2, 20 + 20 epochs), where the full-resolution level and the teacher's slices cost most.

    python -m research.bench.switch_probe --task embedded2d [--pairs 4] [--arm feature_size_8] [--report-only]

Runs resume from their JSONs (research/results/switch_probe/<task>/<arm>_split<S>_seed<K>.json); the table
goes to research/results.md's ``switch-probes`` section. Stage seconds are wall time of whatever ran beside
the run (two runs in parallel on 2 cores): speed ratios come from the timing benchmarks, not from here.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from research.bench.paired import PAIR_ORDER, mean_dice, mean_dice_spread, paired_t, per_class
from research.bench.paired_runs import EMBEDDED3D, Arm, PairedRuns
from research.bench.report import replace_section
from research.bench.sweep import ROOT

RESULTS = ROOT / "research" / "results" / "switch_probe"
WORK = ROOT / "research" / "work" / "switch_probe"

#: each arm: the student it trains (overrides of both stages) and its stage 2 overrides
NARROW = {"network_def#feature_size": 8}
SINGLE = {"network_def#full_resolution": "single"}
ARMS = {
    "current": Arm(),
    "current_reuse_2": Arm(stage2={"reuse_tolerance": 2.0}),
    "current_reuse_8": Arm(stage2={"reuse_tolerance": 8.0}),
    "feature_size_8": Arm(network=NARROW),
    "feature_size_8_reuse_2": Arm(network=NARROW, stage2={"reuse_tolerance": 2.0}),
    "single": Arm(network=SINGLE),
    "single_stride_2": Arm(network=SINGLE, stage2={"generalized_slice_stride": 2}),
    "single_stride_3": Arm(network=SINGLE, stage2={"generalized_slice_stride": 3}),
}
BASELINE = "current"
#: per task: its data, the configs layered on train.json, bundle overrides, epochs per stage (the sweep's
#: budgets, past full supervision's plateau) and the arms it runs by default
TASKS = {
    "embedded2d": {
        "data": {"spatial_dims": 2, "num_labelled": 6},
        "epochs": 32,
        "arms": ["current", "feature_size_8", "feature_size_8_reuse_2", "current_reuse_2", "current_reuse_8", "single"],
    },
    "colin27": {"task": "colin27", "fraction": 0.1, "epochs": 32, "arms": ["current", "current_reuse_8"]},
    "macaque": {"task": "macaque", "fraction": 0.1, "epochs": 32, "arms": ["current", "current_reuse_8"]},
    "embedded3d": {**EMBEDDED3D, "arms": ["current", "single", "single_stride_2", "single_stride_3"]},
}
PROBE = PairedRuns(TASKS, ARMS, RESULTS, WORK)


def validation_dice(result: dict) -> float:
    return mean_dice(result, "validation_metrics")


def table(results_dir: Path = RESULTS) -> str:
    lines = [
        "| task | arm | pairs | test Dice per class, mean ± sample std over pairs | mean Dice | "
        "arm − current, test (± SE) | higher on | p | arm − current, validation (± SE) | p | "
        "teacher output reused | stage 1 s | stage 2 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        by_arm = PROBE.load(task, results_dir)
        first = True
        for arm in ARMS:
            pairs = sorted(set(by_arm[arm]) & set(by_arm[BASELINE])) if arm != BASELINE else sorted(by_arm[arm])
            if not pairs:
                continue
            rs = [by_arm[arm][k] for k in pairs]
            paired = ["", "", "", "", ""]
            if arm != BASELINE:
                base = [by_arm[BASELINE][k] for k in pairs]
                test_diffs = [mean_dice(r) - mean_dice(b) for r, b in zip(rs, base, strict=True)]
                val_diffs = [validation_dice(r) - validation_dice(b) for r, b in zip(rs, base, strict=True)]
                (tm, tse, tp), (vm, vse, vp) = paired_t(test_diffs), paired_t(val_diffs)
                wins = f"{sum(d > 0 for d in test_diffs)} of {len(pairs)}"
                paired = [f"{tm:+.3f} ± {tse:.3f}", wins, f"{tp:.3g}", f"{vm:+.3f} ± {vse:.3f}", f"{vp:.3g}"]
            seconds = {s: statistics.median(r["seconds"][s] for r in rs) for s in ("stage1", "stage2")}
            logs = [r.get("stage2_log", {}) for r in rs]
            reused = [log["generalized_reused"] for log in logs if "generalized_reused" in log]
            reuse = f"{statistics.fmean(reused):.0%}" if reused else ""
            lines.append(
                f"| {task if first else ''} | {arm} | {len(pairs)} | {per_class(rs)} | {mean_dice_spread(rs)} | "
                f"{' | '.join(paired)} | {reuse} | {seconds['stage1']:.0f} | {seconds['stage2']:.0f} |"
            )
            first = False
    loaded = [PROBE.load(task, results_dir) for task in TASKS]
    commits = sorted({r["commit"] for by_arm in loaded for runs in by_arm.values() for r in runs.values()})
    lines += [
        "",
        "Stage 1 (both distillation paths) + stage 2 (UnCoL defaults) at each task's budget (embedded2d and "
        "the real tasks 32 + 32 epochs, embedded3d 20 + 20), "
        f"commits {', '.join(commits) or '-'}. Pairs are (labelled subset, seed); each arm is paired with "
        '`current` on the pairs both have. "±" per class and on mean Dice: sample std over pairs; on a '
        "difference: its standard error; p: two-sided paired t-test. Validation: the same checkpoint on the "
        "validation split (what a choice may look at). Teacher output reused: the fraction of unlabelled "
        "images whose generalized-teacher output stage 2 served from memory (mean over its steps and the pairs). "
        "Seconds: median wall time per stage with another run beside it, not a speed figure. "
        "`feature_size_8`: the decoder half as wide "
        "(`network_def#feature_size` 8); `_reuse_2`: stage 2 reuses the generalized teacher's output while "
        "no box edge moved more than 2 (8) pixels (`reuse_tolerance`, default 1); `single`: one convolution at "
        "full resolution (`network_def#full_resolution`); `_stride_2` (`_3`): in 3D the generalized teacher prompts "
        "every other (third) slice (`generalized_slice_stride`). "
        "Command: `python -m research.bench.switch_probe --task <task>`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), action="append", help="default: every task")
    parser.add_argument("--pairs", type=int, default=4, help="(split seed, seed) pairs per arm")
    parser.add_argument("--first-pair", type=int, default=0, help="skip this many pairs (run pairs in parallel)")
    parser.add_argument("--arm", choices=sorted(ARMS), action="append", help="default: every arm")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        for task in args.task or list(TASKS):
            for split_seed, seed in PAIR_ORDER[args.first_pair : args.pairs]:
                for arm in args.arm or TASKS[task]["arms"]:
                    result = PROBE.run_one(task, arm, split_seed, seed)
                    print(f"{task} {arm} split {split_seed} seed {seed}: mean Dice {mean_dice(result):.3f}", flush=True)
    text = table()
    print(text)
    replace_section(ROOT / "research" / "results.md", "switch-probes", text)


if __name__ == "__main__":
    main()
