"""Zero-shot Dice of the generalized teacher prompted with ground-truth boxes on a datalist split.

    python -m research.bench.teacher_zero_shot [--split test] [--box-jitter 0.0] \
        [--teacher_model ... --teacher_checkpoint ...]
    python -m research.bench.teacher_zero_shot --datalist bundle/data/real/colin27/datalist.json \
        --out research/results/real/zero_shot_colin27.json      # a user's (or the real-anatomy) datalist

The teacher is built from the bundle's own ``teacher_def`` (bundle/configs/train.json), so the
config keys that select the model are the ones exercised. Prints Dice per class and writes
``<bundle_root>/eval/teacher_zero_shot.json``. The starting point the student improves on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

from custom.data.datalist import bundle_datalist
from custom.data.phantoms import ensure_dataset

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "bundle/configs/train.json"))
    parser.add_argument("--bundle_root", default=str(ROOT / "bundle"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--box-jitter", type=float, default=0.0)
    parser.add_argument("--teacher_model", default=None)
    parser.add_argument("--teacher_checkpoint", default=None)
    parser.add_argument("--datalist", default=None, help="a datalist instead of the embedded phantoms")
    parser.add_argument("--box-mode", default="class", choices=("class", "component"), help="box per class / component")
    parser.add_argument("--out", default=None, help="JSON to write (default <bundle_root>/eval/teacher_zero_shot.json)")
    args = parser.parse_args()

    config = ConfigParser()
    config.read_config(args.config)
    config["bundle_root"] = args.bundle_root
    config["teacher_cache_dir"] = None
    config["teacher_def#box_jitter"] = args.box_jitter
    config["teacher_def#box_mode"] = args.box_mode
    if args.datalist is not None:
        config["use_embedded_data"] = False
        config["datalist"] = str(Path(args.datalist).resolve())
    for key in ("teacher_model", "teacher_checkpoint"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if config.get_parsed_content("use_embedded_data"):
        ensure_dataset(
            config.get_parsed_content("dataset_dir"),
            **{
                k: config.get_parsed_content(f"embedded_data#{k}")
                for k in ("spatial_dims", "labelled_fraction", "seed")
            },
        )
    teacher = config.get_parsed_content("teacher_def")
    class_names = config.get_parsed_content("class_names")
    items = bundle_datalist(
        config.get_parsed_content("datalist"), args.split, num_classes=config.get_parsed_content("num_classes")
    )
    dice = {name: [] for name in class_names}
    start = time.perf_counter()
    for item in items:
        image = torch.from_numpy(np.asanyarray(nib.load(item["image"]).dataobj).astype(np.float32))[None, None]
        label = torch.from_numpy(np.asanyarray(nib.load(item["label"]).dataobj).astype(np.int64))[None, None]
        pred = teacher(image, labels=label, with_fusion=False, with_features=False).probs.argmax(1)[0]
        for c, name in enumerate(class_names, start=1):
            truth = label[0, 0] == c
            if truth.any():  # Dice is undefined where the class is absent (and then the teacher abstains)
                hit = pred == c
                dice[name].append(float(2 * (hit & truth).sum() / (hit.sum() + truth.sum())))
    elapsed = time.perf_counter() - start
    result = {
        "teacher_model": teacher.spec.name,
        "checkpoint": Path(teacher.checkpoint).name,
        "datalist": _relative(config.get_parsed_content("datalist")),
        "split": args.split,
        "prompt": f"ground-truth box per {args.box_mode}, jitter {args.box_jitter}",
        "dice": {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for k, v in dice.items()},
        "seconds": round(elapsed, 1),
    }
    out = Path(args.out) if args.out else Path(args.bundle_root) / "eval" / "teacher_zero_shot.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for name, s in result["dice"].items():
        print(f"{teacher.spec.name} zero-shot Dice {name}: {s['mean']:.3f} ± {s['std']:.3f} (n={s['n']})")
    print(f"{len(items)} images in {elapsed:.1f} s; written to {out}")


def _relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (committed JSON holds no machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return Path(path).name


if __name__ == "__main__":
    main()
