"""Semi-supervised methods, paired by (labelled subset, seed), against the baselines a team would run (issue 38).

Every run is a user's run (research/bench/paired_runs.py): stage 1, then stage 2 with the method's
overrides, the checkpoint chosen on validation Dice, scored on the validation and the test split (per
case too). A method is "ahead" of a baseline only at one-sided paired p < 0.05 and "behind" at
two-sided p < 0.05; configurations are chosen on validation Dice, never on test.

Methods: ``supervised`` (no pseudo-labels), ``mean_teacher`` (the EMA teacher alone, same gate),
``copy_paste`` (Mean Teacher with bidirectional copy-paste, no foundation model), ``uncol``
(train.json's defaults at the run's commit), ``uncol_paper`` (the paper's gate, spelled out),
``uncol_quantile_agree_guarded`` (the earlier sweep's improved gate) and the ingredients on top of
``uncol``: ``uncol_copy_paste``, ``uncol_soft`` (soft reliability weights), ``uncol_feature_dropout``,
``uncol_all`` (the three together), ``uncol_calibrated`` (both teachers temperature-scaled on the
validation split before their entropies are compared: LiteMedSAM's overconfident masks win most voxels)
and ``uncol_by_class`` (each foreground class from the teacher with the higher Dice on the validation
split, instead of voxel by voxel from the more certain one). The ablation ``mean_teacher_distilled`` (Mean
Teacher from the distilled stage 1) runs only when named: with it, ``mean_teacher`` -> ``mean_teacher_distilled``
-> ``uncol`` adds one ingredient at a time (stage 1's distillation, then the generalized teacher's pseudo-labels).

Cells: ``embedded2d_5`` and ``embedded2d_10`` (3 and 6 of the 60 training phantoms labelled),
``colin27`` and ``macaque`` (10 % of the real-anatomy slices, research/data/real_brain.py),
``embedded3d`` (the sweep's 3d_patch setting, 2 of 20 volumes) and ``embedded2d_full`` (every training
phantom labelled, supervised only: the reference for "95 % of full supervision").

The screen: after the first 3 pairs of both phantom cells, only the 2 UnCoL variants best on validation
there run on (more pairs, the real-anatomy cells), beside the baselines and ``uncol`` (:func:`wanted`); a
variant added later runs its screen pairs first (``--arm``) and then ranks with the others.

    python -m research.bench.method_sweep --task embedded2d_10 [--pairs 6] [--arm uncol] [--report-only]

Runs resume from their JSONs (research/results/method_sweep/<cell>/<method>_split<S>_seed<K>.json); the
table goes to research/results.md's ``method-sweep`` section.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from research.bench.paired import PAIR_ORDER, mean_dice, mean_dice_spread, paired_t, per_class, spread
from research.bench.paired_runs import EMBEDDED3D, Arm, PairedRuns
from research.bench.report import replace_section
from research.bench.sweep import ROOT, TRAIN

RESULTS = ROOT / "research" / "results" / "method_sweep"
WORK = ROOT / "research" / "work" / "method_sweep"
SECTION = "method-sweep"

MEAN_TEACHER = {"teachers": "specialized"}
COPY_PASTE = {"copy_paste": "bidirectional"}
SOFT = {"gate": "soft"}
FEATURE_DROPOUT = {"feature_dropout": 0.5}
#: the gate compares the teachers' entropies; without calibration the generalized teacher, the less accurate
#: one, supplies about 93 % of the pseudo-labels on the phantoms (stage 2's gate_from_generalized)
CALIBRATED = {"calibration": "temperature"}
#: the improved gate of the earlier sweep (research/bench/sweep.py): class-wise quantile gate, voxels where the
#: teachers disagree left out, the labelled class prior as guard; ahead of the paper's gate in 2D there
GUARDED = {"gate": "quantile", "disagreement": "mask", "class_guard": "prior"}
#: at 10 % labels on the phantoms every UnCoL arm's organ is below every baseline's while its lesion comes from
#: LiteMedSAM: each class from the teacher that segments it better on the validation split
BY_CLASS = {"teachers": "by_class"}
#: UnCoL as the paper has it, every stage-2 switch named, so that a change of train.json's defaults leaves it
PAPER = {
    "teachers": "both",
    "gate": "entropy",
    "threshold_ramped": True,
    "disagreement": "entropy",
    "class_guard": "none",
    "pseudo_label_nesting": "none",
    "calibration": "none",
    "copy_paste": "none",
    "feature_dropout": 0.0,
}
ARMS = {
    "supervised": Arm("none", stage2={**MEAN_TEACHER, "max_unsup_weight": 0.0}),
    "mean_teacher": Arm("none", stage2=MEAN_TEACHER),
    "copy_paste": Arm("none", stage2={**MEAN_TEACHER, **COPY_PASTE}),
    "uncol": Arm(),
    "uncol_paper": Arm(stage2=PAPER),
    "uncol_quantile_agree_guarded": Arm(stage2=GUARDED),
    "uncol_copy_paste": Arm(stage2=COPY_PASTE),
    "uncol_soft": Arm(stage2=SOFT),
    "uncol_feature_dropout": Arm(stage2=FEATURE_DROPOUT),
    "uncol_all": Arm(stage2={**COPY_PASTE, **SOFT, **FEATURE_DROPOUT}),
    "uncol_calibrated": Arm(stage2=CALIBRATED),
    "uncol_by_class": Arm(stage2=BY_CLASS),
    "mean_teacher_distilled": Arm(stage2=MEAN_TEACHER),
}
BASELINES = ("supervised", "mean_teacher", "copy_paste")
#: arms that split a gain into its ingredients, run only when named (``--arm``): ``mean_teacher_distilled`` is
#: Mean Teacher started from UnCoL's distilled stage 1, between ``mean_teacher`` (no foundation model at all)
#: and ``uncol`` (the generalized teacher's pseudo-labels as well)
ABLATIONS = ("mean_teacher_distilled",)

PHANTOMS_2D = {"spatial_dims": 2}
#: per cell: data, configs layered on train.json, bundle overrides, epochs per stage (the sweep's budgets,
#: past full supervision's plateau), the methods it runs by default, and whether its split is fixed
TASKS = {
    "embedded2d_5": {"data": {**PHANTOMS_2D, "num_labelled": 3}, "epochs": 32},
    "embedded2d_10": {"data": {**PHANTOMS_2D, "num_labelled": 6}, "epochs": 32},
    "colin27": {"task": "colin27", "fraction": 0.1, "epochs": 32},
    "macaque": {"task": "macaque", "fraction": 0.1, "epochs": 32},
    "embedded3d": {**EMBEDDED3D, "verdict_pairs": 3},
    # nothing unlabelled: stage 2 reads the labelled list as its unlabelled stream, at weight 0
    "embedded2d_full": {
        "data": {**PHANTOMS_2D, "num_labelled": 60},
        "bundle": {"unlabelled_key": "training"},
        "epochs": 32,
        "arms": ["supervised"],
        "fixed_split": True,
    },
}


def default_arms(train_json: str = TRAIN) -> list[str]:
    """Every method but the :data:`ABLATIONS`; ``uncol_paper`` only while train.json's defaults differ from the
    paper's (else it is ``uncol`` run twice)."""
    defaults = json.loads(Path(train_json).read_text())
    same = all(defaults.get(key) == value for key, value in PAPER.items())
    return [a for a in ARMS if not (same and a == "uncol_paper") and a not in ABLATIONS]


