"""The gate's leading indicator, for every variant: pseudo-label audit at the start of stage 2.

    python -m research.bench.gate_audit --task colin27 --stage1 <folder with models/pretrain.pt>
    python -m research.bench.gate_audit --quick --out /tmp/gate      # tiny embedded data: a smoke test
    python -m research.bench.gate_audit --task colin27 --report-only  # rebuild the results.md table from the JSON
    python -m research.bench.gate_audit --setting 3d_patch --work research/work/sweep/3d_patch \
        --variants 0 2 5 6 7 10 11

``--work`` audits a sweep's own run: its data, teacher cache and seed's stage 1 (both paths). Where the
images are larger than ``roi_size`` (3D at clinical size), the audit cuts ``--patches`` patches per
image at the tiles stage 2 draws them from, and the generalized teacher sees their whole slices, as in
training (``teacher_whole_slices``).

Stage 2 starts from the stage 1 student (both distillation paths): its EMA teacher is that student.
With the same teachers' inputs, each variant of the gate (calibration, prompts, abstention, threshold
rule, disagreement rule: each alone, then combined) is applied to unlabelled images whose
labels training never sees, and scored against them: the fraction kept at the threshold schedule's
start and end, the accuracy of kept and rejected foreground voxels, each teacher's accuracy alone and
where it supplies the label, and the share of foreground voxels where both teachers are confidently
wrong; plus each teacher's ECE near structures. Temperatures are fitted on the validation split (never
on the audited or test images). Writes ``research/results/gate_audit_<task>.json`` and the
``gate-audit-<task>`` section of ``research/results.md``.

This is a snapshot (stage 2's first step), not training: it says which variants make the gate's
choice informative before a sweep spends hours on them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from custom.handlers.pseudo_label_audit import soft_gate_confidence
from research.bench.diagnostics import hidden_label_pairs, load_pairs
from research.bench.report import replace_section
from research.bench.sweep import SETTINGS, commit, portable, setting_overrides, train_configs

ROOT = Path(__file__).resolve().parents[2]


CONFIGS = ROOT / "bundle" / "configs"
DOCS = ROOT / "research"

#: (name, bundle overrides on top of UnCoL as it was): each change alone, then the combinations that
#: the single changes suggest (a chain would hide interactions: calibrated probabilities are flat, so a
#: prompt-confidence filter after calibration removes every prompt)
VARIANTS = [
    ("UnCoL as it was (UA-MT threshold, one box per class, no calibration)", {}),
    ("temperature calibration", {"calibration": "temperature"}),
    ("one box per connected component", {"teacher_def#box_mode": "component"}),
    ("prompts only from regions the EMA teacher is sure of (0.8)", {"teacher_def#prompt_min_confidence": 0.8}),
    ("abstention: unprompted classes uniform", {"teacher_def#abstain": "uniform"}),
    ("class-wise quantile threshold (keep 0.5 -> 0.8)", {"gate": "quantile"}),
    ("disagreement masked", {"disagreement": "mask"}),
    ("quantile + disagreement masked", {"gate": "quantile", "disagreement": "mask"}),
    (
        "component boxes + abstention + quantile",
        {"teacher_def#box_mode": "component", "teacher_def#abstain": "uniform", "gate": "quantile"},
    ),
    (
        "calibration + component boxes + abstention + quantile",
        {
            "calibration": "temperature",
            "teacher_def#box_mode": "component",
            "teacher_def#abstain": "uniform",
            "gate": "quantile",
        },
    ),
    ("class guard (labelled class prior)", {"class_guard": "prior"}),
    (
        "quantile + disagreement masked + class guard",
        {"gate": "quantile", "disagreement": "mask", "class_guard": "prior"},
    ),
    # every voxel supervised, weighted by its reliability: scored by weight (a voxel half kept counts half)
    ("soft reliability weights (1 - H / ln C)", {"gate": "soft"}),
    # each foreground class from the teacher with the higher Dice on the validation split
    ("each class from its better teacher on validation", {"teachers": "by_class"}),
]


@torch.no_grad()
def class_recall(
    spec: torch.Tensor, gen: torch.Tensor, pseudo: torch.Tensor, kept: torch.Tensor, truth: torch.Tensor
) -> list[dict]:
    """Per foreground class, the share of its true voxels that each teacher's argmax and the kept
    pseudo-label call that class: where a class the students must learn goes missing (a class the
    pseudo-labels never supervise as itself is unlearned); and the share kept as another class (what
    teaches the student to unlearn it), of it as background (the rest is another foreground class: an
    organ around a lesion, which ``pseudo_label_nesting`` no longer counts against the lesion). ``kept`` is
    the gate's weight per voxel (0 or 1; the soft gate's in between): a voxel counts by its weight."""
    out = []
    for c in range(1, spec.shape[1]):
        true = truth == c
        n = int(true.sum())

        def share(hit: torch.Tensor, weight: torch.Tensor | float = 1.0, true=true, n=n) -> float | None:
            return None if n == 0 else round(float(((hit & true).float() * weight).sum()) / n, 4)

        out.append({
            "class": c, "voxels": n, "ema": share(spec.argmax(1) == c), "litemedsam": share(gen.argmax(1) == c),
            "kept_pseudo_label": share(pseudo == c, kept),
            "kept_as_other": share(pseudo != c, kept),
            "kept_as_background": share(pseudo == 0, kept),
        })  # fmt: skip
    return out


def labelled_class_prior(parser, datalist: Path) -> torch.Tensor:
    """Each class's share of the labelled training cases' voxels (the class guard's prior; in training
    it is counted over the labelled batches)."""
    entries = json.loads(datalist.read_text())["training"]
    pairs = [{k: str((datalist.parent / e[k]).resolve()) for k in ("image", "label")} for e in entries]
    _, labels = load_pairs(parser, pairs)
    counts = torch.bincount(labels.long().flatten(), minlength=int(parser.get_parsed_content("num_classes")))
    return counts.float() / counts.sum()


def cut_patches(
    images: torch.Tensor, labels: torch.Tensor, roi_size: list[int], per_image: int, slice_axis: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``per_image`` distinct patches of each image at the tiles stage 2 draws unlabelled patches from,
    with their labels, their whole-slice contexts and starts (what the generalized teacher is given)."""
    from custom.data.crops import RandGridCropd

    crop = RandGridCropd(["image", "label"], roi_size, tiles=True, context_key="context", context_axis=slice_axis)
    crop.set_random_state(seed)
    patches, patch_labels, contexts, starts = [], [], [], []
    for image, label in zip(images, labels, strict=True):
        seen: set[tuple[int, ...]] = set()
        for _ in range(20 * per_image):  # tiles are drawn at random: skip repeats (small images have few)
            d = crop({"image": image, "label": label})
            start = tuple(d["context_start"].tolist())
            if start not in seen:
                seen.add(start)
                patches.append(d["image"])
                patch_labels.append(d["label"])
                contexts.append(d["context"])
                starts.append(d["context_start"])
            if len(seen) == per_image:
                break
    return torch.stack(patches), torch.stack(patch_labels), contexts, torch.stack(starts)


