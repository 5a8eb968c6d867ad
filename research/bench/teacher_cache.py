"""Teacher cache bytes per slice (format 1 vs what each stage stores now) and encoder warm-up time.

    python -m research.bench.teacher_cache [--out research/results/teacher_cache.json] [--threads 2]

Format 1 stored every encoder output of a slice (the embedding and the visual path's features, float16)
for both stages. Now stage 2 stores the embedding only (all the mask decoder reads) and stage 1 its
distillation targets already pooled to the student's token grid (features and per-class fusion
features, float16). Measured on real files written by the real caches: a 2D slice of Colin27's
181 x 217 grid (padded to the student's grid) and a 160 x 160 x 32 volume sliced along z (the
targets' bytes per slice do not depend on the slice count). The JSON also holds the formula's
constants, so a user can size the cache for their dataset (bundle/docs/README.md, "Teacher cache").
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from custom.teachers.cache import EncoderCache
from custom.teachers.generalized import GeneralizedTeacher
from custom.teachers.targets import TeacherTargetsd
from research.bench.sweep import commit

ROOT = Path(__file__).resolve().parents[2]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.pt"))


def blobs_label(shape: tuple[int, ...], num_classes: int) -> torch.Tensor:
    """A label with one box-shaped structure per foreground class (prompts for every class)."""
    label = torch.zeros(1, *shape, dtype=torch.long)
    for c in range(1, num_classes):
        box = tuple(slice(int(s * (0.1 + 0.2 * (c - 1))), int(s * (0.25 + 0.2 * (c - 1)))) for s in shape)
        label[(0, *box)] = c
    return label


def format1_bytes_per_slice(teacher: GeneralizedTeacher, image: torch.Tensor, folder: Path) -> int:
    """What format 1 stored per slice: every encoder output, float16, one file."""
    entry = teacher._encode_uncached(image[None])[0]
    EncoderCache(folder, "format1").put("slice", entry)
    return folder_bytes(folder / "format1")


def stage1_bytes_per_slice(shape: tuple[int, ...], num_classes: int, folder: Path) -> tuple[int, float]:
    """Bytes per slice of stage 1's cached targets of one image / volume, and the seconds it took."""
    teacher = GeneralizedTeacher(num_classes=num_classes, cache_dir=folder)
    transform = TeacherTargetsd(teacher)
    image = torch.randn(1, *shape)
    start = time.perf_counter()
    transform({"image": image, "label": blobs_label(shape, num_classes)})
    seconds = time.perf_counter() - start
    slices = shape[teacher.slice_axis] if len(shape) == 3 else 1
    return folder_bytes(transform.cache.root) // slices, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "research" / "results" / "teacher_cache.json"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--num-classes", type=int, default=4, help="classes incl. background (Colin27: 4)")
    parser.add_argument("--encoder-repeats", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape_2d, shape_3d = (192, 224), (160, 160, 32)  # Colin27's 181 x 217 padded to the token grid
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = GeneralizedTeacher(num_classes=args.num_classes, cache_dir=tmp / "stage2")
        image = torch.randn(1, *shape_2d)
        before = format1_bytes_per_slice(teacher, image, tmp / "format1")
        teacher.encode(image[None], features=False)
        stage2 = folder_bytes(teacher.cache.root)
        stage1_2d, _ = stage1_bytes_per_slice(shape_2d, args.num_classes, tmp / "stage1_2d")
        stage1_3d, seconds_3d = stage1_bytes_per_slice(shape_3d, args.num_classes, tmp / "stage1_3d")
        batch = torch.randn(args.encoder_repeats, 1, *shape_2d)
        start = time.perf_counter()
        teacher._encode_uncached(batch, features=False)
        encoder_seconds = (time.perf_counter() - start) / len(batch)
        start = time.perf_counter()
        teacher.encode(batch[:1] + 1.0, features=False)  # one miss: encode, round, write
        miss_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.encoder_repeats):
            teacher.encode(batch[:1] + 1.0, features=False)
        hit_seconds = (time.perf_counter() - start) / args.encoder_repeats
    channels = teacher.feature_channels
    result = {
        "command": "python -m research.bench.teacher_cache",
        "commit": commit(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, no GPU",
        "teacher": "litemedsam",
        "num_classes": args.num_classes,
        "feature_channels": channels,
        "bytes_per_slice": {
            "format1_every_encoder_output": before,
            "stage2_embedding": stage2,
            "stage1_targets_2d_192x224": stage1_2d,
            "stage1_targets_3d_160x160x32_per_slice": stage1_3d,
        },
        "stage2_fraction_of_format1": round(stage2 / before, 3),
        "seconds": {
            "encoder_per_slice": round(encoder_seconds, 3),
            "cache_miss_per_slice": round(miss_seconds, 3),
            "cache_hit_per_slice": round(hit_seconds, 4),
            "stage1_targets_3d_160x160x32_volume": round(seconds_3d, 1),
        },
        "formula": {
            "stage2_bytes": "distinct unlabelled slices x stage2_embedding bytes (a 3D volume: xy tiles x slices)",
            "stage1_bytes": "labelled images x token cells x (sum of feature channels + classes x 256) x 2 bytes",
            "warm_up_seconds": "distinct slices x encoder_per_slice (this machine's CPU)",
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
