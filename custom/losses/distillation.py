"""Dual-path knowledge distillation losses of UnCoL stage 1.

Both paths compare feature directions, not magnitudes (1 - cosine similarity per token, averaged):
the teacher's features have arbitrary scales per stage, and a direction target cannot be met by
shrinking everything to zero. Teacher maps are area-pooled to the student's token grid first.
Each loss owns its training-only parameters (projections, adapter), so switching a path off removes
its term and its parameters together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from custom.networks.adapter import FeatureProjection, KnowledgeAdapter


def pool_to_grid(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Area-pool ``(B, C, *S)`` to ``(B, C, *grid)`` (identity when the grids already match)."""
    if tuple(x.shape[2:]) == tuple(grid):
        return x
    pool = F.adaptive_avg_pool2d if len(grid) == 2 else F.adaptive_avg_pool3d
    return pool(x, tuple(grid))


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between channel vectors (dim 1) per token, ``(B, *grid)``."""
    return 1.0 - F.cosine_similarity(pred, target.to(pred.dtype), dim=1, eps=1e-6)


class VisualDistillationLoss(nn.Module):
    """Visual path: student transformer layers -> learned projections -> teacher encoder stages.

    Args:
        spatial_dims: 2 or 3.
        student_dim: channels of the student's transformer features.
        pairs: ``{student feature name: teacher feature name}``, e.g. ``{"layer1": "enc1", ...}``.
        teacher_channels: channels of each teacher feature.
    """

    def __init__(
        self, spatial_dims: int, student_dim: int, pairs: dict[str, str], teacher_channels: dict[str, int]
    ) -> None:
        super().__init__()
        self.pairs = dict(pairs)
        self.projections = nn.ModuleDict(
            {s: FeatureProjection(spatial_dims, student_dim, teacher_channels[t]) for s, t in self.pairs.items()}
        )

    def forward(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = []
        for s, t in self.pairs.items():
            pred = self.projections[s](student[s])
            losses.append(cosine_distance(pred, pool_to_grid(teacher[t], pred.shape[2:])).mean())
        return torch.stack(losses).mean()


class SemanticDistillationLoss(nn.Module):
    """Semantic path: the student's last-layer features, through the :class:`KnowledgeAdapter`,
    aligned with the teacher's image-prompt fusion features of every prompted class.

    Classes the teacher abstained on (``valid`` False) carry no target and are left out.

    Args:
        student_dim: channels of the student's last transformer layer.
        num_classes: foreground classes.
        teacher_dim: channels of the fusion features (256 for SAM-family decoders).
        student_layer: name of the student feature the adapter reads.
        num_heads: adapter attention heads.
    """

    def __init__(
        self,
        student_dim: int,
        num_classes: int,
        teacher_dim: int = 256,
        student_layer: str = "layer4",
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        self.student_layer = student_layer
        self.adapter = KnowledgeAdapter(student_dim, teacher_dim, num_classes, num_heads)

    def forward(self, student: dict[str, torch.Tensor], fusion: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``fusion``: ``(B, C, D_t, *S)``; ``valid``: ``(B, C)`` bool."""
        pred = self.adapter(student[self.student_layer])  # (B, C, D_t, *grid)
        b, c = pred.shape[:2]
        target = pool_to_grid(fusion.flatten(0, 1), pred.shape[3:]).reshape(b, c, *pred.shape[2:])
        per_class = cosine_distance(pred.flatten(0, 1), target.flatten(0, 1)).flatten(1).mean(1).reshape(b, c)
        weight = valid.to(per_class.dtype)
        if weight.sum() == 0:
            return per_class.sum() * 0.0  # nothing prompted in this batch: no target, keep the graph
        return (per_class * weight).sum() / weight.sum()
