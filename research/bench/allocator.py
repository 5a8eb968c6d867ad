"""Freed CPU memory kept in the process (custom/allocator.py) against glibc's defaults, and the mask
decoder's in-place softmax over the prompt tokens against ATen's (issue 37).

malloc's settings belong to a process and stay, so every measurement runs in a process of its own,
the two settings in turn (``--pairs`` times): default, then ``keep_freed_memory()``. Each process
times one workload after two warm-up calls, median of the clocked ones, and counts the minor page
faults per call (``getrusage``: pages the kernel had to zero-fill on first touch):

- ``train_2d`` / ``train_3d``: the student's training step (forward, Dice + CE, backward, AdamW) on the
  sweep's stage-1 batch (6 x 128x128; 2 x 64x64x32), as ``step_options`` times it;
- ``inference_2d`` / ``inference_3d``: one sliding-window batch (4 windows of the inference roi);
- ``teacher_decode``: LiteMedSAM's mask decoder for 8 prompts on one 64x64 embedding (stage 2's
  generalized teacher, most of an UnCoL stage-2 step in 3D).

The softmax: ``torch.softmax(x, -1)`` against ``custom.teachers.mask_decoder.softmax_few`` on the
scores of one image-to-token attention for 8 prompts (``8 x 4096 x 8 heads x 7 tokens``), in turn in this
process, ``--pairs`` times (median of 5 calls each).

Writes research/results/allocator.json and research/results.md's ``allocator`` section. Nothing else may
run meanwhile.

    python -m research.bench.allocator [--pairs 5]
    python -m research.bench.allocator --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from research.bench.report import replace_section
from research.bench.sweep import ROOT, commit

RESULT = ROOT / "research" / "results" / "allocator.json"
SECTION = "allocator"
WORKLOADS = ("train_2d", "train_3d", "inference_2d", "inference_3d", "teacher_decode")
SETTINGS = ("default", "kept")
CLOCKED = {"train_2d": 8, "train_3d": 5, "inference_2d": 8, "inference_3d": 5, "teacher_decode": 5}


def workload(name: str) -> Callable[[], None]:
    """One call of the workload ``name`` (built here, timed by :func:`clock`)."""
    if name == "teacher_decode":
        from custom.teachers.generalized import GeneralizedTeacher
        from custom.teachers.mask_decoder import decode_masks

        teacher = GeneralizedTeacher(num_classes=3)
        decoder, prompts = teacher.model.mask_decoder, 8
        g = torch.Generator().manual_seed(0)
        embedding = torch.randn(1, 256, 64, 64, generator=g)
        pe = teacher.model.prompt_encoder.get_dense_pe()
        sparse, dense = torch.randn(prompts, 2, 256, generator=g), torch.randn(1, 256, 64, 64, generator=g)
        index = torch.zeros(prompts, dtype=torch.long)

        def decode() -> None:
            with torch.inference_mode():
                decode_masks(decoder, embedding, pe, sparse, dense, index)

        return decode
    from monai.losses import DiceCELoss

    from custom.networks.student import UnCoLStudent
    from research.bench.inference_speed import STUDENT
    from research.bench.step_options import batch

    kind, dims = name.split("_")
    network = UnCoLStudent(spatial_dims=int(dims[0]), **STUDENT)
    x, y, windows = batch(int(dims[0]))
    if kind == "inference":
        network.eval()

        def infer() -> None:
            with torch.inference_mode():
                network(windows)

        return infer
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def train() -> None:
        optimizer.zero_grad()
        loss(network(x), y).backward()
        optimizer.step()

    return train


def clock(name: str, kept: bool) -> dict:
    """In this process: set malloc's thresholds if ``kept``, then time ``name``."""
    from custom.allocator import keep_freed_memory

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if kept and not keep_freed_memory():
        raise SystemExit("malloc's thresholds could not be set (not glibc?)")
    call = workload(name)
    for _ in range(2):
        call()
    times, faults = [], []
    for _ in range(CLOCKED[name]):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"ms": round(statistics.median(times), 1), "page_faults": int(statistics.median(faults))}


