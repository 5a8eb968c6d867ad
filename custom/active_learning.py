"""Which unlabelled case should a clinician label next? UnCoL already knows where its two teachers are
unsure or disagree; ranking unlabelled cases by that points at the cases the student gets wrong.

Score of a case (higher = label it sooner): the teachers' disagreement, ``1 - Dice`` between their
masks averaged over the foreground classes either of them predicts (scale-free, like the per-class
Dice a user is judged by, so a missed small lesion counts as much as a shifted organ), plus their mean
Shannon entropy (normalised by ``ln C`` to [0, 1]) over the voxels where either predicts foreground.
A case where neither teacher sees any structure scores 1 (nothing found is itself suspicious).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from custom.handlers.checkpoints import student_state
from custom.losses.pseudo_label import shannon_entropy


def uncertainty_score(spec: torch.Tensor, gen: torch.Tensor) -> dict[str, float]:
    """``(C, *S)`` class probabilities of the specialized and generalized teacher for one case."""
    num_classes = spec.shape[0]
    pred_s, pred_g = spec.argmax(0), gen.argmax(0)
    region = (pred_s > 0) | (pred_g > 0)
    if not region.any():
        return {"score": 1.0, "entropy": 1.0, "disagreement": 0.0, "region_voxels": 0}
    norm = math.log(num_classes)
    entropy = 0.5 * (shannon_entropy(spec[None])[0, 0] + shannon_entropy(gen[None])[0, 0]) / norm
    mean_entropy = float(entropy[region].mean())
    gaps = []
    for c in range(1, num_classes):
        s, g = pred_s == c, pred_g == c
        total = int(s.sum() + g.sum())
        if total:
            gaps.append(1.0 - 2.0 * float((s & g).sum()) / total)
    disagreement = sum(gaps) / len(gaps)
    return {
        "score": mean_entropy + disagreement,
        "entropy": mean_entropy,
        "disagreement": disagreement,
        "region_voxels": int(region.sum()),
    }


@torch.no_grad()
def rank_cases(
    items: Iterable[dict], specialized: torch.nn.Module, generalized, device: torch.device | str = "cpu"
) -> list[dict]:
    """Score every ``{"image": (1, *S)}`` item (with its ``filename_or_obj`` meta) and sort, most uncertain
    first. The generalized teacher is prompted with boxes from the specialized teacher's prediction, as
    in stage 2."""
    specialized.eval()
    ranking = []
    for item in items:
        image = torch.as_tensor(item["image"])[None].float().to(device)
        spec = torch.softmax(specialized(image).float(), 1)
        prompts = generalized.make_prompts(spec)  # its softmax: the regions are its argmax
        gen = generalized(image, prompts=prompts, with_fusion=False, with_features=False).probs.to(spec)
        name = str(getattr(item["image"], "meta", {}).get("filename_or_obj", len(ranking)))
        ranking.append({"image": name, **uncertainty_score(spec[0].cpu(), gen[0].cpu())})
    ranking.sort(key=lambda r: r["score"], reverse=True)
    for i, r in enumerate(ranking):
        r["rank"] = i + 1
    return ranking


def specialized_checkpoint(ckpt_dir: str | Path) -> Path:
    """Where the specialized teacher is read from: stage 2's training state ``stage2_last.pt`` (its EMA
    teacher) when the run left one, else the best student ``model.pt`` (all a shipped bundle carries)."""
    last = Path(ckpt_dir) / "stage2_last.pt"
    return last if last.is_file() else Path(ckpt_dir) / "model.pt"


def load_specialized(network: torch.nn.Module, checkpoint: str | Path) -> torch.nn.Module:
    """The specialized (EMA) teacher from stage 2's ``stage2_last.pt`` (key ``ema``), else the student
    weights of a plain state dict (``model.pt``)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    network.load_state_dict(state["ema"] if "ema" in state else student_state(checkpoint), strict=True)
    return network


def write_ranking(ranking: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"order": "most uncertain first", "cases": ranking}, indent=2))
    tmp.replace(path)
    return path
