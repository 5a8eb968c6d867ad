"""Speed and memory, from one run on one machine: stage 2 training step time (supervised only, Mean
Teacher, UnCoL with and without the generalized teacher's encoder cache) and inference throughput of
the student via sliding window vs MONAI's ``UNet`` and ``UNETR`` of similar parameter count.

    python -m research.bench.speed [--part train|inference|all] [--steps 10]
    python -m research.bench.speed --part inference --dims 3 --volume 256 256 128 \\
        --out research/results/speed_inference_256.txt

Training: embedded 2D phantoms (128x128), the default 2D student, batches of 2 labelled + 2
unlabelled ("supervised" is the labelled half alone). "Cache" is what the bundle does: the
unlabelled weak view is the un-augmented image, so after the first visit the teacher's encoder output
is read from disk. "Prompts changed" is the worst case (the EMA teacher's boxes move on every visit,
so the mask decoder runs every step); "prompts same" the best (the stored output is reused). A real
run lies between: its ``generalized_reused`` statistic says where.

Inference: ``SlidingWindowInferer`` (overlap 0.25, Gaussian blending) over 16 2D images of 256x256
(window 128x128) and over one 3D volume of 160x160x96 (``--volume``; window 96x96x64), after one
warm-up pass. ``--out`` also writes what is printed to a file, headed by the command and the commit.

Every setting runs in its own process so its peak memory (max RSS on CPU, max allocated on CUDA) is
its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]

TRAIN_SETTINGS = {
    "supervised": {"teachers": None, "cache": False, "reuse": False},
    "mean teacher": {"teachers": "specialized", "cache": False, "reuse": False},
    "uncol, cache, prompts changed": {"teachers": "both", "cache": True, "reuse": False},
    "uncol, cache, prompts same": {"teachers": "both", "cache": True, "reuse": True},
    "uncol, no cache": {"teachers": "both", "cache": False, "reuse": False},
}
INFER_SETTINGS = {
    f"{dims}d {name}": {"dims": dims, "model": name} for dims in (2, 3) for name in ("student", "unet", "unetr")
}


def _peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_seconds(fn, steps: int, device) -> float:
    """Median wall time of ``fn()`` over ``steps`` calls (synchronising CUDA around each)."""
    import torch

    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_train_setting(name: str, steps: int) -> dict:
    import numpy as np
    import torch
    from monai.losses import DiceCELoss

    from custom.data.phantoms import PhantomConfig, make_case
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss
    from custom.networks.student import UnCoLStudent
    from custom.teachers.generalized import GeneralizedTeacher

    setting = TRAIN_SETTINGS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = PhantomConfig().resolved()
    cases = [make_case(cfg, np.random.default_rng([0, i])) for i in range(4)]
    images = torch.stack([torch.from_numpy(c[0])[None] for c in cases]).to(device)
    labels = torch.stack([torch.from_numpy(c[1].astype(np.int64))[None] for c in cases]).to(device)
    batch = {
        "labelled": {"image": images[:2], "label": labels[:2]},
        "unlabelled": {"image": images[2:], "image_strong": images[2:] * 1.1},
    }
    student = UnCoLStudent(spatial_dims=2).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), 5e-4)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    with tempfile.TemporaryDirectory() as cache_dir:
        if setting["teachers"] is None:

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                loss_function(student(images[:2]), labels[:2]).backward()
                optimizer.step()

        else:
            ema = UnCoLStudent(spatial_dims=2).to(device).requires_grad_(False)
            teacher = None
            if setting["teachers"] == "both":
                teacher = GeneralizedTeacher("litemedsam", cache_dir=cache_dir if setting["cache"] else None)
                teacher = teacher.to(device)
            iteration = SemiSupervisedIteration(
                EntropyGate(setting["teachers"]), PseudoLabelLoss(), ema, teacher, reuse_generalized=setting["reuse"]
            )

            class Engine(SimpleNamespace):
                def fire_event(self, event) -> None:
                    pass

            engine = Engine(
                network=student,
                optimizer=optimizer,
                amp=False,
                non_blocking=False,
                loss_function=loss_function,
                prepare_batch=lambda b, d, nb: (b["image"], b["label"]),
                state=SimpleNamespace(device=device, gate_threshold=0.9, unsup_weight=1.0),
            )

            def step() -> None:
                iteration(engine, batch)

        step()  # warm-up (and the cache's first visit)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = median_seconds(step, steps, device)
    return {"seconds": seconds, "peak_mib": _peak_mib(device), "device": str(device)}


def build_network(dims: int, model: str):
    """The student and MONAI baselines of similar size (parameter counts printed by the bench)."""
    from monai.networks.nets import UNETR, UNet

    from custom.networks.student import UnCoLStudent

    roi = (128, 128) if dims == 2 else (96, 96, 64)
    if model == "student":
        return UnCoLStudent(spatial_dims=dims), roi
    if model == "unet":
        channels = (20, 40, 80, 160, 320) if dims == 2 else (16, 32, 64, 128, 256)
        return UNet(dims, 1, 3, channels, (2, 2, 2, 2), num_res_units=2), roi
    hidden = 108 if dims == 2 else 120
    return UNETR(
        1, 3, roi, feature_size=16, hidden_size=hidden, mlp_dim=4 * hidden, num_heads=3, spatial_dims=dims
    ), roi


def run_infer_setting(name: str, steps: int, volume: tuple[int, int, int] = (160, 160, 96)) -> dict:
    import torch
    from monai.inferers import SlidingWindowInferer

    setting = INFER_SETTINGS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    network, roi = build_network(setting["dims"], setting["model"])
    network = network.to(device).eval()
    params = sum(p.numel() for p in network.parameters())
    data = torch.randn(16, 1, 256, 256) if setting["dims"] == 2 else torch.randn(1, 1, *volume)
    data = data.to(device)
    inferer = SlidingWindowInferer(roi, sw_batch_size=4, overlap=0.25, mode="gaussian")

    def infer() -> None:
        with torch.inference_mode():
            inferer(data, network)

    infer()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(infer, max(1, steps // 3), device)
    items = len(data)
    return {
        "seconds": seconds,
        "per_second": items / seconds,
        "params": params,
        "peak_mib": _peak_mib(device),
        "device": str(device),
    }


def _in_subprocess(kind: str, name: str, steps: int, extra: list[str] = ()) -> dict:
    out = subprocess.run(
        [sys.executable, "-W", "ignore", __file__, f"--{kind}-setting", name, "--steps", str(steps), *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("train", "inference", "all"), default="all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=[2, 3], help="inference: 2D, 3D or both")
    parser.add_argument("--volume", type=int, nargs=3, default=[160, 160, 96], help="inference: the 3D volume's shape")
    parser.add_argument("--out", default=None, help="also write the printed figures here")
    parser.add_argument("--train-setting", choices=list(TRAIN_SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--inference-setting", choices=list(INFER_SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_setting:
        print(json.dumps(run_train_setting(args.train_setting, args.steps)))
        return
    if args.inference_setting:
        print(json.dumps(run_infer_setting(args.inference_setting, args.steps, tuple(args.volume))))
        return
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    memory = None
    if args.part in ("train", "all"):
        results = {name: _in_subprocess("train", name, args.steps) for name in TRAIN_SETTINGS}
        base = results["mean teacher"]["seconds"]
        device = results["mean teacher"]["device"]
        memory = "peak GPU allocated" if device.startswith("cuda") else "peak RSS"
        say(f"stage 2 training step, 2 labelled + 2 unlabelled 128x128, median of {args.steps}, device {device}")
        for name, r in results.items():
            say(
                f"  {name:<30} {r['seconds'] * 1000:8.1f} ms  ({r['seconds'] / base:4.2f}x Mean Teacher)  "
                f"{memory} {r['peak_mib']:.0f} MiB"
            )
    if args.part in ("inference", "all"):
        extra = ["--volume", *map(str, args.volume)]
        names = [n for n, s in INFER_SETTINGS.items() if s["dims"] in args.dims]
        results = {name: _in_subprocess("inference", name, args.steps, extra) for name in names}
        device = next(iter(results.values()))["device"]
        memory = "peak GPU allocated" if device.startswith("cuda") else "peak RSS"
        volume = "x".join(map(str, args.volume))
        what = {2: "16 images 256x256 (2D, window 128x128)", 3: f"one {volume} volume (3D, window 96x96x64)"}
        say(f"sliding-window inference, device {device}: " + " / ".join(what[d] for d in sorted(set(args.dims))))
        for name, r in results.items():
            dims = name.split()[0]
            base = results[f"{dims} student"]["seconds"]
            unit = "images/s" if dims == "2d" else "volumes/s"
            say(
                f"  {name:<14} {r['params'] / 1e6:5.2f} M params  {r['seconds'] * 1000:8.1f} ms  "
                f"{r['per_second']:7.2f} {unit}  ({r['seconds'] / base:4.2f}x student)  "
                f"{memory} {r['peak_mib']:.0f} MiB"
            )

    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        command = " ".join(["python -m research.bench.speed", *sys.argv[1:]])
        state = commit.stdout.strip() + ("-dirty" if dirty.strip() else "")
        header = f"# {command}, commit {state}, {os.cpu_count()} CPU cores"
        Path(args.out).write_text("\n".join([header, *lines]) + "\n")


if __name__ == "__main__":
    main()
