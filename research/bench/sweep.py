"""Label-ratio sweep: test Dice and HD95 of supervised-only, Mean Teacher, UnCoL (generalized teacher
only) and UnCoL (both teachers) for several labelled fractions and seeds, through the bundle's configs.

    python -m research.bench.sweep                      # the full 2D sweep at a converged budget (hours on 2 CPU cores)
    python -m research.bench.sweep --setting 2d_short   # the first, 6 + 6 epoch 2D sweep (about an hour)
    python -m research.bench.sweep --dims 3             # the reduced 3D sweep
    python -m research.bench.sweep --quick --out /tmp/q # one seed, tiny images and models: a smoke test
    python -m research.bench.sweep --quick --dims 3 ... # the same in 3D
    python -m research.bench.sweep --report-only        # rebuild results.md and the plot from the run JSONs
    python -m research.bench.sweep --task colin27   # a real-anatomy task (research.data.real_brain): colin27, macaque

Every run is stage 1 (``pretrain.json``) then stage 2 (``train.json``), same iterations for every
method, then ``evaluate.json`` on the test split. Stage 1 is shared between the methods that start
from the same one (no distillation for the baselines, both paths for UnCoL and for
"distilled_supervised", which trains stage 2 without pseudo-labels so that stage 1's gain and stage
2's separate); a stage 1 checkpoint is reused only if its overrides match and the code and configs
are unchanged since the clean commit that trained it (``stage1.json`` beside it). With 100 % labels
there is nothing unlabelled, so only supervised training runs there: the reference line.

Each finished run writes one JSON (``<results>/runs/<dims>d/<fraction>_<method>_seed<k>.json``: the
metrics, the overrides, seconds and commit); runs whose JSON exists are skipped, so an interrupted
sweep resumes. The table in ``results.md`` and the plot are rebuilt from those JSONs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from research.bench.report import replace_section, write_json

ROOT = Path(__file__).resolve().parents[2]


CONFIGS = ROOT / "bundle" / "configs"
DOCS = ROOT / "research"
TRAIN, PRETRAIN, EVALUATE = (str(CONFIGS / f) for f in ("train.json", "pretrain.json", "evaluate.json"))

#: method -> stage 1 distillation and stage 2 overrides
METHODS = {
    "supervised": {"stage1": "none", "stage2": {"teachers": "specialized", "max_unsup_weight": 0.0}},
    "mean_teacher": {"stage1": "none", "stage2": {"teachers": "specialized"}},
    # UnCoL's stage 1, then no pseudo-labels: separates stage 1's gain from stage 2's
    "distilled_supervised": {"stage1": "both", "stage2": {"teachers": "specialized", "max_unsup_weight": 0.0}},
    "uncol_generalized": {"stage1": "both", "stage2": {"teachers": "generalized"}},
    "uncol": {"stage1": "both", "stage2": {"teachers": "both"}},
    # the gate's improvements (issue 15) on top of UnCoL, chosen by research/bench/gate_audit.py (results.md): the
    # class-wise quantile gate, and with it voxels where the teachers disagree left out; calibration
    # alone, which the audit found harmful, for the record
    "uncol_quantile": {"stage1": "both", "stage2": {"teachers": "both", "gate": "quantile"}},
    "uncol_quantile_agree": {
        "stage1": "both",
        "stage2": {"teachers": "both", "gate": "quantile", "disagreement": "mask"},
    },
    "uncol_calibrated": {"stage1": "both", "stage2": {"teachers": "both", "calibration": "temperature"}},
    # the best gate, and where the labelled class prior expects a class only that class supervised (a
    # class the teachers miss is not unlearned: Colin27 seed 2)
    "uncol_quantile_agree_guarded": {
        "stage1": "both",
        "stage2": {"teachers": "both", "gate": "quantile", "disagreement": "mask", "class_guard": "prior"},
    },
    # and a pseudo-label of a class others lie inside (the organ around a lesion) read as "it or one
    # inside it": a lesion both teachers miss is no longer taught to be organ (custom/losses/pseudo_label.py)
    "uncol_quantile_agree_guarded_nested": {
        "stage1": "both",
        "stage2": {
            "teachers": "both",
            "gate": "quantile",
            "disagreement": "mask",
            "class_guard": "prior",
            "pseudo_label_nesting": "labelled",
        },
    },
}
#: the methods a sweep runs unless --methods says otherwise (the ablation rows are asked for by name)
DEFAULT_METHODS = ["supervised", "mean_teacher", "distilled_supervised", "uncol_generalized", "uncol"]
LABELS = {
    "supervised": "supervised only",
    "mean_teacher": "Mean Teacher",
    "distilled_supervised": "stage 1 distillation + supervised stage 2",
    "uncol_generalized": "UnCoL, generalized teacher only",
    "uncol": "UnCoL (both teachers)",
    "uncol_quantile": "UnCoL + class-wise quantile gate",
    "uncol_quantile_agree": "UnCoL + quantile gate + disagreement masked",
    "uncol_calibrated": "UnCoL + temperature calibration",
    "uncol_quantile_agree_guarded": "UnCoL + quantile gate + disagreement masked + class guard",
    "uncol_quantile_agree_guarded_nested": "UnCoL + quantile gate + disagreement masked + class guard + nested labels",
}

#: size and budget per setting: configs layered on train.json, dataset generator overrides, bundle
#: overrides, epochs per stage
SETTINGS = {
    # 32 + 32 epochs of 25 iterations: past the plateau of full supervision's learning curve on every
    # class (research/bench/learning_curve.py --task embedded2d: lesion flat from about 825 iterations)
    "2d": {
        "data": {},
        "bundle": {"spatial_dims": 2},
        "epochs": 32,
    },
    "3d": {
        "configs": ["train_3d.json"],
        "data": {"shape": [48, 48, 32], "num_train": 20, "num_validation": 4, "num_test": 8},
        "bundle": {"spatial_dims": 3, "roi_size": [48, 48, 32], "batch_size": 2},
        "epochs": 4,
    },
    "quick": {
        "data": {"shape": [32, 32], "num_train": 8, "num_validation": 2, "num_test": 2},
        "bundle": {
            "spatial_dims": 2,
            "roi_size": [32, 32],
            "batch_size": 2,
            "iterations_per_epoch": 2,
            "val_interval": 1,
            "network_def#hidden_size": 48,
            "network_def#mlp_dim": 96,
            "network_def#num_heads": 2,
            "network_def#feature_size": 8,
        },
        "epochs": 1,
    },
}
#: the first 2D sweep's budget (6 + 6 epochs), too short for the lesion: kept for its table in results.md
SETTINGS["2d_short"] = {**SETTINGS["2d"], "epochs": 6}
#: the real-anatomy tasks (research/data/real_brain.py, research/real_data.md): whole slices, native spacing
SETTINGS["colin27"] = {"task": "colin27", "bundle": {"spatial_dims": 2, "roi_size": [192, 224]}, "epochs": 32}
SETTINGS["macaque"] = {
    "task": "macaque",
    "bundle": {"spatial_dims": 2, "roi_size": [176, 208], "pixdim": [0.5, 0.5]},
    "epochs": 32,
}
#: 3D with patches (issue 17): the default 160x160x96 phantoms (1.25x1.25x2 mm) cut into 64x64x32
#: class-balanced patches, batch 2 in both stages: the clinical-size path, sized for 2 CPU cores;
#: 20 + 20 epochs (2000 labelled patches) are past the plateau of full supervision's learning curve
#: (research/bench/learning_curve.py --task embedded3d: flat on organ and lesion from 750 iterations of 2)
SETTINGS["3d_patch"] = {
    "configs": ["train_3d.json"],
    "data": {"num_train": 20, "num_validation": 4, "num_test": 8},
    "bundle": {"spatial_dims": 3, "roi_size": [64, 64, 32], "batch_size": 2, "pretrain_batch_size": 2},
    "epochs": 20,
}
#: the 3D smoke test: the quick budget on the smallest volumes the student takes (16-voxel patches)
SETTINGS["quick3d"] = {
    "configs": ["train_3d.json"],
    "data": {**SETTINGS["quick"]["data"], "shape": [32, 32, 16]},
    "bundle": {**SETTINGS["quick"]["bundle"], "spatial_dims": 3, "roi_size": [32, 32, 16]},
    "epochs": 1,
}


#: what a result depends on: "-dirty" after the commit means one of these differed from it (result
#: files and prose written meanwhile do not count). A result stamped "-dirty" cannot be traced to code,
#: so it is never committed to research/results (research/tests/test_generated.py checks it).
CODE_PATHS = ("custom", "research/bench", "research/data", "bundle/configs", "scripts")


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS]
        dirty = subprocess.run(status, cwd=ROOT, capture_output=True)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def run_name(fraction: float, method: str, seed: int) -> str:
    return f"{fraction:g}_{method}_seed{seed}"


def methods_for(fraction: float, methods: list[str]) -> list[str]:
    """Semi-supervised methods need unlabelled cases: with every case labelled only supervised runs."""
    return [m for m in methods if fraction < 1.0 or m == "supervised"]


def train_configs(setting: str) -> list[str]:
    """train.json and what the setting layers on it (train_3d.json in 3D)."""
    return [TRAIN, *(str(CONFIGS / name) for name in SETTINGS[setting].get("configs", []))]


def warm_teacher_cache(configs: list[str], overrides: dict) -> None:
    """Encode every unlabelled image once (stage 2's own warm-up, run before it), so that no timed
    stage 2 run pays for the cold cache."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from custom.handlers.teacher_warm_up import TeacherCacheWarmUp

    parser = ConfigParser()
    parser.read_config(configs)
    parser.update({"bundle_root": str(Path(overrides.get("dataset_dir", ".")).parent), **overrides})
    parser.get_parsed_content("embedded_data")
    warm_up = TeacherCacheWarmUp(
        parser.get_parsed_content("teacher_def"),
        parser.get_parsed_content("train#unlabelled_datalist"),
        Compose(parser.get_parsed_content("train#unlabelled_deterministic")),
        parser.get_parsed_content("plan").roi_size,
        whole_slices=parser.get_parsed_content("teacher_whole_slices"),
    )
    warm_up(None)
    print(f"teacher cache warm-up: {warm_up.summary}")


def setting_overrides(setting: str, fraction: float, seed: int, dataset: Path, teacher_cache: Path) -> dict:
    """Bundle overrides shared by both stages of a run: data, size, budget, seed, teacher cache."""
    spec = SETTINGS[setting]
    if "task" in spec:  # a prepared real-anatomy dataset instead of the embedded generator
        data = {"use_embedded_data": False, "datalist": str(dataset / "datalist.json")}
    else:
        generator = {"labelled_fraction": fraction, **spec["data"]}
        data = {f"embedded_data#{k}": v for k, v in generator.items()}
    return {
        "dataset_dir": str(dataset),
        "seed": seed,
        "config_dir": str(CONFIGS),
        "teacher_cache_dir": str(teacher_cache),
        **data,
        **spec["bundle"],
        "pretrain_epochs": spec["epochs"],
        "max_epochs": spec["epochs"],
    }


def run_one(setting: str, fraction: float, method: str, seed: int, work: Path, runs: Path) -> dict:
    from monai.bundle import run

    dataset = work / "data" / f"fraction_{fraction:g}"
    # the teacher cache is keyed by image content: shared by all runs
    shared = setting_overrides(setting, fraction, seed, dataset, work / "teacher_cache")
    stage1 = METHODS[method]["stage1"]
    stage2 = dict(METHODS[method]["stage2"])
    # stage 1's distillation targets have their own cache, filled by its own pipeline: only a stage 2
    # that runs the generalized teacher on unlabelled images needs their encodings warmed
    stage2_uses_teacher = stage2["teachers"] != "specialized"
    if "task" in SETTINGS[setting]:
        from research.data.real_brain import prepare

        prepare(dataset, SETTINGS[setting]["task"], labelled_fraction=fraction)
    if fraction < 1.0 and stage2_uses_teacher and not (dataset / "warm").is_file():
        warm_teacher_cache(train_configs(setting), shared)
        (dataset / "warm").touch()
    if fraction >= 1.0:
        stage2["unlabelled_key"] = "training"  # nothing is unlabelled; the pseudo-label weight is 0 anyway
    configs = train_configs(setting)
    seconds = {}
    stage1_root = work / f"fraction_{fraction:g}" / f"seed{seed}" / f"stage1_{stage1}"
    stage1_ckpt = stage1_root / "models" / "pretrain.pt"
    stage1_settings = portable({**shared, "distillation": stage1})
    if not reusable_stage1(stage1_root, stage1_settings):
        shutil.rmtree(stage1_root, ignore_errors=True)
        start = time.perf_counter()
        run("pretrain", config_file=[*configs, PRETRAIN], bundle_root=str(stage1_root), distillation=stage1, **shared)
        record = {"commit": commit(), "seconds": round(time.perf_counter() - start, 1), "overrides": stage1_settings}
        (stage1_root / "stage1.json").write_text(json.dumps(record, indent=2))
    stage1_record = json.loads((stage1_root / "stage1.json").read_text())
    seconds["stage1"] = stage1_record["seconds"]
    root = work / f"fraction_{fraction:g}" / f"seed{seed}" / method
    (root / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy(stage1_ckpt, root / "models" / "pretrain.pt")
    start = time.perf_counter()
    run("training", config_file=configs, bundle_root=str(root), **shared, **stage2)
    seconds["stage2"] = round(time.perf_counter() - start, 1)
    run("evaluate", config_file=[*configs, EVALUATE], bundle_root=str(root), **shared)
    report = json.loads((root / "eval" / "report" / "report.json").read_text())
    result = {
        "setting": setting,
        "fraction": fraction,
        "method": method,
        "seed": seed,
        "commit": commit(),
        "stage1_commit": stage1_record["commit"],
        "seconds": seconds,
        "stage1_overrides": portable({**shared, "distillation": stage1}),
        "stage2_overrides": portable({**shared, **stage2}),
        "metrics": report["metrics"],
        "num_test_cases": report.get("num_cases"),
    }
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{run_name(fraction, method, seed)}.json"
    write_json(path, result)
    return result


#: what a stage 1 checkpoint depends on: reused only if none of it changed since the commit that trained it
STAGE1_SOURCES = ("custom", "bundle/configs")


def reusable_stage1(root: Path, settings: dict) -> bool:
    """A stage 1 checkpoint under ``root`` is reused only if it was trained with the same overrides,
    from a clean tree, and ``git`` shows no change to the code and configs since that commit."""
    record_path = root / "stage1.json"
    if not (root / "models" / "pretrain.pt").is_file() or not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    if record["overrides"] != settings or record["commit"].endswith("-dirty") or commit().endswith("-dirty"):
        return False
    diff = subprocess.run(["git", "diff", "--quiet", record["commit"], "HEAD", "--", *STAGE1_SOURCES], cwd=ROOT)
    return diff.returncode == 0


#: what stands for the folders above a path outside the checkout in a committed JSON
OUTSIDE = "<outside the checkout>"


def portable(overrides: dict) -> dict:
    """``overrides`` with paths inside the repository made relative to it, and absolute paths outside
    it cut to their last two parts under ``OUTSIDE`` (JSON kept in the repository names no machine's
    folders)."""

    def relative(value: object) -> object:
        if isinstance(value, str) and value.startswith(str(ROOT) + os.sep):
            return os.path.relpath(value, ROOT)
        if isinstance(value, str) and os.path.isabs(value) and len(value) > 1:
            return "/".join([OUTSIDE, *Path(value).parts[-2:]])
        return value

    return {k: relative(v) for k, v in overrides.items()}


def class_names(results: list[dict]) -> list[str]:
    """The foreground classes the runs were evaluated on, in report order."""
    return list(results[0]["metrics"]["test_dice"])


def load_runs(runs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]


def summarise(results: list[dict]) -> dict:
    """(fraction, method) -> {metric: {class: (mean, std, n)}} over seeds (of the per-run test means)."""
    groups: dict[tuple[float, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["fraction"], r["method"]), []).append(r)
    summary = {}
    for key, group in groups.items():
        summary[key] = {}
        for metric in ("test_dice", "test_hd95"):
            summary[key][metric] = {}
            for cls in class_names(group):
                # a run whose student never predicts the class has no finite HD95: left out, and counted
                values = [v for r in group if math.isfinite(v := r["metrics"][metric][cls]["mean"])]
                mean = statistics.fmean(values) if values else float("nan")
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[key][metric][cls] = (mean, std, len(values))
    return summary


def table(summary: dict) -> str:
    classes = list(next(iter(summary.values()))["test_dice"])
    header = [f"{c} Dice" for c in classes] + [f"{c} HD95 (mm)" for c in classes]
    lines = [
        "| labelled | method | " + " | ".join(header) + " | seeds |",
        "|---|---|" + "---|" * len(header) + "---|",
    ]
    order = list(METHODS)
    for fraction, method in sorted(summary, key=lambda k: (k[0], order.index(k[1]))):
        s = summary[(fraction, method)]
        runs = max(n for _, _, n in s["test_dice"].values())
        spread = (lambda std: f" ± {std:.3f}") if runs > 1 else (lambda std: "")  # one seed has no spread
        cells = [f"{s['test_dice'][c][0]:.3f}{spread(s['test_dice'][c][1])}" for c in classes]
        for c in classes:
            mean, std, n = s["test_hd95"][c]
            if n == 0:  # HD95 needs a predicted structure: no run predicted this class at all
                cells.append(f"n/a (0 of {runs} runs predict it)")
            else:
                counted = f" ({n} of {runs} runs)" if n < runs else ""
                cells.append(f"{mean:.1f}" + (f" ± {std:.1f}" if runs > 1 else "") + counted)
        lines.append(f"| {fraction:.0%} | {LABELS[method]} | " + " | ".join(cells) + f" | {runs} |")
    return "\n".join(lines)


def mean_foreground_dice(run: dict) -> float:
    """A run's test Dice averaged over the foreground classes (each class's mean over the test cases)."""
    return statistics.fmean(v["mean"] for v in run["metrics"]["test_dice"].values())


def per_seed_table(results: list[dict]) -> str:
    """Mean foreground Dice of every run, seed by seed, and each method's difference to supervised-only
    and to Mean Teacher on the same seed (the comparison the spread over seeds alone cannot make)."""
    runs = {(r["fraction"], r["method"], r["seed"]): mean_foreground_dice(r) for r in results}
    seeds = sorted({seed for _, _, seed in runs})
    lines = [
        "| labelled | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sample std | "
        "− supervised, per seed | − Mean Teacher, per seed |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    order = list(METHODS)

    def differences(fraction: float, method: str, baseline: str) -> str:
        if method == baseline:
            return "-"
        pairs = [
            runs[(fraction, method, s)] - runs[(fraction, baseline, s)]
            for s in seeds
            if (fraction, method, s) in runs and (fraction, baseline, s) in runs
        ]
        return " / ".join(f"{d:+z.3f}" for d in pairs) if pairs else "-"

    for fraction, method in sorted({(f, m) for f, m, _ in runs}, key=lambda k: (k[0], order.index(k[1]))):
        values = [runs.get((fraction, method, s)) for s in seeds]
        present = [v for v in values if v is not None]
        spread = f" ± {statistics.stdev(present):.3f}" if len(present) > 1 else ""
        cells = [f"{v:.3f}" if v is not None else "-" for v in values]
        lines.append(
            f"| {fraction:.0%} | {LABELS[method]} | "
            + " | ".join(cells)
            + f" | {statistics.fmean(present):.3f}{spread} | "
            f"{differences(fraction, method, 'supervised')} | {differences(fraction, method, 'mean_teacher')} |"
        )
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(next(iter(summary.values()))["test_dice"])
    fig, axes = plt.subplots(1, len(classes), figsize=(5 * len(classes), 4), sharex=True, squeeze=False)
    axes = axes[0]
    fractions = sorted({f for f, _ in summary})
    for ax, cls in zip(axes, classes, strict=True):
        for i, method in enumerate(METHODS):
            points = [(f, summary[(f, method)]["test_dice"][cls]) for f in fractions if (f, method) in summary]
            if not points:
                continue
            dodge = 1 + 0.04 * (i - (len(METHODS) - 1) / 2)  # keep the error bars apart
            xs = [100 * f * dodge for f, _ in points]
            ys = [s[0] for _, s in points]
            err = [s[1] for _, s in points]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=LABELS[method])
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([100 * f for f in fractions], [f"{f:.0%}" for f in fractions])
        ax.set_xlabel("labelled training cases")
        ax.set_ylabel("test Dice")
        ax.set_title(cls)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: what ± means in the sweep's tables (printed with them)
SPREAD = (
    "Per class: mean over seeds of each run's test mean ± sample std over seeds (n − 1 in the denominator; "
    "none with one seed); HD95 over the runs that predict the class."
)


def section_text(setting: str, results_dir: Path) -> str:
    """The ``sweep-<setting>`` section of results.md from the run JSONs in ``results_dir/runs/<setting>``
    (nothing is written: the test of the committed page rebuilds it from here)."""
    runs = load_runs(results_dir / "runs" / setting)
    if not runs:
        raise SystemExit(f"error: {results_dir / 'runs' / setting}: no run results to report")
    summary = summarise(runs)
    budget = runs[0]["stage2_overrides"]
    commits = sorted({r["commit"] for r in runs})
    seconds = statistics.fmean(r["seconds"]["stage1"] + r["seconds"]["stage2"] for r in runs)
    folder = results_dir.name  # the page sits beside the results folder: its paths are relative to it
    return "\n".join(
        [
            SPREAD,
            "",
            table(summary),
            "",
            "Each run's mean foreground Dice (its classes' test Dice averaged), its mean ± sample std over seeds, "
            "and its difference to supervised-only and to Mean Teacher on the same seed:",
            "",
            per_seed_table(runs),
            "",
            f"![Dice vs labelled fraction]({folder}/{plot_path(results_dir, setting).name})",
            "",
            f"{len(runs)} runs of the sweep (today `python -m research.bench.sweep{SETTING_FLAGS.get(setting, '')}`) "
            f"at commit(s) {', '.join(commits)}; seeds {sorted({r['seed'] for r in runs})}; stage 1 "
            f"{budget['pretrain_epochs']} and stage 2 {budget['max_epochs']} epochs of "
            f"{budget.get('iterations_per_epoch', 25)} iterations; overrides per run in `{folder}/runs/{setting}/`. "
            f"Seconds per run (stage 1 + stage 2, as the run JSONs record them): {seconds:.0f} on average.",
        ]
    )


def plot_path(results_dir: Path, setting: str) -> Path:
    return results_dir / f"dice_vs_fraction_{setting}.png"


def report(setting: str, results_dir: Path, results_md: Path) -> str:
    """Plot the setting's runs and write its section into ``results_md``."""
    text = section_text(setting, results_dir)
    runs = load_runs(results_dir / "runs" / setting)
    title = f"Test Dice vs labelled fraction ({setting}; mean ± sample std over seeds)"
    plot(summarise(runs), plot_path(results_dir, setting), title)
    replace_section(results_md, f"sweep-{setting}", text)
    return text


#: the command-line flag that selects each setting
SETTING_FLAGS = {
    "3d": " --dims 3",
    "2d_short": " --setting 2d_short",
    "3d_patch": " --setting 3d_patch",
    "colin27": " --task colin27",
    "macaque": " --task macaque",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--task", choices=("colin27", "macaque"), default=None, help="a real-anatomy task")
    parser.add_argument("--quick", action="store_true", help="one seed, tiny images and models (harness smoke test)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--out", default=str(ROOT / "research" / "work" / "sweep"), help="training work folder")
    parser.add_argument("--results", default=None, help="run JSONs and plots (default: research/results)")
    parser.add_argument("--results-md", default=None, help="page to write the table into (default: results.md)")
    parser.add_argument("--setting", choices=list(SETTINGS), default=None, help="a setting by name (e.g. 2d_short)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table and plot from the run JSONs")
    args = parser.parse_args(argv)
    setting = ("quick" if args.dims == 2 else "quick3d") if args.quick else args.task or f"{args.dims}d"
    setting = args.setting or setting
    out = Path(args.out) / setting
    results_dir = Path(args.results) if args.results else (out / "results" if args.quick else DOCS / "results")
    results_md = Path(args.results_md) if args.results_md else (results_dir.parent / "results.md")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    fractions = args.fractions or ([0.5, 1.0] if args.quick else [0.05, 0.1, 0.2, 1.0])
    if not args.report_only:
        start = time.perf_counter()
        for fraction in fractions:
            for seed in seeds:
                for method in methods_for(fraction, args.methods):
                    if (results_dir / "runs" / setting / f"{run_name(fraction, method, seed)}.json").is_file():
                        continue
                    run_one(setting, fraction, method, seed, out, results_dir / "runs" / setting)
        print(f"sweep ({setting}) finished in {(time.perf_counter() - start) / 60:.1f} min")
    print(report(setting, results_dir, results_md))


if __name__ == "__main__":
    main()
