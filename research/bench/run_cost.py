"""Wall time of whole sweep runs, this commit against a baseline commit, side by side (issue 37).

Each round runs the 2D sweep's run (``--setting 2d``: stage 1 + stage 2, 32 + 32 epochs, 10 % labels,
seed 0) of every method at the baseline and here in turn, each side in its own fresh work folder (both
start with cold caches; the sweep warms the generalized teacher's encoder cache before it times stage 2).
The seconds are the sweep's own per-stage timers from each run JSON; the ratios pair each run with the
baseline's run of the same method and round, so the machine's drift between rounds cancels.

    python -m research.bench.run_cost [--baseline 102e50c] [--methods uncol mean_teacher] [--rounds 1]

The baseline is checked out as a detached git worktree under the work folder. Results go to
research/results/run_cost.json and research/results.md's ``run-cost`` section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from research.bench.report import replace_section
from research.bench.sweep import ROOT, commit

WORK = ROOT / "research" / "work" / "run_cost"
OUTPUT = ROOT / "research" / "results" / "run_cost.json"
SETTING, FRACTION, SEED = "2d", 0.1, 0


def checkout(baseline: str, work: Path) -> Path:
    """A detached worktree of ``baseline`` under ``work`` (made once)."""
    tree = work / f"baseline_{baseline}"
    if not (tree / ".git").exists():
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), baseline], cwd=ROOT, check=True)
    return tree


def sweep_command(tree: Path) -> list[str]:
    """How ``tree``'s sweep is started (bench/sweep.py before the research record moved to research/)."""
    if (tree / "research" / "bench" / "sweep.py").is_file():
        return [sys.executable, "-m", "research.bench.sweep"]
    return [sys.executable, "bench/sweep.py"]


def timed_run(tree: Path, method: str, out: Path) -> dict:
    """One sweep run of ``method`` in ``tree`` with a fresh ``out``: its stage seconds."""
    shutil.rmtree(out, ignore_errors=True)
    results = out / "results"
    args = ["--setting", SETTING, "--methods", method, "--fractions", f"{FRACTION:g}", "--seeds", str(SEED)]
    args += ["--out", str(out), "--results", str(results), "--results-md", str(out / "results.md")]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(sweep_command(tree) + args, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    run = json.loads((results / "runs" / SETTING / f"{FRACTION:g}_{method}_seed{SEED}.json").read_text())
    seconds = run["seconds"]
    return {"stage1": seconds["stage1"], "stage2": seconds["stage2"], "commit": run["commit"]}


def table(result: dict) -> str:
    sides = ("baseline", "head")
    lines = [
        "| method | round | baseline stage 1 + stage 2 s | this commit stage 1 + stage 2 s | this / baseline |",
        "|---|---|---|---|---|",
    ]
    ratios: dict[str, list[float]] = {}
    for run in result["rounds"]:
        total = {s: run[s]["stage1"] + run[s]["stage2"] for s in sides}
        ratio = total["head"] / total["baseline"]
        ratios.setdefault(run["method"], []).append(ratio)
        cells = [f"{run[s]['stage1']:.0f} + {run[s]['stage2']:.0f} = {total[s]:.0f}" for s in sides]
        lines.append(f"| {run['method']} | {run['round']} | {cells[0]} | {cells[1]} | {ratio:.2f} |")
    lines.append("")
    by_method = {(r["method"], r["round"]): r for r in result["rounds"]}
    for side, name in (("baseline", result["baseline"]), ("head", result["head"])):
        pairs = [
            by_method[("uncol", k)][side]["stage2"] / by_method[("mean_teacher", k)][side]["stage2"]
            for m, k in by_method
            if m == "uncol" and ("mean_teacher", k) in by_method
        ]
        if pairs:
            lines.append(f"- UnCoL stage 2 / Mean Teacher stage 2 at {name}: {statistics.median(pairs):.2f}")
    for method, values in ratios.items():
        lines.append(f"- {method} run, {result['head']} / {result['baseline']}: {statistics.median(values):.2f}")
    lines += [
        "",
        f"2D sweep runs (`--setting {SETTING}`, {FRACTION:.0%} labels, seed {SEED}, 32 + 32 epochs), both "
        "sides on this machine in turn; seconds are the sweep's own per-stage timers; a ratio pairs runs of "
        "the same method and round. Command: `python -m research.bench.run_cost`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="102e50c")
    parser.add_argument("--methods", nargs="+", default=["uncol", "mean_teacher"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        tree = checkout(args.baseline, args.work)
        head = commit()
        rounds = []
        for k in range(args.rounds):
            for method in args.methods:
                order = ("baseline", "head") if k % 2 == 0 else ("head", "baseline")
                run = {"method": method, "round": k}
                for side in order:
                    where = tree if side == "baseline" else ROOT
                    run[side] = timed_run(where, method, args.work / side / method)
                    print(f"{method} round {k} {side}: {run[side]}", flush=True)
                rounds.append(run)
        result = {"baseline": args.baseline, "head": head, "cpus": os.cpu_count(), "rounds": rounds}
        OUTPUT.write_text(json.dumps(result, indent=2) + "\n")
    result = json.loads(OUTPUT.read_text())
    text = table(result)
    print(text)
    replace_section(ROOT / "research" / "results.md", "run-cost", text)


if __name__ == "__main__":
    main()
