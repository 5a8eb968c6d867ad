"""Stage 1 step time: supervised only vs distillation without and with the teacher-output cache.

    python -m research.bench.stage1_speed [--steps 10] [--batch 6]

One run, same data (embedded 2D phantoms, 128x128), same student and batch. "No cache" runs the
generalized teacher (encoder and decoder) on every batch; "cache" reads targets that the teacher
computed once per un-augmented image (what bundle/configs/pretrain.json does).
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import torch
from monai.losses import DiceCELoss

from custom.data.phantoms import PhantomConfig, make_case
from custom.engines.uncol import DistillationIteration
from custom.losses.distillation import SemanticDistillationLoss, VisualDistillationLoss
from custom.networks.student import UnCoLStudent
from custom.teachers.generalized import GeneralizedTeacher
from custom.teachers.targets import distillation_targets
from research.bench.speed import median_seconds


class _Engine(SimpleNamespace):
    """The few engine attributes an iteration uses, without Ignite's event machinery."""

    def fire_event(self, event) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=6)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = PhantomConfig().resolved()
    cases = [make_case(cfg, np.random.default_rng([0, i])) for i in range(args.batch)]
    images = torch.stack([torch.from_numpy(c[0])[None] for c in cases]).to(device)
    labels = torch.stack([torch.from_numpy(c[1].astype(np.int64))[None] for c in cases]).to(device)
    teacher = GeneralizedTeacher("litemedsam").to(device)
    cached = distillation_targets(teacher(images, labels=labels), [8, 8])
    batch_cached = {"image": images, "label": labels, **{f"teacher_{k}": v for k, v in cached.items()}}

    def make(mode: str):
        student = UnCoLStudent(spatial_dims=2).to(device)
        visual = semantic = None
        if mode != "supervised":
            pairs = dict(zip(["layer1", "layer2", "layer3"], teacher.feature_names, strict=True))
            visual = VisualDistillationLoss(2, 192, pairs, teacher.feature_channels).to(device)
            semantic = SemanticDistillationLoss(192, num_classes=2).to(device)
        it = DistillationIteration(visual, semantic, teacher=teacher if mode == "distill, no cache" else None)
        params = list(student.parameters()) + list(it.modules.parameters())
        engine = _Engine(
            network=student,
            optimizer=torch.optim.AdamW(params, 1e-3),
            amp=False,
            non_blocking=False,
            loss_function=DiceCELoss(to_onehot_y=True, softmax=True, include_background=False),
            prepare_batch=lambda b, d, nb: (b["image"], b["label"]),
            state=SimpleNamespace(device=device),
        )
        batch = batch_cached if mode == "distill, cache" else {"image": images, "label": labels}
        return lambda: it(engine, batch)

    results = {}
    for mode in ("supervised", "distill, no cache", "distill, cache"):
        step = make(mode)
        step()  # warm-up
        results[mode] = median_seconds(step, args.steps, device)
    base = results["supervised"]
    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch} x 128x128, {args.steps} steps each")
    for mode, t in results.items():
        print(f"stage 1 step, {mode:<18}: {t * 1000:8.1f} ms  ({t / base:5.2f}x supervised)")
    print(f"cache speed-up of the distillation step: {results['distill, no cache'] / results['distill, cache']:.1f}x")


if __name__ == "__main__":
    main()
