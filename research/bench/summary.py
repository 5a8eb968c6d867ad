"""The earlier sweep's answer: UnCoL's runs paired by seed with supervised-only, from its committed run JSONs.

    python -m research.bench.summary          # research/results.md's uncol-summary section
    python -m research.bench.summary --results-md /tmp/results.md

The method sweep (method_sweep.py: labelled subsets varied, 6 pairs a cell) has taken over the question
and README.md's answer; this table stays as the record of the 3-seed sweep before it.

Every (setting, labelled fraction) cell of ``research/results/runs/<setting>/`` (the sweep's run
JSONs, ``research/bench/sweep.py``) in which UnCoL as the paper gives it (method ``uncol``: both
teachers, the entropy gate) and supervised-only both have runs with the same seeds is one row. The
figure is each run's mean foreground test Dice; the runs are paired by seed (same data, labelled
cases and seed), and the row gives the mean paired difference UnCoL − supervised-only with its
standard error, on how many pairs UnCoL is higher, and a two-sided paired t-test's p-value. The same
is given for the best of the cell's other methods (largest mean difference over at least two pairs).
A method is called ahead (or behind) only at p < 0.05.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from research.bench.report import replace_section
from research.bench.sweep import LABELS, ROOT, load_runs, mean_foreground_dice

RESULTS = ROOT / "research" / "results"
#: the settings in the order the page presents them; any other setting's folder follows, by name
ORDER = ("2d", "2d_short", "3d_patch", "colin27", "macaque")
NAMES = {"2d": "embedded 2D", "2d_short": "embedded 2D", "3d_patch": "embedded 3D, patches"}
SECTION = "uncol-summary"
ALPHA = 0.05

LEGEND = (
    "Mean foreground test Dice, runs paired by seed (same data, labelled cases and seed) within a task and "
    "labelled fraction. Difference: mean of (method − supervised-only) over the pairs ± its standard error; "
    'p: two-sided paired t-test; "ahead" or "behind" only at p < 0.05, else "n.s.". UnCoL: both teachers, '
    "the paper's entropy gate. The best other method is picked after looking, so its p is optimistic."
)


def paired(runs: list[dict], method: str, baseline: str = "supervised") -> list[float]:
    """Per seed that both ran, ``method``'s mean foreground Dice minus ``baseline``'s (seed order)."""
    dice = {(r["method"], r["seed"]): mean_foreground_dice(r) for r in runs}
    seeds = sorted(s for m, s in dice if m == method and (baseline, s) in dice)
    return [dice[(method, s)] - dice[(baseline, s)] for s in seeds]


def compare(differences: list[float]) -> dict:
    """Mean, standard error, pairs where the method is higher, and the paired t-test's two-sided p."""
    from scipy import stats

    n = len(differences)
    mean = statistics.fmean(differences)
    se = statistics.stdev(differences) / math.sqrt(n) if n > 1 else float("nan")
    # the paired t-test is the one-sample test of the differences against 0 (scipy's ttest_rel)
    p = float(stats.ttest_1samp(differences, 0.0).pvalue) if n > 1 and se > 0 else float("nan")
    return {"n": n, "mean": mean, "se": se, "higher": sum(d > 0 for d in differences), "p": p}


def verdict(c: dict) -> str:
    if math.isnan(c["p"]) or c["p"] >= ALPHA:
        return "n.s."
    return "ahead" if c["mean"] > 0 else "behind"


def p_text(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def difference_text(c: dict) -> str:
    se = "" if math.isnan(c["se"]) else f" ± {c['se']:.3f}"
    return f"{c['mean']:+z.3f}{se}"


def cells(results: Path = RESULTS) -> list[tuple[str, float, list[dict]]]:
    """(setting, fraction, runs) of every cell where ``uncol`` and ``supervised`` share a seed."""
    folders = sorted((results / "runs").iterdir()) if (results / "runs").is_dir() else []
    rank = {s: i for i, s in enumerate(ORDER)}
    out = []
    for folder in sorted(folders, key=lambda f: (rank.get(f.name, len(ORDER)), f.name)):
        runs = load_runs(folder)
        for fraction in sorted({r["fraction"] for r in runs}):
            cell = [r for r in runs if r["fraction"] == fraction]
            if paired(cell, "uncol"):
                out.append((folder.name, fraction, cell))
    return out


def task_name(setting: str, runs: list[dict]) -> str:
    budget = runs[0]["stage2_overrides"]
    name = NAMES.get(setting, setting.replace("colin27", "Colin27"))
    return f"{name} ({budget['pretrain_epochs']} + {budget['max_epochs']} epochs)"


def table(results: Path = RESULTS) -> str:
    rows = [
        LEGEND,
        "",
        "| task (epochs per stage) | labelled | seed pairs | UnCoL − supervised-only | UnCoL higher on | p | "
        "UnCoL | best other method − supervised-only (higher on, p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    calls = []
    for setting, fraction, runs in cells(results):
        uncol = compare(paired(runs, "uncol"))
        calls.append(verdict(uncol))
        others = [m for m in sorted({r["method"] for r in runs}) if m not in ("uncol", "supervised")]
        scored = [(m, compare(d)) for m in others if len(d := paired(runs, m)) > 1]
        if scored:
            method, best = max(scored, key=lambda item: item[1]["mean"])
            call = verdict(best)
            other = (
                f"{LABELS[method]}: {difference_text(best)} ({best['higher']} of {best['n']}, p {p_text(best['p'])})"
                + ("" if call == "n.s." else f", {call}")
            )
        else:
            other = "-"
        rows.append(
            f"| {task_name(setting, runs)} | {fraction:.0%} | {uncol['n']} | {difference_text(uncol)} | "
            f"{uncol['higher']} of {uncol['n']} | {p_text(uncol['p'])} | {verdict(uncol)} | {other} |"
        )
    answer = (
        f"UnCoL (the default) is ahead of supervised-only in {calls.count('ahead')} of {len(calls)} cells "
        f"and behind in {calls.count('behind')}."
    )
    return "\n".join([answer, "", *rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder holding runs/<setting>/*.json")
    parser.add_argument("--results-md", type=Path, default=ROOT / "research" / "results.md")
    args = parser.parse_args(argv)
    text = table(args.results)
    replace_section(args.results_md, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