SWEEP = PairedRuns(TASKS, ARMS, RESULTS, WORK)


def pairs_for(task: str, first: int, count: int) -> list[tuple[int, int]]:
    """The (split seed, seed) pairs ``first`` to ``count`` of a cell (seeds alone where its split is fixed)."""
    if TASKS[task].get("fixed_split"):
        return [(0, seed) for seed in range(first, count)]
    return PAIR_ORDER[first:count]


#: the screen: an UnCoL variant other than ``uncol`` runs past the first SCREEN_PAIRS pairs of the
#: SCREEN_CELLS, and on the other cells, only if it is among the SCREEN_KEEP best of them by validation mean
#: Dice there, so that the pairs a verdict needs go to contenders; the baselines and ``uncol`` run every pair
SCREEN_CELLS = ("embedded2d_5", "embedded2d_10")
SCREEN_PAIRS = 3
SCREEN_KEEP = 2


def variants() -> list[str]:
    """The UnCoL variants the screen ranks: every method past ``uncol`` whose name starts with ``uncol_``."""
    return [a for a in default_arms() if a.startswith("uncol_")]


def screen(results_dir: Path = RESULTS) -> dict[str, float] | None:
    """Each UnCoL variant's validation mean Dice on the first SCREEN_PAIRS pairs of each screen cell (the
    mean of the cells' means), for the variants that have all those runs; None while none has. A variant
    added later ranks once its own screen pairs are in."""
    pairs = PAIR_ORDER[:SCREEN_PAIRS]
    loaded = [SWEEP.load(cell, results_dir) for cell in SCREEN_CELLS]
    scores = {}
    for arm in variants():
        if not all(pair in by_arm[arm] for by_arm in loaded for pair in pairs):
            continue
        runs = [[by_arm[arm][pair] for pair in pairs] for by_arm in loaded]
        per_cell = [statistics.fmean(mean_dice(r, "validation_metrics") for r in cell) for cell in runs]
        scores[arm] = round(statistics.fmean(per_cell), 4)
    return scores or None


