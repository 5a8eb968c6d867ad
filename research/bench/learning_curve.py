"""Learning curve of full supervision on a real-anatomy task: validation Dice per class after every
epoch, to choose a sweep budget at which supervised training with 100 % labels has plateaued.

    python -m research.bench.learning_curve --task colin27 [--epochs 40] [--seed 0]
    python -m research.bench.learning_curve --task embedded2d     # the bundle's own 2D phantoms
    python -m research.bench.learning_curve --task embedded3d     # 3D phantoms in patches (sweep setting 3d_patch)

Prepares the task with every training slice labelled (``research.data.real_brain``, or the embedded
generator with the sweep setting's data: the curve and the sweep it budgets see the same images,
sizes and batches), trains the student
with the supervised loss only (stage 1 without distillation, as the sweep's supervised runs start),
validates after every epoch and writes ``research/results/real/learning_curve_<task>.json``: per
epoch (``iterations_per_epoch`` steps each) the validation Dice of each class, plus the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from research.bench.sweep import CONFIGS, DOCS, commit

ROOT = Path(__file__).resolve().parents[2]


RESULTS = DOCS / "results" / "real"
#: the sweep setting whose data, sizes and batches each task's curve uses
TASK_SETTINGS = {"colin27": "colin27", "macaque": "macaque", "embedded2d": "2d", "embedded3d": "3d_patch"}


class ClassDiceCurve:
    """Evaluator handler: after each validation run, the mean Dice of each class (NaN-free cases)."""

    def __init__(self, class_names: list[str], metric: str = "val_mean_dice") -> None:
        self.class_names = class_names
        self.metric = metric
        self.points: list[dict] = []
        self.start = time.perf_counter()

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        details = engine.state.metric_details[self.metric].float().cpu()
        dice = {}
        for c, name in enumerate(self.class_names):
            values = [float(v) for v in details[:, c] if not math.isnan(float(v))]
            dice[name] = round(sum(values) / len(values), 4) if values else None
        self.points.append({"epoch": engine.state.epoch, "dice": dice, "seconds": time.perf_counter() - self.start})
        print(f"epoch {engine.state.epoch}: " + ", ".join(f"{k} {v}" for k, v in dice.items()), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="colin27", choices=("colin27", "macaque", "embedded2d", "embedded3d"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="default: pretrain_batch_size of train.json")
    parser.add_argument("--iterations-per-epoch", type=int, default=None, help="default: train.json's")
    parser.add_argument("--shape", type=int, nargs="+", default=None, help="phantom size (embedded tasks)")
    parser.add_argument("--roi", type=int, nargs="+", default=None, help="roi_size (default: the task's)")
    parser.add_argument("--setting", default=None, help="sweep setting (default: the task's, see TASK_SETTINGS)")
    parser.add_argument("--val-interval", type=int, default=1, help="epochs between validations")
    parser.add_argument("--work", type=Path, default=ROOT / "research" / "work" / "learning_curve")
    args = parser.parse_args(argv)

    from monai.bundle import ConfigParser, run

    from research.bench.sweep import SETTINGS
    from research.data.real_brain import prepare

    work = args.work / args.task / f"seed{args.seed}"
    if (work / "models").exists():
        raise SystemExit(f"error: {work / 'models'} exists; remove it to measure the curve again")
    spec = SETTINGS[args.setting or TASK_SETTINGS[args.task]]
    configs = [str(CONFIGS / name) for name in ("train.json", *spec.get("configs", []))]
    if args.task.startswith("embedded"):  # the bundle's own phantoms, every training case labelled
        from custom.data.phantoms import ensure_dataset

        generator = {**spec.get("data", {}), **({"shape": args.shape} if args.shape else {})}
        data = args.work / args.task / "data"
        datalist = Path(ensure_dataset(data, spatial_dims=int(args.task[-2]), labelled_fraction=1.0, **generator))
    else:
        datalist = prepare(args.work / args.task / "data", args.task, labelled_fraction=1.0)
    names = ConfigParser.load_config_file(datalist)["labels"]
    class_names = [names[str(v)] for v in range(1, len(names))]
    train = ConfigParser.load_config_file(str(CONFIGS / "train.json"))
    handlers = train["validate"]["handlers"]
    curve = ClassDiceCurve(class_names)
    setting = spec["bundle"]
    schedule = {
        "pretrain_batch_size": args.batch_size or setting.get("pretrain_batch_size", train["pretrain_batch_size"]),
        "iterations_per_epoch": args.iterations_per_epoch or train["iterations_per_epoch"],
    }
    overrides = {
        "bundle_root": str(work),
        "config_dir": str(CONFIGS),
        "use_embedded_data": False,
        "datalist": str(datalist),
        "seed": args.seed,
        "distillation": "none",
        "pretrain_epochs": args.epochs,
        "val_interval": args.val_interval,
        "validate#key_metric#val_mean_dice#save_details": True,
        "validate#handlers": [*handlers, curve],
        **setting,
        **schedule,
        **({"roi_size": args.roi} if args.roi else {}),
    }
    start = time.perf_counter()
    run("pretrain", config_file=[*configs, str(CONFIGS / "pretrain.json")], **overrides)
    result = {
        "command": "python -m research.bench.learning_curve " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": commit(),
        "task": args.task,
        "setting": args.setting or TASK_SETTINGS[args.task],
        "training": "supervised only (stage 1 without distillation), every training case labelled",
        "iterations_per_epoch": schedule["iterations_per_epoch"],
        "batch_size": schedule["pretrain_batch_size"],
        "configs": [Path(c).name for c in configs],
        "bundle_overrides": {
            **setting,
            **({"roi_size": args.roi} if args.roi else {}),
            **({"shape": args.shape} if args.shape else {}),
        },
        "seconds": round(time.perf_counter() - start, 1),
        "validation": [{**p, "seconds": round(p["seconds"], 1)} for p in curve.points],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"learning_curve_{args.task}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
