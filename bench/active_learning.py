"""Does the active-learning ranking point at the cases the student gets wrong? On the embedded data the
unlabelled cases keep hidden labels, so the ranking's score can be correlated with the student's
actual error (1 - mean foreground Dice) case by case.

    python bench/active_learning.py [--bundle-root <a trained stage 2 folder>]

Default folder: the sweep's UnCoL run with 10 % labels, seed 0 (``bundle/eval/sweep/2d/...``). Runs
``active_learning.json`` (``rank``) there, scores the student (``models/model.pt``) on every ranked
case, and prints the Spearman correlation; writes the "active-learning" section of results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import replace_section  # noqa: E402
from bench.sweep import CONFIGS, DOCS, commit  # noqa: E402

DEFAULT_ROOT = ROOT / "bundle" / "eval" / "sweep" / "2d" / "fraction_0.1" / "seed0" / "uncol"


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
    network.load_state_dict(torch.load(bundle_root / "models" / "model.pt", map_location="cpu", weights_only=True))
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


def main(argv: list[str] | None = None) -> None:
    from monai.bundle import run
    from scipy.stats import spearmanr

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle-root", default=str(DEFAULT_ROOT))
    parser.add_argument("--run-json", default=str(DOCS / "results" / "runs" / "2d" / "0.1_uncol_seed0.json"),
                        help="the sweep's record of that run (its data, seed and network overrides)")  # fmt: skip
    parser.add_argument("--results-md", default=str(DOCS / "results.md"))
    args = parser.parse_args(argv)
    root = Path(args.bundle_root)
    overrides = {**json.loads(Path(args.run_json).read_text())["stage2_overrides"], "bundle_root": str(root)}
    run("rank", config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "active_learning.json")], **overrides)
    cases = json.loads((root / "eval" / "active_learning.json").read_text())["cases"]
    errors = student_errors(root, overrides, cases)
    scores = [c["score"] for c in cases]
    errs = [errors[c["image"]] for c in cases]
    rho, p = spearmanr(scores, errs)
    top = len(cases) // 5
    top_err = sum(errs[:top]) / top
    rest_err = sum(errs[top:]) / (len(errs) - top)
    text = (
        f"`python bench/active_learning.py` (commit {commit()}): the UnCoL student of the sweep's 10 % / seed 0 run "
        f"and its EMA and LiteMedSAM teachers rank the {len(cases)} unlabelled cases "
        "(`python -m monai.bundle run rank --config_file "
        "\"['bundle/configs/train.json','bundle/configs/active_learning.json']\"`). "
        f"Spearman correlation between the ranking score and the student's error (1 - mean foreground Dice "
        f"against the hidden labels): **rho = {rho:.2f}** (p = {p:.1g}). The top fifth of the ranking "
        f"({top} cases) has mean error {top_err:.3f}, the rest {rest_err:.3f}."
    )
    (root / "eval" / "active_learning_check.json").write_text(
        json.dumps({"spearman_rho": rho, "p": p, "errors": errors, "cases": cases}, indent=2)
    )
    replace_section(Path(args.results_md), "active-learning", text)
    print(text)


if __name__ == "__main__":
    main()
