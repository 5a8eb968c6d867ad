"""Whole training runs paired by (labelled subset, seed): what the switch probe and the method sweep share.

A run is what a user's run is: stage 1 (``pretrain.json``, the arm's distillation) then stage 2
(``train.json`` and the arm's overrides) at the task's budget, the checkpoint chosen on validation Dice,
then evaluated on the validation split (what a choice may look at) and on the test split (what is
reported, per case as well). A split seed picks the labelled cases; the seed drives training. Arms that
train the same student with the same stage 1 share it.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from research.bench.report import write_json
from research.bench.sweep import CONFIGS, EVALUATE, PRETRAIN, TRAIN, commit, portable, warm_teacher_cache


@dataclass(frozen=True)
class Arm:
    """What an arm trains: stage 1's distillation, the student (overrides of both stages), stage 2's overrides."""

    stage1: str = "both"
    network: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)


#: stage 2's logged scalars a run keeps the mean of: the fraction of unlabelled images whose teacher output
#: was reused, the fraction of pseudo-labels from the generalized teacher, the fraction kept by the gate
STAGE2_LOG = ("generalized_reused", "gate_from_generalized", "gate_kept")

#: the 3D phantom task of the switch probe and the method sweep alike (the sweep's ``3d_patch`` setting: 20
#: training volumes of which the split seed labels 2, 64x64x32 patches, batch 2, 20 + 20 epochs); its data,
#: teacher cache and stage 1 checkpoints sit in one folder both use (``shared_work``, under their common work
#: root), so a stage 1 or a teacher encoding either one paid for serves the other (never run both on the same
#: pair at once: each would train that stage 1 into the folder the other is writing)
EMBEDDED3D = {
    "data": {"spatial_dims": 3, "num_train": 20, "num_validation": 4, "num_test": 8, "num_labelled": 2},
    "configs": ["train_3d.json"],
    "bundle": {"roi_size": [64, 64, 32], "batch_size": 2, "pretrain_batch_size": 2},
    "epochs": 20,
    "shared_work": "embedded3d",
}


def configs_for(spec: dict) -> list[str]:
    """train.json and what the task layers on it (train_3d.json in 3D)."""
    return [TRAIN, *(str(CONFIGS / name) for name in spec.get("configs", []))]


def datalist_for(spec: dict, work: Path, split_seed: int) -> Path:
    """The task's datalist with the labelled cases drawn by ``split_seed``: a real-anatomy task (``task``,
    ``fraction``) prepared for that seed, or the phantoms (``data``) with ``num_labelled`` of them labelled."""
    if "task" in spec:
        from research.data.real_brain import prepare

        out = work / "data" / f"split{split_seed}"
        return prepare(out, spec["task"], labelled_fraction=spec["fraction"], seed=split_seed)
    from custom.data.phantoms import ensure_dataset
    from research.data.probes import split_datalist

    generator = {k: v for k, v in spec["data"].items() if k != "num_labelled"}
    full = ensure_dataset(work / "data", labelled_fraction=1.0, **generator)
    return split_datalist(full, spec["data"]["num_labelled"], split_seed)


def logged_means(folder: Path, tags: tuple[str, ...] = STAGE2_LOG) -> dict[str, float]:
    """Mean over a training run of each scalar ``tag`` its TensorBoard events under ``folder`` hold."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[float]] = {tag: [] for tag in tags}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        log = EventAccumulator(str(events), size_guidance={"scalars": 0})
        log.Reload()
        for tag in set(tags) & set(log.Tags()["scalars"]):
            values[tag] += [e.value for e in log.Scalars(tag)]
    return {tag: round(statistics.fmean(v), 4) for tag, v in values.items() if v}


def case_dice(report_dir: Path, classes: list[str]) -> dict[str, dict[str, float]]:
    """Per case (file name), each foreground class's Dice from the evaluation's ``test_dice_raw.csv``
    (columns ``class0``.. in the report's class order; NaN where a class is absent from both)."""
    cases = {}
    with open(report_dir / "test_dice_raw.csv", newline="") as f:
        for row in csv.DictReader(f):
            name = Path(row["filename"]).name
            cases[name] = {c: round(float(row[f"class{i}"]), 5) for i, c in enumerate(classes)}
    return cases


