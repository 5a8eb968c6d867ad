"""Pseudo-label audit: scores of the gate's decisions against hidden labels, on hand-built maps."""

import math

import pytest
import torch
from conftest import TINY_NET
from ignite.engine import Engine

from custom.handlers.pseudo_label_audit import PseudoLabelAudit, audit_pseudo_labels, soft_gate_confidence
from custom.losses.pseudo_label import EntropyGate

CERTAIN = [0.98, 0.01, 0.01]
UNSURE = [0.4, 0.3, 0.3]


def _maps(rows: list[list[float]]) -> torch.Tensor:
    """One image of ``len(rows)`` voxels in a row: ``(1, 3, 1, N)`` probabilities."""
    return torch.tensor(rows).T.reshape(1, 3, 1, len(rows))


def _cls(c: int) -> list[float]:
    return [CERTAIN[(i - c) % 3] for i in range(3)]


def test_audit_scores_kept_and_rejected_voxels_and_catches_shared_confident_errors():
    # voxel 0: both certain of class 1, truth 1 (kept, right)
    # voxel 1: specialized unsure, generalized certain of 2, truth 2 (kept from the generalized, right)
    # voxel 2: both certain of class 1, truth 2 (kept, wrong: both confidently wrong)
    # voxel 3: both unsure (argmax 0), truth 1 (rejected, wrong)
    spec = _maps([_cls(1), UNSURE, _cls(1), UNSURE])
    gen = _maps([_cls(1), _cls(2), _cls(1), UNSURE])
    truth = torch.tensor([[[1, 2, 2, 1]]])
    threshold = 0.5 * math.log(3)
    gated = EntropyGate("both")(spec, gen, threshold)
    out = audit_pseudo_labels(spec, gen, gated, truth, threshold)
    assert out["kept"] == pytest.approx(0.75)
    assert out["kept_accuracy"] == pytest.approx(2 / 3)
    assert out["rejected_accuracy"] == 0.0
    assert out["kept_accuracy_fg"] == pytest.approx(2 / 3) and out["rejected_accuracy_fg"] == 0.0
    assert out["generalized_supplied_accuracy_fg"] == 1.0  # only voxel 1
    assert out["specialized_supplied_accuracy_fg"] == pytest.approx(0.5)  # voxels 0 and 2 (tie -> specialized)
    assert out["both_confidently_wrong"] == pytest.approx(0.25)


def test_audit_counts_a_soft_gates_voxels_by_their_weight():
    # voxel 0: both certain of class 1, truth 1 (weight near 1, right); voxel 1: both unsure of class 0,
    # truth 1 (weight near 0, wrong); a hard cut would call voxel 1 kept (weight > 0) and the gate perfect
    spec = gen = _maps([_cls(1), UNSURE])
    truth = torch.tensor([[[1, 1]]])
    gated = EntropyGate("both", "soft")(spec, gen, 0.0)
    w = gated.mask.flatten()
    assert 0.0 < w[1] < 0.1 and 0.8 < w[0] < 1.0
    out = audit_pseudo_labels(spec, gen, gated, truth, soft_gate_confidence(spec))
    assert out["kept"] == pytest.approx(float(w.mean()))
    assert out["kept_accuracy_fg"] == pytest.approx(float(w[0] / w.sum()))
    assert out["rejected_accuracy_fg"] == pytest.approx(float((1 - w[0]) / (2 - w.sum())))
    assert soft_gate_confidence(spec) == pytest.approx(0.5 * math.log(3))


def test_audit_handler_records_without_touching_training_counters(tmp_path, lite_teacher):
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import PseudoLabelLoss
    from custom.networks.student import UnCoLStudent

    torch.manual_seed(0)
    ema = UnCoLStudent(spatial_dims=2, **{k.split("#")[1]: v for k, v in TINY_NET.items()})
    iteration = SemiSupervisedIteration(EntropyGate("both"), PseudoLabelLoss(), ema, lite_teacher)
    images, labels = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    audit = PseudoLabelAudit(iteration, images, labels, interval=2, output_file=tmp_path / "audit.jsonl")
    engine = Engine(lambda e, b: None)
    engine.state.device = torch.device("cpu")
    engine.state.gate_threshold = 0.9
    audit.attach(engine)
    engine.run([0] * 5, max_epochs=1)
    assert [r["iteration"] for r in audit.records] == [2, 4, 5]  # every 2 iterations and at the end
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 3
    assert iteration.generalized_calls == 0 and iteration.generalized_reused == 0
    spec, gen = iteration.teacher_probs(images)  # the audit's figures are the gate's on these images
    gated = iteration.gate(spec, gen, 0.9)
    assert audit.records[-1]["kept"] == pytest.approx(float(gated.mask.mean()))
    assert 0.0 < audit.records[-1]["kept"] < 1.0 and "both_confidently_wrong" in audit.records[-1]


def test_the_audit_of_hidden_labels_as_configs_build_it_records_the_quantile_gates_cut(tmp_path, tiny_dataset):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from custom.data.phantoms import hidden_label_items
    from custom.engines.uncol import SemiSupervisedIteration
    from custom.losses.pseudo_label import PseudoLabelLoss

    items = hidden_label_items(tiny_dataset, limit=2)
    assert [i["label"].replace("labelsTr", "imagesTr") for i in items] == [i["image"] for i in items]
    ema = torch.nn.Conv2d(1, 3, 1)
    iteration = SemiSupervisedIteration(EntropyGate("specialized", "quantile"), PseudoLabelLoss(), ema)
    transform = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"])])
    audit = PseudoLabelAudit.of_items(iteration, items, transform, interval=1)
    assert audit.images.shape == (2, 1, 32, 32) and audit.labels.shape == (2, 32, 32)
    iteration.set_schedule("keep_fraction", 0.5)
    engine = Engine(lambda e, b: None)
    engine.state.device = torch.device("cpu")
    audit.attach(engine)
    engine.run([0], max_epochs=1)
    record = audit.records[-1]
    spec, _, gated = iteration.pseudo_labels(audit.images)
    assert record["keep_fraction"] == 0.5 and record["kept"] == pytest.approx(0.5, abs=0.02)
    # a teacher counts as confident under the largest entropy the quantile gate kept, not under 0.5 nats
    assert record["threshold"] == pytest.approx(float(gated.entropy[gated.mask.bool()].max()))
