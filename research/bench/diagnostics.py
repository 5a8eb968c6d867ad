"""Diagnostics of UnCoL's pseudo-labels on the embedded 2D task, where unlabelled images keep hidden labels:

1. pseudo-label accuracy on the voxels the gate keeps vs rejects, and of each teacher where it
   supplies the label, over training (``PseudoLabelAudit`` on a fixed set of unlabelled images);
2. calibration of each teacher (and the student) on the validation split: expected calibration error
   and a reliability diagram, since the gate trusts entropy;
3. how often both teachers are confidently wrong (entropy under the threshold, wrong class).

    python -m research.bench.diagnostics [--fraction 0.1] [--seed 0] [--stage1 <folder with models/pretrain.pt>]

Stage 1 (both distillation paths) and stage 2 (both teachers) run through the bundle's own configs
at the sweep's budget. Writes ``diagnostics_2d.json`` and two PNGs into ``research/results/`` and the
"diagnostics" section of ``research/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from research.bench.report import replace_section
from research.bench.sweep import commit, portable, setting_overrides

ROOT = Path(__file__).resolve().parents[2]


CONFIGS = ROOT / "bundle" / "configs"
TRAIN, PRETRAIN = str(CONFIGS / "train.json"), str(CONFIGS / "pretrain.json")
DOCS = ROOT / "research"


def hidden_label_pairs(datalist: Path, limit: int) -> list[dict]:
    """Unlabelled entries with their hidden label (``imagesTr/x`` -> ``labelsTr/x``) added."""
    entries = json.loads(datalist.read_text())["unlabeled"][:limit]
    pairs = []
    for e in entries:
        image = (datalist.parent / e["image"]).resolve()
        pairs.append({"image": str(image), "label": str(image.parent.parent / "labelsTr" / image.name)})
    return pairs


def load_pairs(parser, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as the teachers see them in training (deterministic transforms, padded) and labels."""
    from monai.transforms import Compose, DivisiblePadd

    transform = Compose(
        [*parser.get_parsed_content("train#deterministic_transforms"), DivisiblePadd(["image", "label"], 16)]
    )
    items = [transform(p) for p in pairs]
    return torch.stack([i["image"].as_tensor() for i in items]), torch.stack([i["label"].as_tensor() for i in items])


@torch.no_grad()
def calibration(parser, iteration, threshold: float) -> dict:
    """Reliability bins and ECE of the specialized teacher, the generalized teacher and the student on
    the validation split (all voxels, and the voxels near structures); both-confidently-wrong rates."""
    from custom.handlers.pseudo_label_audit import audit_pseudo_labels
    from custom.metrics import calibration_bins, expected_calibration_error

    loader = parser.get_parsed_content("validate#dataloader")
    network = parser.get_parsed_content("network").eval()
    device = parser.get_parsed_content("device")
    probs = {"specialized": [], "generalized": [], "student": []}
    truths = []
    for batch in loader:
        image = batch["image"].as_tensor().to(device)
        spec, gen = iteration.teacher_probs(image)
        probs["specialized"].append(spec.cpu())
        probs["generalized"].append(gen.cpu())
        probs["student"].append(torch.softmax(network(image), 1).cpu())
        truths.append(batch["label"].as_tensor()[:, 0].long())
    truth = torch.cat(truths)
    probs = {k: torch.cat(v) for k, v in probs.items()}
    near = (truth > 0) | (probs["specialized"].argmax(1) > 0) | (probs["generalized"].argmax(1) > 0)
    result = {}
    for name, p in probs.items():
        every = calibration_bins(p, truth)
        structures = calibration_bins(p, truth, where=near)
        result[name] = {
            "ece": expected_calibration_error(every),
            "ece_structures": expected_calibration_error(structures),
            "bins_structures": {k: v.tolist() for k, v in structures.items()},
        }
    gated = iteration.gate(probs["specialized"], probs["generalized"], threshold)
    audit = audit_pseudo_labels(probs["specialized"], probs["generalized"], gated, truth, threshold)
    result["validation_gate"] = audit
    return result


def plots(records: list[dict], calib: dict, out: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series = {
        "kept by the gate": "kept_accuracy_fg",
        "rejected by the gate": "rejected_accuracy_fg",
        "specialized, where it supplies": "specialized_supplied_accuracy_fg",
        "generalized, where it supplies": "generalized_supplied_accuracy_fg",
    }
    for label, key in series.items():
        axes[0].plot(
            its, [r.get(key) if r.get(key) is not None else float("nan") for r in records], marker=".", label=label
        )
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("pseudo-label accuracy (foreground voxels)")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].plot(its, [r["kept"] for r in records], marker=".", label="fraction kept")
    axes[1].plot(
        its,
        [100 * r.get("both_confidently_wrong_fg", 0.0) for r in records],
        marker=".",
        label="both teachers confidently wrong (% of foreground)",
    )
    axes[1].set_xlabel("iteration")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    audit_png = out / "pseudo_label_audit_2d.png"
    fig.savefig(audit_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    for name in ("specialized", "generalized", "student"):
        bins = calib[name]["bins_structures"]
        xs = [c for c, n in zip(bins["confidence"], bins["count"], strict=True) if n > 0]
        ys = [a for a, n in zip(bins["accuracy"], bins["count"], strict=True) if n > 0]
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {calib[name]['ece_structures']:.3f})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability near structures, validation split")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    reliability_png = out / "reliability_2d.png"
    fig.savefig(reliability_png, dpi=100)
    plt.close(fig)
    return audit_png, reliability_png