def passed_screen(scores: dict[str, float], keep: int = SCREEN_KEEP) -> list[str]:
    """The ``keep`` variants with the highest screen score, best first."""
    return sorted(scores, key=lambda arm: -scores[arm])[:keep]


def wanted(task: str, arm: str, pair_index: int, results_dir: Path = RESULTS) -> bool:
    """Whether ``arm`` runs on pair number ``pair_index`` of ``task``: the baselines and ``uncol`` always, a
    variant on the screen's pairs of a screen cell, and past them (or on another cell) only if it is among
    the best of the variants screened so far."""
    if not arm.startswith("uncol_") or (task in SCREEN_CELLS and pair_index < SCREEN_PAIRS):
        return True
    scores = screen(results_dir)
    return scores is not None and arm in passed_screen(scores)


#: pairs a cell needs before its table gives a verdict (the protocol's count; the 3D cell's own is smaller)
VERDICT_PAIRS = 6


def verdict_pairs(task: str) -> int:
    return TASKS[task].get("verdict_pairs", VERDICT_PAIRS)


def paired_call(
    arm: dict, base: dict, pairs: list[tuple[int, int]], metrics: str = "metrics", needed: int = VERDICT_PAIRS
) -> dict:
    """Mean paired difference of mean Dice, ``arm`` minus ``base``, its SE, the pairs ``arm`` is higher on, the
    two-sided p, and the verdict once there are ``needed`` pairs (before, a low p on a few pairs would read
    as a finding): ahead at one-sided p < 0.05, behind at two-sided p < 0.05, else level."""
    diffs = [mean_dice(arm[k], metrics) - mean_dice(base[k], metrics) for k in pairs]
    mean, se, p = paired_t(diffs)
    one_sided = p / 2 if mean > 0 else 1 - p / 2
    verdict = "ahead" if one_sided < 0.05 else "behind" if p < 0.05 else "level"
    verdict = verdict if len(diffs) >= needed else "too few pairs"
    return {"mean": mean, "se": se, "higher": sum(d > 0 for d in diffs), "n": len(diffs), "p": p, "verdict": verdict}


def compare(
    arm: dict, base: dict, pairs: list[tuple[int, int]], metrics: str = "metrics", needed: int = VERDICT_PAIRS
) -> str:
    """``difference ± SE, wins of pairs, p: verdict`` (:func:`paired_call`) as the table shows it."""
    return call_text(paired_call(arm, base, pairs, metrics, needed))


def call_text(call: dict) -> str:
    """A :func:`paired_call` as the table writes it."""
    return (
        f"{call['mean']:+.3f} ± {call['se']:.3f}, {call['higher']} of {call['n']}, p {call['p']:.2g}: {call['verdict']}"
    )


#: the cells a default is chosen on (a default on every 2D task, never on one)
CHOICE_CELLS = ("embedded2d_5", "embedded2d_10", "colin27", "macaque")


