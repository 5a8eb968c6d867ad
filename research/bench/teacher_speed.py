"""Generalized-teacher timings on this machine: encoder per image, decoder per prompt, cache miss/hit.

    python -m research.bench.teacher_speed [--threads 2] [--skip-sam] [--out research/results/teacher_speed.txt]

SAM ViT-B is timed with random weights (the official file is not reachable here; the architecture,
and so the time, is the same). Everything runs in float32: never bf16 autocast on a CPU.
"""

from __future__ import annotations

import argparse
import builtins
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from custom.teachers.generalized import GeneralizedTeacher
from custom.teachers.prompts import Prompts

ROOT = Path(__file__).resolve().parents[2]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sam", action="store_true", help="skip SAM ViT-B at 1024 (about 20 s per image)")
    parser.add_argument("--out", default=None, help="also write the printed lines here (with the command and commit)")
    args = parser.parse_args()
    lines: list[str] = []

    def print(line: str) -> None:  # noqa: A001 - the report's lines go to the screen and to --out
        builtins.print(line, flush=True)
        lines.append(line)

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from research.bench.sweep import commit as code_commit

    commit = code_commit()
    print("python -m research.bench.teacher_speed " + " ".join(sys.argv[1:]))
    print(f"commit {commit}, {platform.machine()}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    image = torch.rand(1, 1, 128, 128, device=device)

    teacher = GeneralizedTeacher("litemedsam").to(device)
    teacher.encode(image)  # warm-up
    enc = timed(lambda: teacher._encode_uncached(image), args.repeats)
    print(f"LiteMedSAM encoder (256x256 input): {enc:.3f} s per image")
    emb = teacher.encode(image)["embedding"]
    for n in (1, 2):
        boxes = torch.tensor([[[20.0, 20.0, 90.0, 100.0], [40.0, 40.0, 60.0, 70.0]]], device=device)[:, :n]
        prompts = Prompts(torch.ones(1, n, dtype=torch.bool, device=device), boxes=boxes)
        dec = timed(lambda p=prompts: teacher.decode(emb, p, (128, 128)), args.repeats * 3)
        print(
            f"mask decoder, {n} prompt(s) on one image (incl. fusion features, upsampling): {dec * 1000:.1f} ms "
            f"({dec / n * 1000:.1f} ms per prompt)"
        )

    with tempfile.TemporaryDirectory() as tmp:
        cached = GeneralizedTeacher("litemedsam", cache_dir=tmp).to(device)
        images = torch.rand(4, 1, 128, 128, device=device)
        miss = timed(lambda: cached.encode(images, features=False), 1) / len(images)
        hit = timed(lambda: cached.encode(images, features=False), args.repeats) / len(images)
        print(
            f"encoder cache: build (miss) {miss:.3f} s per image, hit {hit * 1000:.1f} ms per image "
            f"({miss / hit:.0f}x faster), {len(cached.cache)} entries"
        )

    if not args.skip_sam:
        from segment_anything import sam_model_registry

        sam = sam_model_registry["vit_b"](checkpoint=None).eval().to(device)
        x = torch.rand(1, 3, 1024, 1024, device=device)
        with torch.inference_mode():
            sam.image_encoder(x)  # warm-up
            t = timed(lambda: sam.image_encoder(x), 1)
        print(f"SAM ViT-B encoder (1024x1024 input, float32): {t:.2f} s per image ({t / enc:.1f}x LiteMedSAM)")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
