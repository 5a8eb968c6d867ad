"""Paired comparisons of runs: each arm against a baseline on the (labelled subset, seed) pairs both have."""

from __future__ import annotations

import math
import statistics

#: pairs are (split seed, seed): split seeds first, so that 4 pairs are 2 labelled subsets x 2 seeds
PAIR_ORDER = [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (2, 1), (0, 2), (1, 2), (2, 2)]


def mean_dice(result: dict, metrics: str = "metrics") -> float:
    """Mean over foreground classes of a run's per-class mean Dice (``metrics``: which split's report)."""
    return statistics.fmean(v["mean"] for v in result[metrics]["test_dice"].values())


def paired_t(diffs: list[float]) -> tuple[float, float, float]:
    """Mean, standard error and two-sided p of a paired t-test on ``diffs``."""
    from scipy import stats

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if se > 0 else (0.0 if mean else 1.0)
    return mean, se, p


def spread(values: list[float]) -> str:
    """``mean ± sample std`` of ``values``; the mean alone for one value (no spread to show)."""
    mean = f"{statistics.fmean(values):.3f}"
    return f"{mean} ± {statistics.stdev(values):.3f}" if len(values) > 1 else mean


def per_class(runs: list[dict]) -> str:
    """``class mean ± sample std`` over ``runs`` of each class's test Dice."""
    classes = list(runs[0]["metrics"]["test_dice"])
    return ", ".join(f"{c} {spread([r['metrics']['test_dice'][c]['mean'] for r in runs])}" for c in classes)


def mean_dice_spread(runs: list[dict]) -> str:
    """Mean Dice over ``runs``, ``mean ± sample std``."""
    return spread([mean_dice(r) for r in runs])
