"""Per-class summary of an evaluation run, written as JSON and CSV and printed as a table."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events


class ClassMetricsReport:
    """At the end of an evaluator run, summarise each metric's per-case, per-class details.

    Reads ``engine.state.metric_details`` (filled by MONAI metric handlers with ``save_details=True``)
    and writes ``<filename>.json`` and ``<filename>.csv`` with mean, std and count per class. Only
    finite values count: MONAI gives NaN for Dice where the ground truth lacks the class, and for
    HD95 where the ground truth or the prediction lacks it, so ``n`` says how many cases each mean covers.
    """

    def __init__(
        self,
        output_dir: str | Path,
        metric_names: Sequence[str],
        class_names: Sequence[str],
        filename: str = "report",
        extra: dict | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.metric_names = list(metric_names)
        self.class_names = list(class_names)
        self.filename = filename
        self.extra = dict(extra or {})
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def summarise(self, details: torch.Tensor | np.ndarray) -> dict[str, dict[str, float]]:
        values = np.asarray(torch.as_tensor(details).float().cpu(), dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != len(self.class_names):
            raise ValueError(f"expected per-case details of shape (N, {len(self.class_names)}), got {values.shape}.")
        out = {}
        for c, name in enumerate(self.class_names):
            col = values[:, c]
            finite = col[np.isfinite(col)]
            out[name] = {
                "mean": float(finite.mean()) if finite.size else math.nan,
                "std": float(finite.std()) if finite.size else math.nan,
                "n": int(finite.size),
            }
        return out

    def __call__(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", {}) or {}
        report = {name: self.summarise(details[name]) for name in self.metric_names if name in details}
        missing = [name for name in self.metric_names if name not in details]
        if missing:
            self.logger.warning(f"no per-case details for {missing}; set save_details=True on their handlers.")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        num_cases = max((len(details[name]) for name in report), default=0)
        payload = {**self.extra, "num_cases": num_cases, "metrics": report}
        (self.output_dir / f"{self.filename}.json").write_text(json.dumps(payload, indent=2))
        with open(self.output_dir / f"{self.filename}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["metric", "class", "mean", "std", "n"])
            for metric, classes in report.items():
                for cls, s in classes.items():
                    writer.writerow([metric, cls, f"{s['mean']:.4f}", f"{s['std']:.4f}", s["n"]])
        lines = [f"{'metric':<14}{'class':<12}{'mean':>9}{'std':>9}{'n':>5}"]
        for metric, classes in report.items():
            for cls, s in classes.items():
                lines.append(f"{metric:<14}{cls:<12}{s['mean']:>9.4f}{s['std']:>9.4f}{s['n']:>5}")
        self.logger.info("per-class results (%s):\n%s", self.output_dir / f"{self.filename}.json", "\n".join(lines))


def compare_reports(reports: dict[str, str | Path], metric: str = "test_dice") -> str:
    """Side-by-side table of one metric's per-class means from several ``report.json`` files."""
    loaded = {name: json.loads(Path(path).read_text())["metrics"][metric] for name, path in reports.items()}
    classes = list(next(iter(loaded.values())))
    width = max(12, *(len(n) + 2 for n in loaded))
    lines = [f"{metric:<12}" + "".join(f"{name:>{width}}" for name in loaded)]
    for cls in classes:
        lines.append(f"{cls:<12}" + "".join(f"{r[cls]['mean']:>{width}.4f}" for r in loaded.values()))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    # python -m custom.handlers.class_report "name=path/report.json" ... : print them side by side
    pairs = dict(arg.split("=", 1) for arg in sys.argv[1:])
    print(compare_reports(pairs))
    print(compare_reports(pairs, "test_hd95"))