def audit_variant(
    configs: list[str],
    overrides: dict,
    images: torch.Tensor,
    labels: torch.Tensor,
    prior: torch.Tensor,
    contexts: list[torch.Tensor] | None = None,
    starts: torch.Tensor | None = None,
) -> dict:
    """Build stage 2 from the configs with ``overrides``, calibrate if asked (and name each class's owner
    for ``teachers="by_class"``, on the validation split as in training), and audit its gate at the
    threshold schedule's first and last value. ``contexts`` / ``starts``: the patches' whole slices
    and where each patch starts in them (see :func:`cut_patches`); ``None``: images are whole."""
    from monai.bundle import ConfigParser

    from custom.handlers.calibration import TeacherCalibration, ece
    from custom.handlers.pseudo_label_audit import audit_pseudo_labels
    from custom.handlers.ramps import gate_schedule
    from custom.handlers.reliability import TeacherReliability

    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(overrides)
    parser.get_parsed_content("initialize")
    iteration = parser.get_parsed_content("semi_supervised_iteration")
    device = parser.get_parsed_content("device")
    result: dict = {}
    if parser.get_parsed_content("calibration") != "none":
        handler = TeacherCalibration(
            iteration,
            parser.get_parsed_content("validate#dataset"),
            parser.get_parsed_content("validate#inferer"),
            per_class=parser.get_parsed_content("calibration_per_class"),
        )
        record = handler.fit(device)
        iteration.specialized_temperature = record.pop("_specialized_temperature")
        iteration.generalized.mask_temperature = record.pop("_generalized_temperature")
        result["calibration"] = record
    if iteration.gate.teachers == "by_class":
        reliability = TeacherReliability(
            iteration, parser.get_parsed_content("validate#dataset"), parser.get_parsed_content("validate#inferer")
        )
        record = reliability.measure(device)
        iteration.set_class_owners(record.pop("_owners"))
        result["reliability"] = record
    start = time.perf_counter()
    spec, gen = [], []
    for k in range(0, len(images), 4):
        context = None if contexts is None else contexts[k : k + 4]
        start_ = None if starts is None else starts[k : k + 4]
        s, g = iteration.teacher_probs(images[k : k + 4].to(device), context, start_)
        spec.append(s.cpu())
        gen.append(g.cpu())
    spec, gen = torch.cat(spec), torch.cat(gen)
    result["teacher_seconds"] = round(time.perf_counter() - start, 1)
    truth = labels[:, 0].long() if labels.ndim == images.ndim else labels.long()
    near = (truth > 0) | (spec.argmax(1) > 0) | (gen.argmax(1) > 0)
    result["ece_near_structures"] = {"specialized": ece(spec, truth, near), "generalized": ece(gen, truth, near)}
    gate, ramp = parser.get_parsed_content("gate"), parser.get_parsed_content("ramp_iters")
    settings = ("num_classes", "threshold_ramped", "keep_start", "keep_end")
    num_classes, ramped, keep_start, keep_end = (parser.get_parsed_content(k) for k in settings)
    schedule = gate_schedule(gate, num_classes, ramp, ramped, keep_start, keep_end)
    for when, t in (("start", 0), ("end", ramp)):
        threshold = float(schedule(t))
        gated = iteration.gate(spec, gen, threshold, class_prior=prior, prior_probs=spec, owners=iteration.class_owners)
        # "confident" for both-confidently-wrong: under the entropy the gate keeps at; for a quantile gate,
        # the largest entropy it keeps
        kept_entropy = float(gated.entropy[gated.mask.bool()].max()) if gated.mask.any() else 0.0
        confident = {"entropy": threshold, "soft": soft_gate_confidence(spec)}.get(gate, kept_entropy)
        scores = audit_pseudo_labels(spec, gen, gated, truth, confident)
        scores["threshold"] = threshold
        scores["from_generalized"] = gated.stats()["gate_from_generalized"]
        fg = (truth > 0) | (gated.pseudo_label[:, 0] > 0)
        weight = gated.mask[:, 0].float()  # 0 or 1, or the soft gate's weight: a voxel counts by its weight
        scores["kept_fg"] = float((weight * fg).sum()) / max(1, int(fg.sum()))
        scores["class_recall"] = class_recall(spec, gen, gated.pseudo_label[:, 0], weight, truth)
        result[when] = scores
    result["max_entropy"] = math.log(spec.shape[1])
    return result


