"""Stage 2 step time and peak memory: UnCoL (both teachers) vs Mean Teacher (specialized only),
with the generalized teacher's encoder cache on and off.

    python bench/stage2_speed.py [--steps 10]

One run, same data (embedded 2D phantoms, 128x128), same student, batches of 2 labelled + 2
unlabelled. Each setting runs in its own process so its peak memory (max RSS on CPU, max allocated
on CUDA) is its own. "Cache on" is what the bundle does: the unlabelled weak view is the
un-augmented image, so after the first visit the teacher's encoder output is read from disk.
"Prompts changed" is the worst case (the EMA teacher's boxes differ on every visit, so the mask
decoder runs every step); "prompts same" is the best case (the generalized teacher's output is
reused). A real run lies between: its ``generalized_reused`` statistic says where.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "mean teacher": {"teachers": "specialized", "cache": False, "reuse": False},
    "uncol, cache, prompts changed": {"teachers": "both", "cache": True, "reuse": False},
    "uncol, cache, prompts same": {"teachers": "both", "cache": True, "reuse": True},
    "uncol, no cache": {"teachers": "both", "cache": False, "reuse": False},
}


def run_setting(name: str, steps: int) -> dict:
    import numpy as np
    import torch
    from monai.losses import DiceCELoss

    from custom.data.phantoms import PhantomConfig, make_case
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import EntropyGate, PseudoLabelLoss
    from custom.networks.student import UnCoLStudent
    from custom.teachers.generalized import GeneralizedTeacher

    setting = SETTINGS[name]
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
    ema = UnCoLStudent(spatial_dims=2).to(device).requires_grad_(False)
    with tempfile.TemporaryDirectory() as cache_dir:
        teacher = None
        if setting["teachers"] == "both":
            teacher = GeneralizedTeacher("litemedsam", cache_dir=cache_dir if setting["cache"] else None).to(device)
        iteration = SemiSupervisedIteration(
            EntropyGate(setting["teachers"]), PseudoLabelLoss(), ema, teacher, reuse_generalized=setting["reuse"]
        )

        class Engine(SimpleNamespace):
            def fire_event(self, event) -> None:
                pass

        engine = Engine(
            network=student,
            optimizer=torch.optim.AdamW(student.parameters(), 5e-4),
            amp=False,
            non_blocking=False,
            loss_function=DiceCELoss(to_onehot_y=True, softmax=True, include_background=False),
            prepare_batch=lambda b, d, nb: (b["image"], b["label"]),
            state=SimpleNamespace(device=device, gate_threshold=0.9, unsup_weight=1.0),
        )
        iteration(engine, batch)  # warm-up (and the cache's first visit)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            iteration(engine, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": statistics.median(times), "peak_mib": peak, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(run_setting(args.setting, args.steps)))
        return
    results = {}
    for name in SETTINGS:
        out = subprocess.run(
            [sys.executable, "-W", "ignore", __file__, "--setting", name, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["mean teacher"]["seconds"]
    device = results["mean teacher"]["device"]
    print(f"stage 2 step, batch 2 labelled + 2 unlabelled 128x128, {args.steps} steps each, device {device}")
    for name, r in results.items():
        memory = "peak GPU allocated" if device.startswith("cuda") else "peak RSS"
        print(
            f"{name:<18} {r['seconds'] * 1000:8.1f} ms  ({r['seconds'] / base:4.2f}x Mean Teacher)  "
            f"{memory} {r['peak_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
