"""How far stage 1's cached teacher targets are from the teacher's targets on the augmented image.

    python -m research.bench.target_equivariance [--task colin27] [--cases 4]

Stage 1 computes the generalized teacher's distillation targets once per un-augmented image and flips
/ rotates them with the image (``distillation_targets=cached``). That is exact only if the teacher is
equivariant to those flips. This measures, per target map and augmentation, the cosine similarity
and the relative L2 error between the flipped cached targets and the targets recomputed on the
flipped image (what ``distillation_targets=per_view`` trains on), on labelled real-anatomy slices.
Writes ``research/results/target_equivariance.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from research.bench.sweep import commit

ROOT = Path(__file__).resolve().parents[2]


AUGMENTATIONS = {
    "flip axis 0": lambda x: x.flip(2),
    "flip axis 1": lambda x: x.flip(3),
    "rotate 180": lambda x: torch.rot90(x, 2, (2, 3)),
}


def main(argv: list[str] | None = None) -> None:
    import nibabel as nib

    from custom.teachers.generalized import GeneralizedTeacher
    from custom.teachers.targets import VALID_KEY, distillation_targets
    from research.data.real_brain import prepare

    args_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args_.add_argument("--task", choices=("colin27", "macaque"), default="colin27")
    args_.add_argument("--cases", type=int, default=4)
    args_.add_argument("--work", default=str(ROOT / "research" / "work" / "target_equivariance"))
    args_.add_argument("--out", default=str(ROOT / "research" / "results" / "target_equivariance.json"))
    args = args_.parse_args(argv)
    datalist = prepare(Path(args.work) / args.task, args.task, labelled_fraction=1.0)
    cases = json.loads(datalist.read_text())["training"][: args.cases]
    teacher = GeneralizedTeacher("litemedsam", num_classes=4)
    scores: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        image, label = (
            torch.as_tensor(nib.load(datalist.parent / case[key]).get_fdata(), dtype=torch.float32)
            for key in ("image", "label")
        )
        label = label.long()
        pad = [0, (-image.shape[1]) % 16, 0, (-image.shape[0]) % 16]
        image, label = F.pad(image, pad)[None, None], F.pad(label, pad)[None, None]
        image = (image - image.mean()) / image.std()
        grid = [n // 16 for n in image.shape[2:]]
        cached = distillation_targets(teacher(image, labels=label), grid)
        for name, op in AUGMENTATIONS.items():
            exact = distillation_targets(teacher(op(image), labels=op(label)), grid)
            for key, value in cached.items():
                if key == VALID_KEY:
                    continue
                a, b = op(value).flatten(), exact[key].flatten()
                entry = scores.setdefault(f"{name} / {key}", {"cosine": [], "relative_error": []})
                entry["cosine"].append(float(F.cosine_similarity(a, b, 0)))
                entry["relative_error"].append(float((a - b).norm() / b.norm()))
    summary = {k: {m: round(statistics.fmean(v), 4) for m, v in e.items()} for k, e in scores.items()}
    record = {
        "command": f"python -m research.bench.target_equivariance --task {args.task} --cases {args.cases}",
        "commit": commit(),
        "task": args.task,
        "cases": [c["image"] for c in cases],
        "mean_over_cases": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    for k, v in summary.items():
        print(f"{k:<28} cosine {v['cosine']:.3f}  relative error {v['relative_error']:.3f}")


if __name__ == "__main__":
    main()