def chosen_by_validation(results_dir: Path = RESULTS) -> tuple[str, dict[str, float]] | None:
    """The UnCoL configuration with the highest validation mean Dice, averaged over :data:`CHOICE_CELLS`
    (each cell's mean over its pairs), among those with runs in every one of them; with each one's average.
    None until some configuration has runs in all of them."""
    loaded = [SWEEP.load(task, results_dir) for task in CHOICE_CELLS]  # each cell's JSONs read once
    averages = {}
    for arm in (a for a in ARMS if a.startswith("uncol")):
        cells = [by_arm[arm] for by_arm in loaded]
        if all(cells):
            per_cell = [statistics.fmean(mean_dice(r, "validation_metrics") for r in c.values()) for c in cells]
            averages[arm] = round(statistics.fmean(per_cell), 4)
    return (max(averages, key=averages.get), averages) if averages else None


#: the baselines a chosen configuration must beat on the 2D cells to become train.json's defaults (issue 38)
MUST_BEAT = ("supervised", "mean_teacher")


def beats_on_choice_cells(arm: str, results_dir: Path = RESULTS) -> dict[str, dict]:
    """``arm`` against each of :data:`MUST_BEAT` on every pair of every :data:`CHOICE_CELLS` cell both have
    (the paired differences of all the cells pooled), with a verdict once every cell has its pairs."""
    loaded = [SWEEP.load(task, results_dir) for task in CHOICE_CELLS]
    needed = VERDICT_PAIRS * len(CHOICE_CELLS)
    calls = {}
    for base in MUST_BEAT:
        arm_runs, base_runs = {}, {}
        for task, by_arm in zip(CHOICE_CELLS, loaded, strict=True):
            for pair in set(by_arm[arm]) & set(by_arm[base]):
                arm_runs[(task, pair)], base_runs[(task, pair)] = by_arm[arm][pair], by_arm[base][pair]
        if len(arm_runs) > 1:
            calls[base] = paired_call(arm_runs, base_runs, sorted(arm_runs), needed=needed)
    return calls


#: the cell whose methods are measured against full supervision, and the cell that is full supervision
TARGET_CELL, FULL_CELL = "embedded2d_10", "embedded2d_full"


def share_of_full(results_dir: Path = RESULTS) -> str | None:
    """Each method's mean test Dice in :data:`TARGET_CELL` as a share of full supervision's (the supervised
    runs of :data:`FULL_CELL`, mean over its seeds); None until both have runs."""
    full = list(SWEEP.load(FULL_CELL, results_dir)["supervised"].values())
    by_arm = {a: list(r.values()) for a, r in SWEEP.load(TARGET_CELL, results_dir).items() if r}
    if not full or not by_arm:
        return None
    reference = statistics.fmean(mean_dice(r) for r in full)
    seeds = f"{len(full)} seed{'s' if len(full) > 1 else ''}"
    shares = ", ".join(f"{a} {statistics.fmean(mean_dice(r) for r in rs) / reference:.1%}" for a, rs in by_arm.items())
    return (
        f"Share of full supervision ({FULL_CELL}: every training phantom labelled, supervised, {seeds}, "
        f"mean Dice {reference:.3f}) in {TARGET_CELL}, mean test Dice over its pairs: {shares}."
    )