def run_worker(name: str, setting: str) -> dict:
    """:func:`clock` in a new process."""
    command = [sys.executable, "-m", "research.bench.allocator", "--worker", name, setting]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def softmax_pairs(pairs: int) -> dict[str, list[float]]:
    """Milliseconds (median of 5 calls) of ATen's softmax and ``softmax_few`` on the same scores, in turn."""
    from custom.teachers.mask_decoder import softmax_few

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    scores = torch.randn(8, 4096, 8, 7, generator=torch.Generator().manual_seed(0))
    kernels = {"aten": lambda: torch.softmax(scores, -1), "softmax_few": lambda: softmax_few(scores.clone())}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    with torch.inference_mode():
        for _ in range(pairs):
            for name, kernel in kernels.items():
                kernel()
                calls = []
                for _ in range(5):
                    start = time.perf_counter()
                    kernel()
                    calls.append(1000 * (time.perf_counter() - start))
                times[name].append(round(statistics.median(calls), 2))
    return times


def measure(pairs: int) -> dict:
    rows = {}
    for name in WORKLOADS:
        rows[name] = {setting: [] for setting in SETTINGS}
        for _ in range(pairs):
            for setting in SETTINGS:
                rows[name][setting].append(run_worker(name, setting))
            print(name, {s: rows[name][s][-1] for s in SETTINGS}, flush=True)
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    return {"commit": commit(), "threads": threads, "pairs": pairs, "rows": rows, "softmax": softmax_pairs(pairs)}


def table(payload: dict) -> str:
    lines = [
        "| workload | default ms (median) | kept ms (median) | kept / default: median [min, max] over pairs "
        "| minor page faults a call, default / kept |",
        "|---|---|---|---|---|",
    ]
    for name, runs in payload["rows"].items():
        default, kept = runs["default"], runs["kept"]
        ratios = sorted(k["ms"] / d["ms"] for d, k in zip(default, kept, strict=True))
        ms = {s: statistics.median(r["ms"] for r in runs[s]) for s in SETTINGS}
        faults = {s: int(statistics.median(r["page_faults"] for r in runs[s])) for s in SETTINGS}
        lines.append(
            f"| {name} | {ms['default']:.1f} | {ms['kept']:.1f} | {statistics.median(ratios):.2f} "
            f"[{ratios[0]:.2f}, {ratios[-1]:.2f}] | {faults['default']:,} / {faults['kept']:,} |"
        )
    lines += [
        "",
        f"Commit {payload['commit']}, {payload['threads']} torch threads, {payload['pairs']} pairs (a process with "
        "glibc's default malloc settings, then one that first calls `custom.allocator.keep_freed_memory()`); each "
        "process: two warm-up calls, then the median of the clocked ones and of their minor page faults. "
        "Command: `python -m research.bench.allocator`.",
    ]
    softmax = payload.get("softmax")
    if softmax:
        ratios = sorted(f / a for a, f in zip(softmax["aten"], softmax["softmax_few"], strict=True))
        aten, few = statistics.median(softmax["aten"]), statistics.median(softmax["softmax_few"])
        lines += [
            "",
            f"The mask decoder's softmax over the 7 prompt tokens (8 prompts x 4096 image tokens x 8 heads), same "
            f"process, {len(ratios)} pairs: ATen's `torch.softmax` {aten:.1f} ms, `softmax_few` {few:.1f} ms "
            f"(median ratio {statistics.median(ratios):.2f} [{ratios[0]:.2f}, {ratios[-1]:.2f}]); "
            "two per decoder call.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the JSON")
    parser.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        name, setting = args.worker
        print(json.dumps(clock(name, setting == "kept")))
        return
    if not args.report_only:
        RESULT.write_text(json.dumps(measure(args.pairs), indent=1) + "\n")
    text = table(json.loads(RESULT.read_text()))
    replace_section(ROOT / "research" / "results.md", SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
