"""One test slice of a real-anatomy task: image, ground truth and each method's segmentation side by side.

    python -m research.bench.real_figure --task colin27 [--seed 0] [--methods supervised uncol]

Reads the students the sweep trained (``python -m research.bench.sweep --task <task>``: its work folder,
``<work>/fraction_<f>/seed<k>/<method>/models/model.pt``), segments the test slice with the most
foreground through the bundle's own validation preprocessing and sliding-window inferer, and writes
``research/results/real/test_slice_<task>.png`` with a JSON beside it (the slice, each method's
Dice per class on it, the commit).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import torch

from research.bench.sweep import LABELS, SETTINGS, commit, setting_overrides

ROOT = Path(__file__).resolve().parents[2]


TRAIN = str(ROOT / "bundle" / "configs" / "train.json")
RESULTS = ROOT / "research" / "results" / "real"


def foreground_window(masks: list[torch.Tensor], margin: float = 0.25) -> tuple[slice, ...]:
    """The box around every panel's foreground, widened by ``margin`` of its size on each side (the
    nuclei fill a small part of a whole brain slice)."""
    union = torch.stack([m > 0 for m in masks]).any(0)
    if not union.any():
        return tuple(slice(None) for _ in union.shape)
    window = []
    for axis, size in enumerate(union.shape):
        other = tuple(a for a in range(union.ndim) if a != axis)
        where = torch.nonzero(union.any(dim=other) if other else union).flatten()
        low, high = int(where.min()), int(where.max()) + 1
        pad = int(margin * (high - low)) + 4
        window.append(slice(max(0, low - pad), min(size, high + pad)))
    return tuple(window)


def dice_per_class(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> list[float | None]:
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        total = int(p.sum() + t.sum())
        out.append(None if total == 0 else round(2 * float((p & t).sum()) / total, 4))
    return out


def main(argv: list[str] | None = None) -> None:
    from monai.bundle import ConfigParser

    from custom.handlers.checkpoints import student_state
    from custom.handlers.previews import class_colours

    args_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args_.add_argument("--task", choices=("colin27", "macaque"), required=True)
    args_.add_argument("--fraction", type=float, default=0.1)
    args_.add_argument("--seed", type=int, default=0)
    args_.add_argument("--methods", nargs="+", default=["supervised", "uncol"])
    args_.add_argument("--work", default=None, help="the sweep's work folder (default: research/work/sweep/<task>)")
    args_.add_argument("--out", default=str(RESULTS))
    args = args_.parse_args(argv)
    work = Path(args.work) if args.work else ROOT / "research" / "work" / "sweep" / args.task
    dataset = work / "data" / f"fraction_{args.fraction:g}"
    overrides = setting_overrides(args.task, args.fraction, args.seed, dataset, work / "teacher_cache")
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"bundle_root": str(work), **overrides, "validate#datalist#key": "test"})
    cases = parser.get_parsed_content("validate#dataset")
    num_classes = parser.get_parsed_content("num_classes")
    names = parser.get_parsed_content("class_names")
    index = max(range(len(cases)), key=lambda i: int((torch.as_tensor(cases[i]["label"]) > 0).sum()))
    case = cases[index]
    image = torch.as_tensor(case["image"])[None].float()
    truth = torch.as_tensor(case["label"])[0].long()
    inferer = parser.get_parsed_content("validate#inferer")
    network = parser.get_parsed_content("network").eval()
    predictions, scores = {}, {}
    for method in args.methods:
        ckpt = work / f"fraction_{args.fraction:g}" / f"seed{args.seed}" / method / "models" / "model.pt"
        if not ckpt.is_file():
            sweep = f"python -m research.bench.sweep --task {args.task}"
            raise SystemExit(f"error: {ckpt}: no trained student (run {sweep} first)")
        network.load_state_dict(student_state(ckpt))  # tensors only: weights_only=True
        with torch.no_grad():
            predictions[method] = inferer(image, network).argmax(1)[0]
        scores[method] = dict(zip(names, dice_per_class(predictions[method], truth, num_classes), strict=True))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colours = ListedColormap([(0, 0, 0, 0), *class_colours(num_classes - 1)])
    panels = [("ground truth", truth)] + [(LABELS[m], predictions[m]) for m in args.methods]
    window = foreground_window([labels for _, labels in panels])
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.4))
    background = image[0, 0][window].T  # RAS voxel grid: show x across, y up
    for ax, (title, labels) in zip(axes, panels, strict=True):
        ax.imshow(background, cmap="gray", origin="lower")
        ax.imshow(labels[window].T, cmap=colours, vmin=0, vmax=num_classes - 1, origin="lower", alpha=0.55)
        method = next((m for m in args.methods if LABELS[m] == title), None)
        title = textwrap.fill(title, 30)
        if method:
            title += "\n" + " / ".join(f"{v:.2f}" if v is not None else "n/a" for v in scores[method].values())
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(
        f"{args.task}: test slice {Path(str(case['image'].meta.get('filename_or_obj', ''))).name} "
        f"({args.fraction:.0%} labels, seed {args.seed}); Dice {' / '.join(names)}",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"test_slice_{args.task}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    record = {
        "command": f"python -m research.bench.real_figure --task {args.task} --methods {' '.join(args.methods)}",
        "commit": commit(),
        "slice": Path(str(case["image"].meta.get("filename_or_obj", ""))).name,
        "fraction": args.fraction,
        "seed": args.seed,
        "dice_on_this_slice": scores,
        "settings": SETTINGS[args.task]["bundle"],
    }
    (out / f"test_slice_{args.task}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
