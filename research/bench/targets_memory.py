"""Peak memory and time of stage 1's teacher targets for one 3D volume, vs its number of slices.

    python -m research.bench.targets_memory [--slices 32 96] [--size 160 160] [--whole 96]
                                   [--out research/results/targets_memory.json]

``TeacherTargetsd`` makes a volume's distillation targets 16 slices (one token of the student's grid)
at a time; ``--whole`` also measures the volume sent through the teacher at once (what it did
before), for the slice counts given. Each measurement runs in a fresh process: the bundle's
generalized teacher (train.json + train_3d.json's ``teacher_def``, LiteMedSAM, no disk cache) on a
random volume with a two-class label (prompts for both classes on every slice). Memory is the
process's resident set (``VmRSS``, sampled every 5 ms) above what it held before the call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from research.bench.patch_memory import PeakRSS, fresh_process, rss_mb
from research.bench.sweep import commit

ROOT = Path(__file__).resolve().parents[2]


CONFIGS = ROOT / "bundle" / "configs"


def one_volume(size: list[int], slices: int, whole: bool) -> dict:
    """Targets of one ``size`` x ``slices`` volume, block by block or (``whole``) all at once."""
    import torch
    from monai.bundle import ConfigParser

    from custom.teachers.targets import TeacherTargetsd, distillation_targets

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "train_3d.json")])
    parser.update({"bundle_root": str(ROOT / "bundle"), "teacher_cache_dir": None, "num_classes": 3})
    teacher = parser.get_parsed_content("teacher_def")
    transform = TeacherTargetsd(teacher, with_fusion=True, disk_cache=False)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, *size, slices, generator=g)
    label = torch.zeros(1, *size, slices, dtype=torch.long)
    h, w = size
    label[:, h // 4 : h // 2, w // 4 : w // 2] = 1
    label[:, h // 2 : 3 * h // 4, w // 2 : 3 * w // 4] = 2
    before = rss_mb()
    start = time.perf_counter()
    with PeakRSS() as peak, torch.no_grad():
        if whole:
            grid = [s // 16 for s in image.shape[1:]]
            out = teacher(image[None], labels=label[None], with_fusion=True)
            maps = {k: v[0] for k, v in distillation_targets(out, grid).items()}
        else:
            maps = transform({"image": image, "label": label})
    seconds = time.perf_counter() - start
    stored = sum(v.numel() * v.element_size() for k, v in maps.items() if k.startswith("teacher_") or whole)
    return {
        "volume": [*size, slices],
        "mode": "whole volume" if whole else "blocks of 16 slices",
        "peak_above_start_mb": round(peak.peak - before),
        "seconds": round(seconds, 1),
        "seconds_per_slice": round(seconds / slices, 2),
        "targets_mb": round(stored / 1e6, 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--size", type=int, nargs=2, default=[160, 160])
    parser.add_argument("--whole", type=int, nargs="*", default=[96], help="slice counts also measured at once")
    parser.add_argument("--out", default=str(ROOT / "research" / "results" / "targets_memory.json"))
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: SLICES MODE
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_volume(args.size, int(args.one[0]), args.one[1] == "whole")))
        return
    runs = []
    plan = [(n, "blocks") for n in args.slices] + [(n, "whole") for n in args.whole]
    for slices, mode in plan:
        cmd = [sys.executable, __file__, "--one", str(slices), mode, "--size", *map(str, args.size)]
        runs.append(fresh_process(cmd, f"{slices} slices ({mode})"))
        print(json.dumps(runs[-1]))
    result = {
        "command": "python -m research.bench.targets_memory " + " ".join(sys.argv[1:]),
        "commit": commit(),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU cores",
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
