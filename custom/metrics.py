"""Metrics that MONAI's Ignite handlers wrap, adjusted for physical units."""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric


class PhysicalHausdorffDistanceMetric(HausdorffDistanceMetric):
    """MONAI's Hausdorff distance in millimetres: each image's voxel spacing is read from the label's
    MetaTensor affine, since MONAI's Ignite handler passes only ``(y_pred, y)`` and would measure voxels.
    An explicit ``spacing=`` keyword still wins."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if "spacing" not in kwargs and isinstance(y, MetaTensor):
            pixdim = y.pixdim
            kwargs["spacing"] = [p.tolist() for p in pixdim] if y.is_batch else pixdim.tolist()
        return super()._compute_tensor(y_pred, y, **kwargs)
