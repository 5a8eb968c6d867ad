"""Where the student's FLOPs are, part by part, against the UNet the inference benchmark times (issue 37).

Counts the multiply-adds of one forward pass on one sliding-window input (2D 128x128, 3D 64x64x32, the
inference roi) with ``torch.utils.flop_counter``, for each student of the ``inference-speed`` rows and
for the MONAI UNet of the bundle student's parameter count that it is timed against. The student's parts:
the ViT encoder (patch embedding and transformer blocks), the full-resolution stem, the skip paths from
the transformer layers, each up level of the decoder (``up4`` at 1/8 resolution ... ``up1`` at full
resolution) and the output head. Beside the FLOP ratio, the table reads the time ratio of the same row
from the committed ``inference_speed.json``: if time follows FLOPs, no change that keeps the math
can bring the student to the UNet's time; only a decoder with fewer FLOPs can.

Counting is deterministic and needs no idle machine. Writes research/results/student_flops.json and
research/results.md's ``student-flops`` section.

    python -m research.bench.student_flops
    python -m research.bench.student_flops --report-only
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from custom.networks.student import UnCoLStudent
from research.bench import inference_speed
from research.bench.inference_speed import ROWS, STUDENT, matched_unet
from research.bench.report import replace_section
from research.bench.sweep import ROOT, commit

RESULT = ROOT / "research" / "results" / "student_flops.json"
SECTION = "student-flops"
#: the student's parts, by the name prefix of their modules
PARTS = {
    "encoder (ViT)": ("patch_embed", "blocks", "norm"),
    "stem": ("stem",),
    "skip paths": ("skip1", "skip2", "skip3"),
    "up4 (1/8)": ("up4",),
    "up3 (1/4)": ("up3",),
    "up2 (1/2)": ("up2",),
    "up1 (full)": ("up1",),
    "head": ("head",),
}


def window(dims: int) -> torch.Tensor:
    """One sliding-window input of the inference benchmark's roi."""
    return torch.zeros(1, 1, *inference_speed.SETTINGS[dims][1])


def forward_flops(network: torch.nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one forward and the FLOPs of each top-level child module (by name)."""
    counter = FlopCounterMode(display=False, depth=2)
    with torch.inference_mode(), counter:
        network.eval()(x)
    root = type(network).__name__ + "."
    flops = {m[len(root) :]: sum(c.values()) for m, c in counter.get_flop_counts().items() if m.startswith(root)}
    # a child that is never called itself (a ModuleList of blocks) is counted through its own children
    children = {name: n for name, n in flops.items() if "." not in name}
    for name, n in flops.items():
        if name.count(".") == 1 and name.split(".")[0] not in children:
            children[name] = n
    return counter.get_total_flops(), children


def student_parts(children: dict[str, int]) -> dict[str, int]:
    """The children's FLOPs summed into :data:`PARTS` (every child must belong to a part)."""
    parts = {part: 0 for part in PARTS}
    for name, flops in children.items():
        part = next((p for p, prefixes in PARTS.items() if name.split(".")[0] in prefixes), None)
        if part is None:
            raise ValueError(f"student module {name!r} belongs to no part of {sorted(PARTS)}")
        parts[part] += flops
    return parts


def measure() -> dict:
    rows = []
    for dims, overrides in ROWS:
        student = UnCoLStudent(spatial_dims=dims, **{**STUDENT, **overrides})
        total, children = forward_flops(student, window(dims))
        unet_total, _ = forward_flops(matched_unet(dims), window(dims))
        rows.append(
            {
                "dims": dims,
                "student_overrides": overrides,
                "student_gflop": round(total / 1e9, 3),
                "unet_gflop": round(unet_total / 1e9, 3),
                "parts_gflop": {k: round(v / 1e9, 3) for k, v in student_parts(children).items()},
            }
        )
    return {"commit": commit(), "rows": rows}


def table(payload: dict, speed: dict | None = None) -> str:
    """The section; ``speed``: the ``inference-speed`` payload whose time ratios go beside the FLOP ratios
    (default: the committed one)."""
    if speed is None and inference_speed.RESULT.is_file():
        speed = json.loads(inference_speed.RESULT.read_text())
    times = {
        (r["dims"], json.dumps(r["student_overrides"], sort_keys=True)): r["ratio_median"]
        for r in (speed or {"rows": []})["rows"]
    }
    lines = [
        "| input | student | student GFLOP | " + " | ".join(f"{p} %" for p in PARTS) + " | UNet GFLOP "
        "| student / UNet, FLOPs | student / UNet, time (`inference-speed`) |",
        "|---|---|---|" + "---|" * len(PARTS) + "---|---|---|",
    ]
    for row in payload["rows"]:
        roi = "x".join(map(str, inference_speed.SETTINGS[row["dims"]][1]))
        student = ", ".join(f"{k} {v}" for k, v in row["student_overrides"].items()) or "bundle default"
        total = row["student_gflop"]
        shares = " | ".join(f"{100 * row['parts_gflop'][p] / total:.0f}" for p in PARTS)
        time = times.get((row["dims"], json.dumps(row["student_overrides"], sort_keys=True)))
        lines.append(
            f"| {row['dims']}D {roi} | {student} | {total:.2f} | {shares} | {row['unet_gflop']:.2f} | "
            f"{total / row['unet_gflop']:.2f} | {'' if time is None else f'{time:.2f}'} |"
        )
    lines += [
        "",
        f"Commit {payload['commit']}. FLOPs of one forward pass on one window of the inference roi "
        "(`torch.utils.flop_counter`: matrix products and convolutions, 2 per multiply-add), by the student's "
        "parts; UNet: the residual UNet of the bundle student's parameter count that `inference-speed` times "
        "against (the same on every row). Time: that table's median ratio for the same student. "
        "Command: `python -m research.bench.student_flops`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report-only", action="store_true", help="rewrite the section from the JSON")
    args = parser.parse_args(argv)
    if not args.report_only:
        RESULT.write_text(json.dumps(measure(), indent=1) + "\n")
    text = table(json.loads(RESULT.read_text()))
    replace_section(ROOT / "research" / "results.md", SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
