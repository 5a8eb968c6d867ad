"""Does the active-learning ranking point at the cases the student gets wrong? On the embedded data the
unlabelled cases keep hidden labels, so the ranking's score can be correlated with the student's
actual error (1 - mean foreground Dice) case by case.

    python -m research.bench.active_learning [--seeds 0 1 2]

For the sweep's UnCoL runs with 10 % labels (``research/work/sweep/2d/fraction_0.1/seed<k>/uncol``):
runs ``active_learning.json`` (``rank``) there, scores the student (``models/model.pt``) on every
ranked case, and prints the Spearman correlations as a table; writes the "active-learning" section
of results.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from custom.handlers.checkpoints import student_state
from research.bench.report import replace_section
from research.bench.sweep import CONFIGS, DOCS, commit

ROOT = Path(__file__).resolve().parents[2]


DEFAULT_ROOT = ROOT / "research" / "work" / "sweep" / "2d" / "fraction_0.1" / "seed0" / "uncol"


def student_errors(bundle_root: Path, overrides: dict, cases: list[dict]) -> dict[str, float]:
    """1 - mean foreground Dice of the student on each case, against its hidden label (labelsTr/)."""
    import torch
    from monai.bundle import ConfigParser
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot
    from monai.transforms import Compose, DivisiblePadd

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(overrides)
    network = parser.get_parsed_content("network").eval()
    network.load_state_dict(student_state(bundle_root / "models" / "model.pt"))
    transform = Compose(
        [*parser.get_parsed_content("train#deterministic_transforms"), DivisiblePadd(["image", "label"], 16)]
    )
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    errors = {}
    for case in cases:
        image = Path(case["image"])
        item = transform({"image": str(image), "label": str(image.parent.parent / "labelsTr" / image.name)})
        with torch.no_grad():
            pred = network(item["image"][None].as_tensor()).argmax(1, keepdim=True)
        scores = dice(one_hot(pred, 3), one_hot(item["label"][None].as_tensor().long(), 3))[0]
        errors[case["image"]] = 1.0 - float(torch.nanmean(scores))
    return errors


def check_run(root: Path, run_json: Path) -> dict:
    """Rank one trained run's unlabelled cases and correlate the score with its student's error."""
    from monai.bundle import run
    from scipy.stats import spearmanr

    overrides = {**json.loads(run_json.read_text())["stage2_overrides"], "bundle_root": str(root)}
    run("rank", config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "active_learning.json")], **overrides)
    cases = json.loads((root / "eval" / "active_learning.json").read_text())["cases"]
    errors = student_errors(root, overrides, cases)
    errs = [errors[c["image"]] for c in cases]
    result = {"cases": len(cases)}
    for part in ("score", "entropy", "disagreement"):
        rho, p = spearmanr([c[part] for c in cases], errs)
        result[part] = {"rho": float(rho), "p": float(p)}
    top = len(cases) // 5
    result["top_fifth_error"] = sum(errs[:top]) / top
    result["rest_error"] = sum(errs[top:]) / (len(errs) - top)
    (root / "eval" / "active_learning_check.json").write_text(
        json.dumps({**result, "errors": errors, "ranking": cases}, indent=2)
    )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the sweep's 10 %% UnCoL runs")
    parser.add_argument("--results-md", default=str(DOCS / "results.md"))
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        root = DEFAULT_ROOT.parents[1] / f"seed{seed}" / "uncol"
        run_json = DOCS / "results" / "runs" / "2d" / f"0.1_uncol_seed{seed}.json"
        r = check_run(root, run_json)
        rows.append(
            f"| {seed} | {r['cases']} | {r['score']['rho']:.2f} (p = {r['score']['p']:.2g}) | "
            f"{r['entropy']['rho']:.2f} | {r['disagreement']['rho']:.2f} | "
            f"{r['top_fifth_error']:.3f} / {r['rest_error']:.3f} |"
        )
    text = "\n".join(
        [
            f"`python -m research.bench.active_learning` (commit {commit()}): for each seed of the sweep's 10 % UnCoL "
            "run, "
            "the EMA and LiteMedSAM teachers rank the unlabelled cases (`python -m monai.bundle run rank "
            "--config_file \"['bundle/configs/train.json','bundle/configs/active_learning.json']\"`, the same "
            "score MONAI Label's `uncol_monai_uncertainty` strategy uses), and the score is correlated (Spearman) "
            "with that run's student error on each case (1 - mean foreground Dice against the hidden labels).",
            "",
            "| seed | cases | rho(score, error) | rho(entropy part) | rho(disagreement part) "
            "| mean error: top fifth / rest |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    replace_section(Path(args.results_md), "active-learning", text)
    print(text)


if __name__ == "__main__":
    main()
