import pytest
import torch

from custom.losses.distillation import SemanticDistillationLoss, VisualDistillationLoss, pool_to_grid
from custom.networks.adapter import KnowledgeAdapter
from custom.networks.student import UnCoLStudent

TINY = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 2, "feature_size": 8}


def _overfit(student, loss_fn, compute, steps=40):
    params = list(student.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = compute()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_visual_loss_decreases_when_overfitting():
    torch.manual_seed(0)
    student = UnCoLStudent(spatial_dims=2, **TINY)
    image = torch.randn(2, 1, 32, 32)
    teacher = {"enc1": torch.randn(2, 20, 16, 16), "enc2": torch.randn(2, 12, 16, 16)}
    loss_fn = VisualDistillationLoss(2, 48, {"layer1": "enc1", "layer3": "enc2"}, {"enc1": 20, "enc2": 12})
    losses = _overfit(student, loss_fn, lambda: loss_fn(student.forward_features(image), teacher))
    assert losses[-1] < 0.5 * losses[0]


def test_semantic_loss_decreases_and_ignores_abstained_classes():
    torch.manual_seed(0)
    student = UnCoLStudent(spatial_dims=2, **TINY)
    image = torch.randn(2, 1, 32, 32)
    fusion = torch.randn(2, 2, 32, 8, 8)
    valid = torch.tensor([[True, True], [True, False]])
    loss_fn = SemanticDistillationLoss(student_dim=48, num_classes=2, teacher_dim=32, num_heads=2)
    losses = _overfit(student, loss_fn, lambda: loss_fn(student.forward_features(image), fusion, valid))
    assert losses[-1] < 0.5 * losses[0]
    # an abstained class has no target: changing its fusion features changes nothing
    feats = student.forward_features(image)
    other = fusion.clone()
    other[1, 1] = torch.randn(32, 8, 8)
    assert torch.allclose(loss_fn(feats, fusion, valid), loss_fn(feats, other, valid))
    nothing = loss_fn(feats, fusion, torch.zeros(2, 2, dtype=torch.bool))
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_adapter_works_in_3d_and_pooling_matches_grids():
    adapter = KnowledgeAdapter(student_dim=48, teacher_dim=256, num_classes=2)
    out = adapter(torch.randn(1, 48, 2, 3, 2))
    assert out.shape == (1, 2, 256, 2, 3, 2)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(pool_to_grid(x, (4, 4)), x)
    assert pool_to_grid(x, (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_projection_direction_target_cannot_be_met_by_shrinking():
    """1 - cos is scale-free: a zero prediction is not a minimum."""
    loss_fn = VisualDistillationLoss(2, 8, {"layer1": "enc1"}, {"enc1": 4})
    for p in loss_fn.parameters():
        torch.nn.init.zeros_(p)
    loss = loss_fn({"layer1": torch.randn(1, 8, 2, 2)}, {"enc1": torch.randn(1, 4, 2, 2)})
    assert loss.item() == pytest.approx(1.0)
