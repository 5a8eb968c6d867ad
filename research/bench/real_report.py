"""Rebuild the real-anatomy tables of results.md from their committed JSONs.

    python -m research.bench.real_report

Reads ``research/results/real/zero_shot_<task>.json`` (``bench/teacher_zero_shot.py --datalist``)
and ``learning_curve_<task>.json`` (``bench/learning_curve.py``), writes the zero-shot table, the
learning-curve table and one learning-curve plot per task, and replaces the ``real-zero-shot`` and
``real-curves`` sections of ``research/results.md``, and ``embedded-curve`` from
``learning_curve_embedded2d.json`` (``bench/learning_curve.py --task embedded2d``, the phantoms) and
``embedded3d-curve`` from ``learning_curve_embedded3d.json`` (the 3D phantoms in patches).
The label-ratio rows come from ``bench/sweep.py --task <task>`` (section ``sweep-<task>``).
"""

from __future__ import annotations

import json
from pathlib import Path

from research.bench.report import replace_section

ROOT = Path(__file__).resolve().parents[2]


RESULTS = ROOT / "research" / "results" / "real"
PAGE = ROOT / "research" / "results.md"
TASKS = ("colin27", "macaque")


def zero_shot_table() -> str:
    rows = ["| task | prompt | " + " | ".join(["caudate", "lentiform", "thalamus"]) + " | seconds |"]
    rows.append("|---|---|---|---|---|---|")
    for task in TASKS:
        for suffix, prompt in (("", "one box per class"), ("_component", "one box per connected component")):
            path = RESULTS / f"zero_shot_{task}{suffix}.json"
            if not path.is_file():
                continue
            result = json.loads(path.read_text())
            dice = result["dice"]
            # each class is scored on the test slices that hold it: the count differs between classes
            cells = [f"{s['mean']:.3f} ± {s['std']:.3f} (n={s['n']})" for s in dice.values()]
            rows.append(f"| {task} | {prompt} | " + " | ".join(cells) + f" | {result['seconds']:.0f} |")
    return "\n".join(rows)


def plateau_epoch(points: list[dict], tolerance: float = 0.02, window: int = 3) -> int:
    """First epoch from which every class's validation Dice, averaged over ``window`` epochs (single
    validations of a few slices are noisy), stays within ``tolerance`` of its final average."""
    classes = list(points[-1]["dice"])
    series = {c: [p["dice"][c] or 0.0 for p in points] for c in classes}
    smooth = {c: [sum(v[max(0, i - window + 1) : i + 1]) / len(v[max(0, i - window + 1) : i + 1])
                  for i in range(len(v))] for c, v in series.items()}  # fmt: skip
    for i in range(len(points)):
        if all(abs(x - smooth[c][-1]) <= tolerance for c in classes for x in smooth[c][i:]):
            return points[i]["epoch"]
    return points[-1]["epoch"]


def curves(tasks: tuple[str, ...] = TASKS) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for task in tasks:
        path = RESULTS / f"learning_curve_{task}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        points = result["validation"]
        classes = list(points[-1]["dice"])
        per_epoch = result["iterations_per_epoch"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in classes:
            ax.plot([p["epoch"] * per_epoch for p in points], [p["dice"][c] for p in points], label=c)
        ax.set_xlabel(f"iterations (batch of {result['batch_size']})")
        ax.set_ylabel("validation Dice")
        ax.set_title(f"{task}: supervised, 100 % labels")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        png = RESULTS / f"learning_curve_{task}.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        shown = [p for p in points if p["epoch"] in (1, 2, 5, 10, 15, 20, 25, 30, 35, 40) or p is points[-1]]
        lines += [f"**{task}** (`{result['command']}`, commit {result['commit']}, {result['seconds'] / 60:.0f} min):"]
        lines += ["", "| iterations | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for p in shown:
            cells = [f"{p['dice'][c]:.3f}" if p["dice"][c] is not None else "n/a" for c in classes]
            lines.append(f"| {p['epoch'] * per_epoch} | " + " | ".join(cells) + " |")
        epoch = plateau_epoch(points)
        lines += [
            "",
            f"Plateau: every class's validation Dice, averaged over 3 validations, within 0.02 of its final value from "
            f"iteration {epoch * per_epoch} on.",
        ]
        peaks = {c: max(points, key=lambda p, c=c: p["dice"][c] or 0.0) for c in classes}
        fallen = [c for c in classes if (peaks[c]["dice"][c] or 0.0) - (points[-1]["dice"][c] or 0.0) > 0.1]
        if fallen:  # a flat end below an earlier peak is a collapse, not a learned plateau
            lines[-1] += (
                " Not converged to what it had learned: "
                + ", ".join(
                    f"{c} peaked at {peaks[c]['dice'][c]:.3f} (iteration {peaks[c]['epoch'] * per_epoch}) and ended at "
                    f"{points[-1]['dice'][c]:.3f}"
                    for c in fallen
                )
                + "."
            )
        lines += ["", f"![{task} learning curve](results/real/{png.name})", ""]
    return "\n".join(lines)


def main() -> None:
    replace_section(PAGE, "real-zero-shot", zero_shot_table())
    replace_section(PAGE, "real-curves", curves())
    replace_section(PAGE, "embedded-curve", curves(("embedded2d",)))
    if (RESULTS / "learning_curve_embedded3d.json").is_file():
        replace_section(PAGE, "embedded3d-curve", curves(("embedded3d",)))
    print(zero_shot_table())
    print(curves())


if __name__ == "__main__":
    main()