def table(results_dir: Path = RESULTS) -> str:
    baselines = " | ".join(f"− {b}, test" for b in BASELINES)
    lines = [
        f"| cell | method | pairs | test Dice per class, mean ± sample std | mean Dice | {baselines} | "
        "validation mean Dice | kept by the gate | from the generalized teacher |",
        "|---|---|---|---|---|" + "---|" * len(BASELINES) + "---|---|---|",
    ]
    commits = set()
    for task in TASKS:
        by_arm = SWEEP.load(task, results_dir)
        first = True
        for arm, runs in by_arm.items():
            if not runs:
                continue
            rs = list(runs.values())
            commits |= {r["commit"] for r in rs}
            cells = []
            for base in BASELINES:
                shared = sorted(set(runs) & set(by_arm[base])) if base != arm else []
                cells.append(compare(runs, by_arm[base], shared, needed=verdict_pairs(task)) if len(shared) > 1 else "")
            validation = [mean_dice(r, "validation_metrics") for r in rs]
            logs = [r.get("stage2_log", {}) for r in rs]
            gate = [
                f"{statistics.fmean(values):.2f}" if (values := [log[k] for log in logs if k in log]) else ""
                for k in ("gate_kept", "gate_from_generalized")
            ]
            lines.append(
                f"| {task if first else ''} | {arm} | {len(rs)} | {per_class(rs)} | {mean_dice_spread(rs)} | "
                f"{' | '.join(cells)} | {spread(validation)} | {' | '.join(gate)} |"
            )
            first = False
    lines += [
        "",
        f"Commits {', '.join(sorted(commits)) or '-'}. Pairs are (labelled subset, seed): the split seed picks "
        "the labelled cases, the seed drives training; each method is compared with each baseline on the pairs "
        "both have: the mean paired difference of mean foreground Dice ± its standard error, the pairs it is "
        "higher on, the two-sided paired-t p, and the verdict once the cell has its pairs (6; embedded3d 3): "
        'ahead: one-sided p < 0.05; behind: two-sided p < 0.05; else level ("too few pairs" before). "±" on '
        "Dice and on validation Dice: sample std over pairs. Kept by the gate and from the generalized teacher: "
        "stage 2's logged means (the soft gate's kept share is its mean weight). Command: "
        "`python -m research.bench.method_sweep --task <cell>`.",
    ]
    full = share_of_full(results_dir)
    if full is not None:
        lines += ["", full]
    scores = screen(results_dir)
    if scores is not None:
        ranked = passed_screen(scores, keep=len(scores))
        passed = ranked[:SCREEN_KEEP]
        listed = ", ".join(f"{arm} {scores[arm]:.3f}" for arm in ranked)
        lines += [
            "",
            f"Screen (validation mean Dice on the first {SCREEN_PAIRS} pairs of {' and '.join(SCREEN_CELLS)}, "
            f"mean of the two): {listed}. Past it, beside the baselines and uncol, only {' and '.join(passed)} run.",
        ]
        unscreened = [a for a in variants() if a not in scores]
        if unscreened:
            lines[-1] += f" Not yet screened (its first pairs are running): {', '.join(unscreened)}."
    choice = chosen_by_validation(results_dir)
    if choice is not None:
        best, averages = choice
        listed = ", ".join(f"{arm} {value:.3f}" for arm, value in sorted(averages.items(), key=lambda kv: -kv[1]))
        lines += ["", f"Chosen by validation Dice (mean over {', '.join(CHOICE_CELLS)}): **{best}** ({listed})."]
        calls = beats_on_choice_cells(best, results_dir)
        if calls:
            against = "; ".join(f"− {base}: {call_text(c)}" for base, c in calls.items())
            earned = len(calls) == len(MUST_BEAT) and all(c["verdict"] == "ahead" for c in calls.values())
            undecided = any(c["verdict"] == "too few pairs" for c in calls.values()) or len(calls) < len(MUST_BEAT)
            outcome = (
                "undecided" if undecided else "it becomes train.json's defaults" if earned else "the defaults stay"
            )
            lines += [
                "",
                f"{best} against the baselines it must beat, every pair of those cells pooled (test mean Dice; "
                f"verdict at {VERDICT_PAIRS * len(CHOICE_CELLS)} pairs): {against}. So: {outcome}.",
            ]
    return "\n".join(lines)


#: README.md's answer: its section, the cells it reads as a user names them, the baselines by name
ANSWER_SECTION = "uncol-answer"
ANSWER_CELLS = {
    "embedded2d_5": "embedded 2D phantoms, 5 % labelled",
    "embedded2d_10": "embedded 2D phantoms, 10 % labelled",
    "colin27": "Colin27 deep grey nuclei, 10 % of the slices labelled",
    "macaque": "macaque deep grey nuclei, 10 % of the slices labelled",
    "embedded3d": "embedded 3D phantoms in patches, 2 of 20 volumes labelled",
}
BASELINE_NAMES = {
    "supervised": "supervised-only",
    "mean_teacher": "Mean Teacher",
    "copy_paste": "Mean Teacher + copy-paste",
}


