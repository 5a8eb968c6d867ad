"""Prompts for the generalized teacher, derived from label maps (ground truth in stage 1, the
specialized teacher's prediction in stage 2).

Coordinates follow Segment Anything: ``x`` runs along the last (width) axis, ``y`` along the
second-last (height) axis, in pixels of the 2D image the prompt belongs to. A class absent from an
image gets no prompt: its ``valid`` flag is False and the teacher abstains for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Prompts:
    """Per-image, per-foreground-class prompts for a batch of 2D images.

    ``boxes``: ``(B, C, 4)`` as ``x0, y0, x1, y1``; ``points``: ``(B, C, 2)`` as ``x, y`` (one
    positive point per class); ``valid``: ``(B, C)`` bool, False where the class is absent.
    Either of ``boxes``/``points`` may be None; C counts foreground classes only.
    """

    valid: torch.Tensor
    boxes: torch.Tensor | None = None
    points: torch.Tensor | None = None

    def __getitem__(self, index: slice | torch.Tensor) -> Prompts:
        return Prompts(
            self.valid[index],
            None if self.boxes is None else self.boxes[index],
            None if self.points is None else self.points[index],
        )


def _as_label_maps(labels: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` or ``(B, H, W)`` integer labels (one-hot ``(B, K, H, W)`` is argmaxed)."""
    if labels.ndim != 4 and labels.ndim != 3:
        raise ValueError(f"expected 2D label maps (B, [1,] H, W), got shape {tuple(labels.shape)}")
    if labels.ndim == 4:
        labels = labels[:, 0] if labels.shape[1] == 1 else labels.argmax(1)
    return labels.long()


def prompts_from_labels(
    labels: torch.Tensor,
    num_classes: int,
    box_jitter: float = 0.0,
    with_boxes: bool = True,
    with_points: bool = False,
    generator: torch.Generator | None = None,
) -> Prompts:
    """Per-class prompts from label maps.

    Args:
        labels: ``(B, 1, H, W)``/``(B, H, W)`` class indices, or ``(B, K, H, W)`` one-hot/probabilities.
        num_classes: classes including background; prompts are made for classes ``1..num_classes-1``.
        box_jitter: each box edge moves by up to this fraction of the box's size (uniform, either way),
            clipped to the image: the imprecise boxes a user would draw.
        with_boxes, with_points: which prompt types to make; a point is a random pixel of the class.
        generator: random source for jitter and points (seed it for repeatable prompts).
    """
    maps = _as_label_maps(labels)
    b, h, w = maps.shape
    c = num_classes - 1
    valid = torch.zeros(b, c, dtype=torch.bool, device=maps.device)
    boxes = torch.zeros(b, c, 4, device=maps.device) if with_boxes else None
    points = torch.zeros(b, c, 2, device=maps.device) if with_points else None
    for i in range(b):
        for k in range(c):
            ys, xs = torch.nonzero(maps[i] == k + 1, as_tuple=True)
            if ys.numel() == 0:
                continue
            valid[i, k] = True
            if boxes is not None:
                box = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
                if box_jitter > 0:
                    size = (box[2:] - box[:2] + 1).repeat(2)
                    noise = torch.rand(4, generator=generator) * 2 - 1
                    box = box + noise.to(box) * box_jitter * size
                    box = torch.minimum(box.clamp(min=0), torch.tensor([w - 1, h - 1, w - 1, h - 1]).to(box))
                    box = torch.cat([torch.minimum(box[:2], box[2:]), torch.maximum(box[:2], box[2:])])
                boxes[i, k] = box
            if points is not None:
                j = int(torch.randint(ys.numel(), (1,), generator=generator))
                points[i, k] = torch.stack([xs[j], ys[j]]).float()
    return Prompts(valid, boxes, points)
