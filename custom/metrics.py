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


def calibration_bins(
    probs: torch.Tensor, truth: torch.Tensor, num_bins: int = 15, where: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Reliability-diagram bins of ``(B, C, *S)`` class probabilities against ``(B, *S)`` class indices:
    per confidence bin (equal width over [0, 1]) the voxel count, mean confidence and accuracy of the
    top class. ``where`` (``(B, *S)`` bool) restricts the voxels counted."""
    confidence, pred = probs.max(1)
    correct = (pred == truth).float()
    if where is not None:
        confidence, correct = confidence[where], correct[where]
    confidence, correct = confidence.flatten().double(), correct.flatten().double()
    index = (confidence * num_bins).long().clamp(max=num_bins - 1)
    count = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return {"count": count, "confidence": conf_sum / safe, "accuracy": correct_sum / safe}


def expected_calibration_error(bins: dict[str, torch.Tensor]) -> float:
    """ECE: the count-weighted mean gap between accuracy and confidence over the bins of :func:`calibration_bins`."""
    total = bins["count"].sum()
    if total == 0:
        return float("nan")
    return float((bins["count"] * (bins["accuracy"] - bins["confidence"]).abs()).sum() / total)