def answer(results_dir: Path = RESULTS) -> str:
    """Does the default help? ``uncol`` (train.json's defaults) against each baseline in every cell, as
    verdicts only (the figures stay in results.md's table), and the count of 2D cells where it is ahead
    of all three or behind one."""
    rows = [
        "| task | pairs | " + " | ".join(f"vs {BASELINE_NAMES[b]}" for b in BASELINES) + " |",
        "|---|---|" + "---|" * len(BASELINES),
    ]
    decided, ahead_of_all, behind_one = [], [], []

    def names(tasks: list[str]) -> str:
        return "; ".join(ANSWER_CELLS[t] for t in tasks) or "none"

    for task, name in ANSWER_CELLS.items():
        by_arm = SWEEP.load(task, results_dir)
        needed = verdict_pairs(task)
        calls = []
        for base in BASELINES:
            shared = sorted(set(by_arm["uncol"]) & set(by_arm[base]))
            calls.append(paired_call(by_arm["uncol"], by_arm[base], shared, needed=needed) if shared else None)
        pairs = len(by_arm["uncol"])
        words = [
            "not run yet"
            if c is None
            else f"{c['verdict']}, higher on {c['higher']} of {c['n']}"
            if c["n"] >= needed
            else f"higher on {c['higher']} of {c['n']} so far"
            for c in calls
        ]
        rows.append(f"| {name} | {pairs} of {needed} | " + " | ".join(words) + " |")
        if task in CHOICE_CELLS and all(c and c["n"] >= needed for c in calls):
            decided.append(task)
            if all(c["verdict"] == "ahead" for c in calls):
                ahead_of_all.append(task)
            if any(c["verdict"] == "behind" for c in calls):
                behind_one.append(task)
    if decided:
        summary = (
            f"2D tasks with all their pairs: {len(decided)} of {len(CHOICE_CELLS)}; the default is ahead of all "
            f"three baselines in {len(ahead_of_all)} ({names(ahead_of_all)}) and behind one in {len(behind_one)} "
            f"({names(behind_one)})."
        )
    else:
        summary = "No 2D task has its pairs yet: every verdict below is still open."
    legend = (
        "UnCoL with train.json's defaults against the methods a team would otherwise run, each a whole run on "
        "the same (labelled subset, seed) pairs; *ahead*: one-sided paired p < 0.05, *behind*: two-sided "
        f"p < 0.05, a verdict only once a task has its pairs ({VERDICT_PAIRS}; {verdict_pairs('embedded3d')} in "
        "3D). The figures, their spreads and every other configuration: [research/results.md](research/results.md"
        "#uncol-against-the-methods-a-team-would-run-issue-38), written by `python -m research.bench.method_sweep`."
    )
    return "\n".join([summary, "", legend, "", *rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), action="append", help="default: every cell")
    parser.add_argument("--pairs", type=int, default=6, help="(split seed, seed) pairs per method")
    parser.add_argument("--first-pair", type=int, default=0, help="skip this many pairs (run pairs in parallel)")
    parser.add_argument("--arm", choices=sorted(ARMS), action="append", help="default: every method that differs")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        for task in args.task or list(TASKS):
            pairs = pairs_for(task, args.first_pair, args.pairs)
            for index, (split_seed, seed) in enumerate(pairs, start=args.first_pair):
                for arm in args.arm or TASKS[task].get("arms", default_arms()):
                    if not args.arm and not wanted(task, arm, index):
                        print(f"{task} {arm} split {split_seed} seed {seed}: screened out", flush=True)
                        continue
                    result = SWEEP.run_one(task, arm, split_seed, seed)
                    print(f"{task} {arm} split {split_seed} seed {seed}: mean Dice {mean_dice(result):.3f}", flush=True)
    text = table()
    print(text)
    replace_section(ROOT / "research" / "results.md", SECTION, text)
    replace_section(ROOT / "README.md", ANSWER_SECTION, answer(), create=False)


if __name__ == "__main__":
    main()
