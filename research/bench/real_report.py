"""Rebuild the real-anatomy and learning-curve sections of results.md from their committed JSONs.

    python -m research.bench.real_report

Reads ``research/results/real/zero_shot_<task>.json`` (``python -m research.bench.teacher_zero_shot
--datalist``) and ``learning_curve_<task>.json`` (``python -m research.bench.learning_curve``), draws
one learning-curve plot per task and replaces the ``real-zero-shot`` and ``real-curves`` sections of
``research/results.md``, ``embedded-curve`` from ``learning_curve_embedded2d.json`` (the 2D phantoms)
and ``embedded3d-curve`` from ``learning_curve_embedded3d.json`` (the 3D phantoms in patches). The
label-ratio rows come from ``python -m research.bench.sweep --task <task>`` (section ``sweep-<task>``).
"""

from __future__ import annotations

import json
from pathlib import Path

from research.bench.report import replace_section

ROOT = Path(__file__).resolve().parents[2]


RESULTS = ROOT / "research" / "results" / "real"
PAGE = ROOT / "research" / "results.md"
DATA_PAGE = ROOT / "research" / "real_data.md"
TASKS = ("colin27", "macaque")


def zero_shot_table(results: Path = RESULTS) -> str:
    rows = [
        "Dice per class: mean ± population std (n in the denominator) over the n test slices that hold the "
        "class; seconds for the whole split.",
        "",
        "| task | prompt | " + " | ".join(["caudate", "lentiform", "thalamus"]) + " | seconds |",
    ]
    rows.append("|---|---|---|---|---|---|")
    for task in TASKS:
        for suffix, prompt in (("", "one box per class"), ("_component", "one box per connected component")):
            path = results / f"zero_shot_{task}{suffix}.json"
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


def plot_curve(result: dict, png: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, per_epoch = result["validation"], result["iterations_per_epoch"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in points[-1]["dice"]:
        ax.plot([p["epoch"] * per_epoch for p in points], [p["dice"][c] for p in points], label=c)
    ax.set_xlabel(f"iterations (batch of {result['batch_size']})")
    ax.set_ylabel("validation Dice")
    ax.set_title(f"{task}: supervised, 100 % labels")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def curves(tasks: tuple[str, ...] = TASKS, results: Path = RESULTS) -> str:
    """The learning-curve tables of ``tasks`` whose JSON is committed (one validation run per point)."""
    lines = []
    for task in tasks:
        path = results / f"learning_curve_{task}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        points = result["validation"]
        classes = list(points[-1]["dice"])
        per_epoch = result["iterations_per_epoch"]
        png = results / f"learning_curve_{task}.png"
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
        lines += ["", f"![{task} learning curve]({results.parent.name}/{results.name}/{png.name})", ""]
    return "\n".join(lines)


def split_table(results: Path = RESULTS) -> str:
    """research/real_data.md's ``real-splits`` section from ``split_<task>.json`` (``python -m
    research.data.real_brain ... --record``; the tests check a fresh preparation gives them again)."""
    records = [json.loads(p.read_text()) for task in TASKS if (p := results / f"split_{task}.json").is_file()]
    tasks = [r["generator"]["task"] for r in records]

    def where(slabs: dict, key: str) -> str:
        zs = slabs[key]
        if slabs["layout"] == "slabs":
            return f"slab k {zs[0]}-{zs[1]} ({zs[1] - zs[0] + 1} slices)"
        return f"k {', '.join(map(str, zs))} ({len(zs)} single slices)"

    def row(what: str, cells: list[str]) -> str:
        return f"| {what} | " + " | ".join(cells) + " |"

    classes = [c for c in records[0]["split_stats"]["test"] if c != "slices"]
    lines = [
        "With the defaults (`--labelled-fraction 0.1 --seed 0`); k is the axial slice index.",
        "",
        "| | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
        row(
            "source",
            [f"`{r['source']['image']}` + `{r['source']['labels']}`, {r['source']['package']}" for r in records],
        ),  # fmt: skip
        row(
            "slice grid",
            [" × ".join(map(str, r["source"]["shape"])) + f", {r['source']['spacing_mm'][0]:g} mm" for r in records],
        ),  # fmt: skip
        row(
            "class volumes left / right (mm³)",
            [
                "; ".join(
                    f"{c} {r['source']['anatomy'][c + '_L']['volume_mm3']:g} / "
                    f"{r['source']['anatomy'][c + '_R']['volume_mm3']:g}"
                    for c in classes
                )
                for r in records
            ],
        ),  # fmt: skip
        row("slices kept", [f"k {r['slabs']['used'][0]}-{r['slabs']['used'][1]}" for r in records]),
        row("layout", [r["slabs"]["layout"] for r in records]),
        row("test", [where(r["slabs"], "test") for r in records]),
        row("validation", [where(r["slabs"], "validation") for r in records]),
        row("gap slices (unused)", [", ".join(map(str, r["slabs"]["gap"])) for r in records]),
        row("`training` (labelled)", [f"k {', '.join(map(str, r['slices']['training']))}" for r in records]),
        row("`unlabeled`", [str(len(r["slices"]["unlabeled"])) for r in records]),
    ]
    for task, r in zip(tasks, records, strict=True):
        lines += [
            "",
            f"**{task}** per split: its slices; per class the slices holding it, its share of the class's pixels "
            "in the kept slices and its median area (px) in those slices (`split_stats`; `pool` = `training` + "
            "`unlabeled`):",
            "",
            "| split | slices | " + " | ".join(classes) + " |",
            "|---|---|" + "---|" * len(classes),
        ]
        for name, entry in r["split_stats"].items():
            cells = [f"{e['slices']}, {100 * e['share']:.1f} %, {e['median_px']}" for e in (entry[c] for c in classes)]
            lines.append(f"| {name} | {entry['slices']} | " + " | ".join(cells) + " |")
    parameters = [k for k in records[0]["generator"] if k not in ("task", "source_sha256")]
    lines += [
        "",
        "The parameters behind these splits (the datalist's `generator`; the source files' SHA-256 are in the JSONs):",
        "",
        "| parameter | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
        *[row(f"`{k}`", [str(r["generator"][k]) for r in records]) for k in parameters],
        "",
        "Made by " + " and ".join(f"`{r['command']}`" for r in records) + ".",
    ]
    return "\n".join(lines)


#: section of results.md -> the learning curves it shows
CURVE_SECTIONS = {"real-curves": TASKS, "embedded-curve": ("embedded2d",), "embedded3d-curve": ("embedded3d",)}


def sections(results: Path = RESULTS) -> dict[str, str]:
    """Every section this script writes, from the JSONs in ``results`` (nothing is written)."""
    out = {"real-zero-shot": zero_shot_table(results)}
    out.update({name: curves(tasks, results) for name, tasks in CURVE_SECTIONS.items()})
    return out


def main() -> None:
    for tasks in CURVE_SECTIONS.values():
        for task in tasks:
            path = RESULTS / f"learning_curve_{task}.json"
            if path.is_file():
                plot_curve(json.loads(path.read_text()), RESULTS / f"learning_curve_{task}.png", task)
    for name, text in sections().items():
        replace_section(PAGE, name, text)
        print(text)
    replace_section(DATA_PAGE, "real-splits", split_table())


if __name__ == "__main__":
    main()
