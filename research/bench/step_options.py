"""Same-math ways to run the student faster, timed against plain eager PyTorch (issue 37).

The student's forward and backward are most of a training step (research/results.md, ``step-profile``),
so this times them alone, for the options that keep the math: ``channels_last`` (the convolutions in
NHWC / NDHWC memory layout, which oneDNN prefers on some CPUs), ``compiled`` (``torch.compile`` of
the whole student, default mode) and ``compiled_parts`` (each of its parts, the transformer blocks and
the decoder's blocks, compiled in place with ``nn.Module.compile``: the state dict keeps its keys, and
``forward_features`` / ``decode``, which the training iterations call, run compiled too). Attention is
MONAI's fused ``scaled_dot_product_attention`` already (``use_flash_attention``). Each option runs
beside eager in turn, ``--pairs`` times:

- a training step (forward, Dice + CE, backward, SGD) on the sweep's stage-1 batch (2D: 6 patches of
  128x128; 3D: 2 patches of 64x64x32);
- a forward in inference mode on one sliding-window batch (4 windows of the inference roi).

It also records what ``torch.compile`` costs before its first step (compile seconds) and the steps it
needs to pay that back, against the steps of one stage of a sweep run (32 epochs of 25 iterations), and
how far each option's outputs and gradients are from eager's on the same batch (within 1e-4 keeps the
math). Compilation starts from an empty inductor cache (a new machine's first run; later runs on the same
machine reuse the cache and compile in seconds). Writes research/results/step_options.json and
research/results.md's ``step-options`` section.

    python -m research.bench.step_options            # both dims, 3 pairs each
    python -m research.bench.step_options --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from functools import partial

import torch
from monai.losses import DiceCELoss

from custom.networks.student import UnCoLStudent
from research.bench.inference_speed import STUDENT
from research.bench.report import replace_section
from research.bench.sweep import ROOT, commit

RESULT = ROOT / "research" / "results" / "step_options.json"
SECTION = "step-options"
#: dims -> (training batch, patch), inference windows a batch and roi
CASES = {2: (6, (128, 128), 4, (128, 128)), 3: (2, (64, 64, 32), 4, (64, 64, 32))}
OPTIONS = ("channels_last", "compiled", "compiled_parts")
#: steps in one stage of a sweep run (32 epochs of 25 iterations): what a compile must pay back within
STAGE_STEPS = 32 * 25


def batch(dims: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    size, patch, windows, roi = CASES[dims]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 1, *patch, generator=g)
    y = torch.randint(0, STUDENT["out_channels"], (size, 1, *patch), generator=g)
    return x, y, torch.randn(windows, 1, *roi, generator=g)


def prepared(option: str, dims: int, state: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(module to train, module to run)`` of one option, with the reference weights ``state``."""
    network = UnCoLStudent(spatial_dims=dims, **STUDENT)
    network.load_state_dict(state)
    if option == "channels_last":
        layout = torch.channels_last if dims == 2 else torch.channels_last_3d
        network = network.to(memory_format=layout)
        return network, network
    if option == "compiled":
        return network, torch.compile(network)
    if option == "compiled_parts":  # each part compiled in place: the state dict keeps its keys
        for part in network.children():
            for module in part if isinstance(part, torch.nn.ModuleList) else [part]:
                module.compile(dynamic=False)
    return network, network


def as_input(option: str, x: torch.Tensor) -> torch.Tensor:
    if option != "channels_last":
        return x
    return x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)


