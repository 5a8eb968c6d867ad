"""Active learning: unlabelled cases ranked by the teachers' uncertainty and disagreement."""

from __future__ import annotations

import json

import torch
from conftest import CONFIGS, TINY_NET, tiny_train_overrides
from monai.bundle import run

from custom.active_learning import uncertainty_score


def _probs(labels: list[int], confidence: float) -> torch.Tensor:
    """``(3, 1, N)`` probabilities putting ``confidence`` on each voxel's label."""
    out = torch.full((3, 1, len(labels)), (1 - confidence) / 2)
    for i, c in enumerate(labels):
        out[c, 0, i] = confidence
    return out


def test_confident_agreeing_teachers_score_below_unsure_or_disagreeing_ones():
    agree = uncertainty_score(_probs([0, 1, 1, 2], 0.98), _probs([0, 1, 1, 2], 0.98))
    unsure = uncertainty_score(_probs([0, 1, 1, 2], 0.5), _probs([0, 1, 1, 2], 0.5))
    disagree = uncertainty_score(_probs([0, 1, 1, 2], 0.98), _probs([0, 1, 2, 1], 0.98))
    # organ: teachers' masks {1, 2} and {1, 3} (Dice 0.5); lesion: {3} and {2} (Dice 0): mean 1 - Dice 0.75
    assert agree["disagreement"] == 0.0 and abs(disagree["disagreement"] - 0.75) < 1e-6
    assert agree["score"] < unsure["score"] and agree["score"] < disagree["score"]
    assert uncertainty_score(_probs([0, 0], 0.9), _probs([0, 0], 0.9))["score"] == 1.0  # nothing found


def test_rank_run_writes_every_unlabelled_case_most_uncertain_first(tmp_path):
    from custom.networks.student import UnCoLStudent

    overrides = tiny_train_overrides(tmp_path)
    run(
        "pretrain",
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "pretrain.json")],
        distillation="none",
        **overrides,
    )  # fmt: skip  (makes the tiny dataset)
    net = UnCoLStudent(spatial_dims=2, **{k.split("#")[1]: v for k, v in TINY_NET.items()})
    record = torch.load(tmp_path / "models" / "pretrain.pt", weights_only=True)["record"]  # its plan too
    state = {"ema": net.state_dict(), "model": net.state_dict(), "record": record}
    torch.save(state, tmp_path / "models" / "stage2_last.pt")
    run("rank", config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "active_learning.json")], **overrides)
    result = json.loads((tmp_path / "eval" / "active_learning.json").read_text())
    datalist = json.loads((tmp_path / "data" / "phantom2d" / "datalist.json").read_text())
    cases = result["cases"]
    assert len(cases) == len(datalist["unlabeled"]) == 2
    assert [c["rank"] for c in cases] == [1, 2] and cases[0]["score"] >= cases[1]["score"]
    assert all(c["image"].endswith(".nii.gz") for c in cases)


def test_the_specialized_teacher_falls_back_to_the_best_student(tmp_path):
    """A shipped bundle carries model.pt only: ranking scores with it; stage 2's state wins when present."""
    from custom.active_learning import specialized_checkpoint

    assert specialized_checkpoint(tmp_path) == tmp_path / "model.pt"
    (tmp_path / "stage2_last.pt").write_bytes(b"state")
    assert specialized_checkpoint(tmp_path) == tmp_path / "stage2_last.pt"