@dataclass
class PairedRuns:
    """Runs of ``arms`` on ``tasks`` (name -> spec: data, ``configs``, ``bundle`` overrides, ``epochs``),
    results in ``results/<task>/<arm>_split<S>_seed<K>.json`` (a run whose JSON exists is not run again),
    checkpoints and data under ``work/<task>/``."""

    tasks: dict[str, dict]
    arms: dict[str, Arm]
    results: Path
    work: Path

    def task_work(self, task: str) -> Path:
        """Where ``task``'s data, teacher cache, stage 1 checkpoints and runs go: its own folder, or the one it
        shares with the other users of the same work root (``shared_work``)."""
        shared = self.tasks[task].get("shared_work")
        return self.work.parent / shared if shared else self.work / task

    def stage1(self, task: str, arm: str, split_seed: int, seed: int, shared: dict) -> tuple[Path, float]:
        """The arm's stage 1 checkpoint and its seconds, trained unless a run of the same stage 1 has it."""
        from monai.bundle import run

        spec = self.arms[arm]
        name = "_".join(f"{k.split('#')[-1]}_{v}" for k, v in spec.network.items()) or "default"
        name = name if spec.stage1 == "both" else f"{name}_distillation_{spec.stage1}"
        root = self.task_work(task) / "stage1" / f"{name}_split{split_seed}_seed{seed}"
        record = root / "stage1.json"
        if record.is_file():
            return root / "models" / "pretrain.pt", json.loads(record.read_text())["seconds"]
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        configs = [*configs_for(self.tasks[task]), PRETRAIN]
        run("pretrain", config_file=configs, bundle_root=str(root), distillation=spec.stage1, **shared, **spec.network)
        seconds = round(time.perf_counter() - start, 1)
        record.write_text(json.dumps({"commit": commit(), "seconds": seconds}))
        return root / "models" / "pretrain.pt", seconds

    def evaluate(self, task: str, root: Path, split: str, overrides: dict) -> dict:
        """``evaluate.json`` on ``split``: the report (per class mean, std, n) with the per-case Dice."""
        from monai.bundle import run

        out = root / f"eval_{split}"
        configs = [*configs_for(self.tasks[task]), EVALUATE]
        run("evaluate", config_file=configs, bundle_root=str(root), output_dir=str(out), eval_split=split, **overrides)
        report = json.loads((out / "report" / "report.json").read_text())
        report["cases"] = case_dice(out / "report", list(report["metrics"]["test_dice"]))
        return report

    def run_one(self, task: str, arm: str, split_seed: int, seed: int) -> dict:
        """One arm on one (labelled subset, seed) pair: its JSON, read back if it exists."""
        from monai.bundle import run

        out = self.results / task / f"{arm}_split{split_seed}_seed{seed}.json"
        root = self.task_work(task) / "runs" / f"{arm}_split{split_seed}_seed{seed}"
        if out.is_file():
            return json.loads(out.read_text())
        spec = self.tasks[task]
        work = self.task_work(task)
        datalist = datalist_for(spec, work, split_seed)
        shared = {
            "use_embedded_data": False,
            "datalist": str(datalist),
            "config_dir": str(CONFIGS),
            "teacher_cache_dir": str(work / "teacher_cache"),
            "seed": seed,
            "pretrain_epochs": spec["epochs"],
            "max_epochs": spec["epochs"],
            **spec.get("bundle", {}),
        }
        checkpoint, stage1_seconds = self.stage1(task, arm, split_seed, seed, shared)
        overrides = {**shared, **self.arms[arm].network}
        stage2 = self.arms[arm].stage2
        warm = datalist.with_suffix(".warm")
        if stage2.get("teachers", "both") != "specialized" and not warm.is_file():
            # no timed stage 2 pays for encoding the unlabelled images
            warm_teacher_cache(configs_for(spec), {"bundle_root": str(work), **shared})
            warm.touch()
        shutil.rmtree(root, ignore_errors=True)
        (root / "models").mkdir(parents=True)
        shutil.copy(checkpoint, root / "models" / "pretrain.pt")
        start = time.perf_counter()
        run("training", config_file=configs_for(spec), bundle_root=str(root), **overrides, **stage2)
        stage2_seconds = round(time.perf_counter() - start, 1)
        validation = self.evaluate(task, root, "validation", overrides)
        test = self.evaluate(task, root, "test", overrides)
        result = {
            "task": task,
            "arm": arm,
            "split_seed": split_seed,
            "seed": seed,
            "commit": commit(),
            "seconds": {"stage1": stage1_seconds, "stage2": stage2_seconds},
            "stage1_distillation": self.arms[arm].stage1,
            "overrides": portable({**overrides, **stage2}),
            "stage2_log": logged_means(root / "eval"),
            "validation_metrics": validation["metrics"],
            "metrics": {**test["metrics"], "test_dice_cases": test["cases"]},
            "num_test_cases": test.get("num_cases"),
        }
        write_json(out, result)
        return result

    def load(self, task: str, results: Path | None = None) -> dict[str, dict[tuple[int, int], dict]]:
        """``arm -> (split seed, seed) -> run`` of ``task``'s JSONs under ``results`` (default: this one's)."""
        folder = (results or self.results) / task
        runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        return {a: {(r["split_seed"], r["seed"]): r for r in runs if r["arm"] == a} for a in self.arms}