def train_step(network, runner, x, y, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward, loss and backward (SGD step after the gradients are read): logits and gradients."""
    network.zero_grad(set_to_none=True)
    logits = runner(x)
    loss_fn(logits, y).backward()
    grads = {n: p.grad.detach().clone() for n, p in network.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in network.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-1e-6)  # a step too small to change the next timing's numbers
    return logits.detach(), grads


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def inference_ms(runner, windows: torch.Tensor) -> float:
    """Milliseconds of one forward in eval and inference mode (the module goes back to training after)."""
    runner.eval()
    with torch.inference_mode():
        ms = timed(partial(runner, windows))
    runner.train()
    return ms


def measure(dims: int, pairs: int, options: tuple[str, ...] = OPTIONS) -> dict:
    """Eager and each option in turn, ``pairs`` times: ms per training step and per inference batch."""
    torch.manual_seed(0)
    reference = UnCoLStudent(spatial_dims=dims, **STUDENT).state_dict()
    x, y, windows = batch(dims)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    eager, eager_runner = prepared("eager", dims, reference)
    ref_logits, ref_grads = train_step(eager, eager_runner, x, y, loss_fn)
    eager.load_state_dict(reference)
    rows = {}
    for option in options:
        network, runner = prepared(option, dims, reference)
        xi, wi = as_input(option, x), as_input(option, windows)
        start = time.perf_counter()
        logits, grads = train_step(network, runner, xi, y, loss_fn)  # compiles the training graph
        first_train_s = time.perf_counter() - start
        network.load_state_dict(reference)
        first_infer_s = inference_ms(runner, wi) / 1000  # compiles the inference graph
        differences = {
            "logits": float((logits - ref_logits).abs().max()),
            "gradients": max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items()),
        }
        times = {"eager_train": [], "option_train": [], "eager_infer": [], "option_infer": []}
        for _ in range(pairs):
            times["eager_train"].append(timed(partial(train_step, eager, eager_runner, x, y, loss_fn)))
            times["option_train"].append(timed(partial(train_step, network, runner, xi, y, loss_fn)))
            times["eager_infer"].append(inference_ms(eager_runner, windows))
            times["option_infer"].append(inference_ms(runner, wi))
        eager_ms, option_ms = (statistics.median(times[k]) for k in ("eager_train", "option_train"))
        rows[option] = {
            "ms": {k: [round(t, 1) for t in v] for k, v in times.items()},
            "train_ratio": round(option_ms / eager_ms, 2),
            "infer_ratio": round(statistics.median(times["option_infer"]) / statistics.median(times["eager_infer"]), 2),
            "first_call_s": {"train": round(first_train_s, 1), "infer": round(first_infer_s, 1)},
            "max_abs_difference": {k: float(f"{v:.2g}") for k, v in differences.items()},
        }
    return {"dims": dims, "case": list(map(list, (CASES[dims][1], CASES[dims][3]))), "options": rows}


def payback(row: dict) -> str:
    """Steps a compiled student needs to win back its first call, or why it never does."""
    ms = row["ms"]
    saved = statistics.median(ms["eager_train"]) - statistics.median(ms["option_train"])
    extra_ms = 1000 * row["first_call_s"]["train"] - statistics.median(ms["option_train"])
    if saved <= 0:
        return "never (no faster)"
    steps = extra_ms / saved
    return f"{steps:,.0f} steps ({steps / STAGE_STEPS:.1f} stages)"


def table(payload: dict) -> str:
    lines = [
        "| case | option | train step ms, eager / option (median) | option / eager, train | inference batch ms, "
        "eager / option | option / eager, inference | first call s (train, inference) | pays back its first call "
        "after | max abs difference from eager (logits, gradients) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        size, patch, windows, roi = CASES[row["dims"]]
        case = f"{row['dims']}D, {size} x {'x'.join(map(str, patch))} / {windows} x {'x'.join(map(str, roi))}"
        for option, r in row["options"].items():
            ms = {k: statistics.median(v) for k, v in r["ms"].items()}
            diff = r["max_abs_difference"]
            lines.append(
                f"| {case} | {option} | {ms['eager_train']:.0f} / {ms['option_train']:.0f} | {r['train_ratio']:.2f} | "
                f"{ms['eager_infer']:.0f} / {ms['option_infer']:.0f} | {r['infer_ratio']:.2f} | "
                f"{r['first_call_s']['train']}, {r['first_call_s']['infer']} | "
                f"{payback(r) if option.startswith('compiled') else '-'} | "
                f"{diff['logits']:.1g}, {diff['gradients']:.1g} |"
            )
    lines += [
        "",
        f"Commit {payload['commit']}, {payload['threads']} torch threads, {payload['pairs']} pairs (eager, then the "
        "option) per row, medians. Train step: forward, Dice + CE, backward on the sweep's stage-1 batch; "
        "inference: one forward in inference mode on one sliding-window batch. A stage of a sweep run is "
        f"{STAGE_STEPS} steps. Command: `python -m research.bench.step_options`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=[2, 3])
    parser.add_argument("--options", nargs="+", choices=OPTIONS, default=list(OPTIONS))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.report_only:
        # a cold compile, as on a new machine: inductor's on-disk cache would serve a second run in seconds
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="step_options_inductor_")
        rows = [measure(dims, args.pairs, tuple(args.options)) for dims in args.dims]
        payload = {"commit": commit(), "threads": torch.get_num_threads(), "pairs": args.pairs, "rows": rows}
        RESULT.write_text(json.dumps(payload, indent=2) + "\n")
    payload = json.loads(RESULT.read_text())
    replace_section(ROOT / "research" / "results.md", SECTION, table(payload))
    print(table(payload))


if __name__ == "__main__":
    main()
