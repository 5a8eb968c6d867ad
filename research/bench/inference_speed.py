"""Sliding-window inference of the student against a MONAI UNet of about its parameter count (issue 37).

One process runs one network over the inputs ``--repeats`` times (after one untimed pass) and prints
milliseconds per input; time two processes side by side (``/usr/bin/time``, or any harness that runs
both in turn) to get the ratio. Inputs and the sliding window are the bundle's inference settings:

- 2D: 16 non-square 192x160 images, roi 128x128, 4 windows a batch, overlap 0.25;
- 3D: one 160x160x96 volume, roi 64x64x32 (the CPU patch setting), 4 windows a batch, overlap 0.25.

    python -m research.bench.inference_speed --dims 2 --network student   # one network, one process
    python -m research.bench.inference_speed --all                        # the table: both, in turn

``--all`` writes research/results/inference_speed.json and research/results.md's ``inference-speed`` section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from custom.networks.student import UnCoLStudent
from research.bench.report import replace_section
from research.bench.sweep import ROOT, commit

RESULT = ROOT / "research" / "results" / "inference_speed.json"

#: dims -> (inputs, roi)
SETTINGS = {2: ([16, 1, 192, 160], (128, 128)), 3: ([1, 1, 160, 160, 96], (64, 64, 32))}


def bundle_student() -> dict:
    """The student as train.json builds it (its ``network_def`` settings; 1 channel in, 3 classes out)."""
    from monai.bundle import ConfigParser

    network = ConfigParser.load_config_file(str(ROOT / "bundle" / "configs" / "train.json"))["network_def"]
    settings = {k: v for k, v in network.items() if k not in ("_target_", "spatial_dims", "out_channels")}
    return {**settings, "in_channels": 1, "out_channels": 3}


STUDENT = bundle_student()


def parameters(network: torch.nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def unet(dims: int, base: int) -> UNet:
    """MONAI's residual UNet (five levels, channels doubling from ``base``, two residual units a level)."""
    channels = tuple(base * 2**k for k in range(5))
    return UNet(dims, 1, STUDENT["out_channels"], channels=channels, strides=(2, 2, 2, 2), num_res_units=2)


def matched_unet(dims: int) -> UNet:
    """The UNet whose parameter count is closest to the student's (the count grows with the base width,
    so widths are tried upwards from 4 until it passes the student's)."""
    target = parameters(UnCoLStudent(spatial_dims=dims, **STUDENT))
    below = unet(dims, 4)
    for base in range(5, 129):
        above = unet(dims, base)
        if parameters(above) >= target:
            return min(below, above, key=lambda net: abs(parameters(net) - target))
        below = above
    return below


def network_for(name: str, dims: int) -> torch.nn.Module:
    return UnCoLStudent(spatial_dims=dims, **STUDENT) if name == "student" else matched_unet(dims)


@torch.inference_mode()
def run(network: torch.nn.Module, dims: int, repeats: int) -> float:
    """Milliseconds per input of sliding-window inference, mean over ``repeats`` passes."""
    shape, roi = SETTINGS[dims]
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    network.eval()

    def one_pass() -> None:
        for image in inputs:
            sliding_window_inference(image[None], roi, 4, network, overlap=0.25)

    one_pass()
    start = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    return 1000 * (time.perf_counter() - start) / repeats / len(inputs)


def measure(dims: int, repeats: int, student: dict | None = None) -> dict:
    """Both networks in turn, ``repeats`` times each (A B A B ...): ms per input, their ratio per pair."""
    networks = {
        "student": UnCoLStudent(spatial_dims=dims, **{**STUDENT, **(student or {})}),
        "unet": matched_unet(dims),
    }
    times: dict[str, list[float]] = {name: [] for name in networks}
    for _ in range(repeats):
        for name, network in networks.items():
            times[name].append(run(network, dims, 1))
    ratios = sorted(s / u for s, u in zip(times["student"], times["unet"], strict=True))
    return {
        "dims": dims,
        "student_overrides": student or {},
        "parameters_m": {name: round(parameters(n) / 1e6, 2) for name, n in networks.items()},
        "ms_per_input": {name: [round(t, 1) for t in ts] for name, ts in times.items()},
        "ratio_median": round(statistics.median(ratios), 2),
        "ratio_range": [round(ratios[0], 2), round(ratios[-1], 2)],
    }


def table(payload: dict) -> str:
    lines = [
        "| input | student | student M params | UNet M params | student ms / input (median) | UNet ms / input (median) "
        "| student / UNet: median [min, max] over pairs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        shape, roi = SETTINGS[row["dims"]]
        what = f"{row['dims']}D {'x'.join(map(str, shape[2:]))}, roi {'x'.join(map(str, roi))}"
        student = ", ".join(f"{k} {v}" for k, v in row["student_overrides"].items()) or "bundle default"
        ms = {k: statistics.median(v) for k, v in row["ms_per_input"].items()}
        lines.append(
            f"| {what} | {student} | {row['parameters_m']['student']} | {row['parameters_m']['unet']} | "
            f"{ms['student']:.1f} | {ms['unet']:.1f} | {row['ratio_median']:.2f} [{row['ratio_range'][0]:.2f}, "
            f"{row['ratio_range'][1]:.2f}] |"
        )
    lines += [
        "",
        f"Commit {payload['commit']}, {payload['threads']} torch threads, {payload['repeats']} pairs each, the two "
        "networks in turn in one process (eval mode, `torch.inference_mode`, `sliding_window_inference` with 4 "
        "windows a batch, overlap 0.25). UNet: MONAI's residual UNet, five levels, two residual units a level, "
        "base width chosen for the bundle's student's parameter count (also on the narrower student's row). "
        "Command: `python -m research.bench.inference_speed --all`.",
    ]
    return "\n".join(lines)


#: the rows ``--all`` measures: the bundle's student in 2D and 3D, and the cheaper decoders (issue 37)
NARROW, SINGLE = {"feature_size": 8}, {"full_resolution": "single"}
ROWS = [(2, {}), (2, SINGLE), (2, NARROW), (3, {}), (3, SINGLE), (3, NARROW), (3, {**NARROW, **SINGLE})]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--network", choices=("student", "unet"), default="student")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--all", action="store_true", help="every row of ROWS, both networks; writes the JSON and table"
    )
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.all or args.report_only:
        if not args.report_only:
            rows = [measure(dims, max(args.repeats, 3), student) for dims, student in ROWS]
            payload = {"commit": commit(), "threads": torch.get_num_threads(), "repeats": max(args.repeats, 3)}
            RESULT.write_text(json.dumps({**payload, "rows": rows}, indent=2) + "\n")
        replace_section(ROOT / "research" / "results.md", "inference-speed", table(json.loads(RESULT.read_text())))
        return
    network = network_for(args.network, args.dims)
    ms = run(network, args.dims, args.repeats)
    print(f"{args.network} {args.dims}D: {parameters(network) / 1e6:.2f} M parameters, {ms:.1f} ms per input")


if __name__ == "__main__":
    main()