def main(argv: list[str] | None = None) -> None:
    from monai.bundle import ConfigParser, run

    from custom.handlers.pseudo_label_audit import PseudoLabelAudit

    parser_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser_.add_argument("--fraction", type=float, default=0.1)
    parser_.add_argument("--seed", type=int, default=0)
    parser_.add_argument("--out", default=str(ROOT / "research" / "work" / "diagnostics"))
    parser_.add_argument("--stage1", default=None, help="folder holding models/pretrain.pt (stage 1, both paths)")
    parser_.add_argument("--teacher-cache", default=None, help="encoder cache folder (default: <out>/teacher_cache)")
    parser_.add_argument("--audit-every", type=int, default=20)
    parser_.add_argument("--audit-images", type=int, default=16)
    parser_.add_argument("--results", default=str(DOCS / "results"))
    parser_.add_argument("--results-md", default=str(DOCS / "results.md"))
    parser_.add_argument("--quick", action="store_true", help="tiny images, models and budget (smoke test)")
    args = parser_.parse_args(argv)
    setting = "quick" if args.quick else "2d"
    out, results = Path(args.out), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    cache = Path(args.teacher_cache) if args.teacher_cache else out / "teacher_cache"
    overrides = {
        "bundle_root": str(out),
        **setting_overrides(setting, args.fraction, args.seed, out / "data", cache),
        "teachers": "both",
    }
    ckpt = out / "models" / "pretrain.pt"
    if args.stage1 and not ckpt.is_file():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(args.stage1) / "models" / "pretrain.pt", ckpt)
    if not ckpt.is_file():
        run("pretrain", config_file=[TRAIN, PRETRAIN], distillation="both", **overrides)
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update(overrides)
    parser.get_parsed_content("initialize")
    iteration = parser.get_parsed_content("semi_supervised_iteration")
    images, labels = load_pairs(
        parser, hidden_label_pairs(Path(parser.get_parsed_content("datalist")), args.audit_images)
    )
    (out / "audit.jsonl").unlink(missing_ok=True)
    audit = PseudoLabelAudit(iteration, images, labels, args.audit_every, out / "audit.jsonl")
    trainer = parser.get_parsed_content("train#trainer")
    audit.attach(trainer)
    parser.get_parsed_content("run")
    threshold = iteration.gate_level(trainer)  # the entropy gate's threshold at the end
    calib = calibration(parser, iteration, threshold)
    audit_png, reliability_png = plots(audit.records, calib, results)
    payload = {
        "args": portable(vars(args)),
        "commit": commit(),
        "overrides": portable(overrides),
        "audit": audit.records,
        "calibration": calib,
    }
    (results / "diagnostics_2d.json").write_text(json.dumps(payload, indent=2))
    replace_section(
        Path(args.results_md), "diagnostics-2d", summary(payload, audit_png, reliability_png, Path(args.results_md))
    )
    print(summary(payload, audit_png, reliability_png, Path(args.results_md)))


def summary(payload: dict, audit_png: Path, reliability_png: Path, page: Path) -> str:
    def pct(x) -> str:
        return "n/a" if x is None else f"{100 * x:.1f} %"

    first, last = payload["audit"][0], payload["audit"][-1]
    calib = payload["calibration"]
    val = calib["validation_gate"]
    rel = lambda p: Path(os.path.relpath(p, page.parent)).as_posix()  # noqa: E731
    lines = [
        f"Pseudo-labels on {payload['args']['audit_images']} unlabelled images scored against their hidden labels "
        f"every {payload['args']['audit_every']} iterations ({payload['args']['fraction']:.0%} labels, seed "
        f"{payload['args']['seed']}, commit {payload['commit']}). Accuracies count foreground voxels (truth or "
        "pseudo-label foreground).",
        "",
        "| iteration | threshold | kept | accuracy kept | accuracy rejected | specialized where it supplies | "
        "generalized where it supplies | both confidently wrong (% of fg) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in (first, last):
        lines.append(
            f"| {r['iteration']} | {r['threshold']:.3f} | {pct(r['kept'])} | {pct(r['kept_accuracy_fg'])} | "
            f"{pct(r['rejected_accuracy_fg'])} | {pct(r.get('specialized_supplied_accuracy_fg'))} | "
            f"{pct(r.get('generalized_supplied_accuracy_fg'))} | {pct(r.get('both_confidently_wrong_fg'))} |"
        )
    lines += [
        "",
        f"![pseudo-label audit]({rel(audit_png)})",
        "",
        'Calibration on the validation split (15 equal-width confidence bins; "near structures" = voxels where the '
        "truth or either teacher says foreground):",
        "",
        "| model | ECE, all voxels | ECE, near structures |",
        "|---|---|---|",
    ]
    for name in ("specialized", "generalized", "student"):
        lines.append(f"| {name} | {calib[name]['ece']:.4f} | {calib[name]['ece_structures']:.4f} |")
    lines += [
        "",
        f"![reliability diagram]({rel(reliability_png)})",
        "",
        f"On the validation split at the final threshold {val['threshold']:.3f}: the gate keeps {pct(val['kept'])} of "
        f"voxels; both teachers are confidently wrong on {pct(val.get('both_confidently_wrong'))} of all voxels "
        f"({pct(val.get('both_confidently_wrong_fg'))} of foreground voxels): errors no entropy gate can catch.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