def stage1_provenance(folder: str) -> dict:
    """Where the stage 1 checkpoint came from, without this machine's folders: its path relative to the
    checkout (or its folder name outside it) and the commit in the sweep's ``stage1.json`` beside it (if any)."""
    path = Path(folder).resolve()
    relative = path.relative_to(ROOT) if path.is_relative_to(ROOT) else Path(path.name)
    record = path / "stage1.json"
    commit_ = json.loads(record.read_text())["commit"] if record.is_file() else None
    return {"path": relative.as_posix(), "commit": commit_}


def table(payload: dict) -> str:
    def pct(x) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}"

    rows = [
        "| variant | kept % (fg) start / end | kept fg accuracy % start / end | rejected fg accuracy % start / end | "
        "EMA alone / LiteMedSAM alone fg accuracy % | from LiteMedSAM % of kept (end) | "
        "both confidently wrong % of fg (end) | each class kept as another % (end) | "
        "ECE near structures EMA / LiteMedSAM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in payload["variants"]:
        r, s, e = v["result"], v["result"]["start"], v["result"]["end"]
        rows.append(
            f"| {v['name']} | {pct(s['kept_fg'])} / {pct(e['kept_fg'])} | {pct(s['kept_accuracy_fg'])} / "
            f"{pct(e['kept_accuracy_fg'])} | {pct(s['rejected_accuracy_fg'])} / {pct(e['rejected_accuracy_fg'])} | "
            f"{pct(e['specialized_accuracy_fg'])} / {pct(e['generalized_accuracy_fg'])} | "
            f"{pct(e['from_generalized'])} | {pct(e.get('both_confidently_wrong_fg'))} | "
            f"{' / '.join(pct(c.get('kept_as_other')) for c in e.get('class_recall', [])) or 'n/a'} | "
            f"{r['ece_near_structures']['specialized']:.3f} / {r['ece_near_structures']['generalized']:.3f} |"
        )
    temps = [v for v in payload["variants"] if "calibration" in v["result"]]
    if temps:
        from custom.handlers.calibration import LIMIT

        def shown(t: float | list[float]) -> str:
            """Temperatures, marking those at the search's bounds (the fit wanted further)."""
            values = t if isinstance(t, list) else [t]
            marks = [f"{v:g}" + (" (bound)" if v >= 0.999 * LIMIT or v <= 1.001 / LIMIT else "") for v in values]
            return marks[0] if not isinstance(t, list) else "[" + ", ".join(marks) + "]"

        c = temps[-1]["result"]["calibration"]
        spec, gen = c["specialized"], c["generalized"]
        rows += [
            "",
            f"Fitted on the validation split ({c['voxels']} voxels near structures; the last variant's fit): "
            f"EMA teacher T = {shown(spec['temperature'])} (ECE {spec['ece'][0]:.3f} -> {spec['ece'][1]:.3f}), "
            f"LiteMedSAM mask T per class = {shown(gen['temperature'])} "
            f"(ECE {gen['ece'][0]:.3f} -> {gen['ece'][1]:.3f}).",
        ]
    patches = f" ({payload['patches']} patches)" if payload.get("patches") else ""
    rows += [
        "",
        f"One audit of one stage 1 checkpoint, so no spread: {payload.get('images', 'n/a')} unlabelled images"
        f"{patches}, `{payload.get('command', 'n/a')}` at commit {payload.get('commit', 'n/a')}. Percentages are "
        "of the audited foreground voxels (the truth's or the pseudo-label's), at the threshold schedule's start "
        "and end.",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args_.add_argument("--task", choices=("colin27", "macaque"), default=None, help="a real-anatomy task")
    args_.add_argument(
        "--setting", choices=sorted(SETTINGS), default=None, help="a sweep setting (default: --task or 2d)"
    )
    args_.add_argument("--quick", action="store_true", help="tiny embedded images and models (smoke test)")
    args_.add_argument("--fraction", type=float, default=0.1)
    args_.add_argument("--seed", type=int, default=0)
    args_.add_argument("--stage1", default=None, help="folder holding models/pretrain.pt (stage 1, both paths)")
    args_.add_argument("--work", default=None, help="a sweep's work folder: its data, teacher cache and stage 1")
    args_.add_argument("--images", type=int, default=16, help="unlabelled images audited")
    args_.add_argument("--patches", type=int, default=4, help="patches per image where images exceed roi_size")
    args_.add_argument("--variants", type=int, nargs="+", default=None, help="indices into VARIANTS (default: all)")
    args_.add_argument("--out", default=str(ROOT / "research" / "work" / "gate_audit"))
    args_.add_argument("--results", default=None, help="folder of the JSON (default: research/results)")
    args_.add_argument("--results-md", default=None)
    args_.add_argument("--report-only", action="store_true", help="rebuild the results.md section from the JSON")
    args = args_.parse_args(argv)
    from monai.bundle import ConfigParser, run

    setting = "quick" if args.quick else args.setting or args.task or "2d"
    task = SETTINGS[setting].get("task")
    out = Path(args.out) / setting
    # a smoke test's output stays beside its work folder, out of the research record
    results = Path(args.results) if args.results else out / "results" if args.quick else DOCS / "results"
    page = Path(args.results_md) if args.results_md else results.parent / "results.md"
    if args.report_only:
        payload = json.loads((results / f"gate_audit_{setting}.json").read_text())
        replace_section(page, f"gate-audit-{setting}", table(payload))
        print(table(payload))
        return
    work = Path(args.work).absolute() if args.work else None  # not resolved: the JSON names it from ROOT
    dataset = work / "data" / f"fraction_{args.fraction:g}" if work else out / "data"
    cache = work / "teacher_cache" if work else out / "teacher_cache"
    seed_root = work / f"fraction_{args.fraction:g}" / f"seed{args.seed}" if work else None
    stage1 = args.stage1 or (str(seed_root / "stage1_both") if seed_root else None)
    if task:
        from research.data.real_brain import prepare

        prepare(dataset, task, labelled_fraction=args.fraction, seed=args.seed)
    configs = train_configs(setting)
    overrides = {
        "bundle_root": str(out),
        **setting_overrides(setting, args.fraction, args.seed, dataset, cache),
        "teachers": "both",
    }
    ckpt = out / "models" / "pretrain.pt"
    if stage1:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(stage1) / "models" / "pretrain.pt", ckpt)
    if not ckpt.is_file():
        run("pretrain", config_file=[*configs, str(CONFIGS / "pretrain.json")], distillation="both", **overrides)
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(overrides)
    parser.get_parsed_content("embedded_data")  # the embedded generator writes its data (no-op otherwise)
    datalist = dataset / "datalist.json"
    images, labels = load_pairs(parser, hidden_label_pairs(datalist, args.images))
    prior = labelled_class_prior(parser, datalist)
    audited, patched, contexts, starts = len(images), False, None, None
    roi = list(parser.get_parsed_content("plan").roi_size)
    if any(s > r for s, r in zip(images.shape[2:], roi, strict=True)):  # training sees patches of these
        slice_axis = int(parser.get_parsed_content("teacher_def#slice_axis"))
        images, labels, contexts, starts = cut_patches(images, labels, roi, args.patches, slice_axis, args.seed)
        patched = True
        if not parser.get_parsed_content("teacher_whole_slices"):
            contexts = starts = None
    chosen = range(len(VARIANTS)) if args.variants is None else args.variants
    variants = []
    for name, change in (VARIANTS[i] for i in chosen):
        result = audit_variant(configs, {**overrides, **change}, images, labels, prior, contexts, starts)
        variants.append({"name": name, "overrides": change, "result": result})
        print(name, json.dumps(result["end"]))
    options = [
        f"--setting {setting}" if args.setting else "",
        f"--task {args.task}" if args.task else "",
        "--quick" if args.quick else "",
        f"--work {portable({'w': str(work)})['w']}" if work else "",
        f"--stage1 {stage1_provenance(stage1)['path']}" if args.stage1 else "",
        f"--variants {' '.join(map(str, args.variants))}" if args.variants else "",
    ]
    payload = {
        "command": " ".join(["python -m research.bench.gate_audit", *filter(None, options)]),
        "commit": commit(),
        "setting": setting,
        "stage1": stage1_provenance(stage1) if stage1 else None,
        "images": audited,
        "patches": len(images) if patched else None,
        "overrides": portable(overrides),
        "variants": variants,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"gate_audit_{setting}.json").write_text(json.dumps(payload, indent=2))
    text = table(payload)
    if page.is_file():
        replace_section(page, f"gate-audit-{setting}", text)
    print(text)


if __name__ == "__main__":
    main()
