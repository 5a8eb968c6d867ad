"""Prompts for the generalized teacher, derived from label maps (ground truth in stage 1, the
specialized teacher's prediction in stage 2).

Coordinates follow Segment Anything: ``x`` runs along the last (width) axis, ``y`` along the
second-last (height) axis, in pixels of the 2D image the prompt belongs to. A class absent from an
image gets no prompt: its ``valid`` flag is False and the teacher abstains for it.

Two layouts (``box_mode``):

- ``"class"`` (default): one box (and/or point) per class, around all of the class's pixels in the
  image. Boxes are ``(B, C, 4)``.
- ``"component"``: one box per 2D connected component (8-connectivity) of each class, so two lesions
  of one class, or a left and a right structure that share a label, get a box each instead of one box
  spanning both and the tissue between. Components smaller than ``min_component_size`` pixels get no
  prompt; of the rest, the ``max_components`` largest are kept, largest first (ties in raster order of
  their first pixel). Boxes are ``(B, C, M, 4)`` with ``M = max_components`` slots per class and
  ``components`` ``(B, C, M)`` marks the used slots (unused slots hold zeros). ``valid`` is True for a
  class with at least one used slot.

Prompts only from confident regions (``min_confidence`` > 0): when the labels are class
probabilities ``(B, K, H, W)`` (stage 2's EMA-teacher softmax), the pixels of each class are those
where it is the argmax, and a region (the class's whole region in class mode, a component in component
mode) gets a prompt only if the mean probability of its class over the region is at least
``min_confidence``; a region below it is treated as absent (abstention). Hard labels (class indices or
one-hot maps) count as probability 1 everywhere, so the filter keeps all of their regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

BOX_MODES = ("class", "component")

#: 8-connectivity in 2D: diagonal neighbours belong to the same component
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


@dataclass
class Prompts:
    """Per-image, per-foreground-class prompts for a batch of 2D images.

    ``valid``: ``(B, C)`` bool, False where the class has no prompt (absent, or all its regions filtered).
    One prompt per class (``components`` None): ``boxes`` ``(B, C, 4)`` as ``x0, y0, x1, y1``, ``points``
    ``(B, C, 2)`` as ``x, y`` (one positive point per class). One prompt per connected component:
    ``components`` ``(B, C, M)`` bool marks the used slots, ``boxes`` ``(B, C, M, 4)``, ``points``
    ``(B, C, M, 2)``. Either of ``boxes``/``points`` may be None; C counts foreground classes only.
    """

    valid: torch.Tensor
    boxes: torch.Tensor | None = None
    points: torch.Tensor | None = None
    components: torch.Tensor | None = None

    def __getitem__(self, index: slice | torch.Tensor) -> Prompts:
        def part(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[index]

        return Prompts(self.valid[index], part(self.boxes), part(self.points), part(self.components))

    def prompt_index(self) -> tuple[torch.Tensor, ...]:
        """Indices of every prompt: ``(images, classes)`` for one prompt per class, ``(images, classes,
        components)`` for one per component; ``boxes[index]`` / ``points[index]`` are then ``(P, 4)`` / ``(P, 2)``."""
        used = self.valid if self.components is None else self.components
        return torch.nonzero(used, as_tuple=True)


def _as_label_maps(labels: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` or ``(B, H, W)`` integer labels (one-hot ``(B, K, H, W)`` is argmaxed)."""
    if labels.ndim != 4 and labels.ndim != 3:
        raise ValueError(f"expected 2D label maps (B, [1,] H, W), got shape {tuple(labels.shape)}")
    if labels.ndim == 4:
        labels = labels[:, 0] if labels.shape[1] == 1 else labels.argmax(1)
    return labels.long()


def _class_probabilities(labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """``(B, K, H, W)`` probabilities when ``labels`` are multi-channel, else None (hard labels: probability 1)."""
    if labels.ndim != 4 or labels.shape[1] == 1:
        return None
    if labels.shape[1] != num_classes:
        raise ValueError(f"class probabilities need {num_classes} channels, got {labels.shape[1]}")
    return labels.float()


def _jitter(box: torch.Tensor, box_jitter: float, hw: tuple[int, int], generator: torch.Generator | None):
    """Move each edge of ``box`` by up to ``box_jitter`` of the box's size, clipped to the image."""
    h, w = hw
    size = (box[2:] - box[:2] + 1).repeat(2)
    noise = torch.rand(4, generator=generator) * 2 - 1
    box = box + noise.to(box) * box_jitter * size
    box = torch.minimum(box.clamp(min=0), torch.tensor([w - 1, h - 1, w - 1, h - 1]).to(box))
    return torch.cat([torch.minimum(box[:2], box[2:]), torch.maximum(box[:2], box[2:])])


def prompts_from_labels(
    labels: torch.Tensor,
    num_classes: int,
    box_jitter: float = 0.0,
    with_boxes: bool = True,
    with_points: bool = False,
    generator: torch.Generator | None = None,
    box_mode: str = "class",
    min_component_size: int = 4,
    max_components: int = 4,
    min_confidence: float = 0.0,
) -> Prompts:
    """Per-class (or per-component) prompts from label maps (see the module docstring).

    Args:
        labels: ``(B, 1, H, W)``/``(B, H, W)`` class indices, or ``(B, K, H, W)`` one-hot/probabilities.
        num_classes: classes including background; prompts are made for classes ``1..num_classes-1``.
        box_jitter: each box edge moves by up to this fraction of the box's size (uniform, either way),
            clipped to the image: the imprecise boxes a user would draw.
        with_boxes, with_points: which prompt types to make; a point is a random pixel of the class
            (of the component in component mode).
        generator: random source for jitter and points (seed it for repeatable prompts).
        box_mode: ``class`` (one prompt per class) or ``component`` (one per connected component).
        min_component_size: component mode: components with fewer pixels get no prompt.
        max_components: component mode: prompt slots per class (the largest components are kept).
        min_confidence: a region gets a prompt only if its class's mean probability over it is at least
            this (0: off; only multi-channel ``labels`` carry probabilities below 1).
    """
    if box_mode not in BOX_MODES:
        raise ValueError(f"box_mode must be one of {BOX_MODES}, got {box_mode!r}")
    class_probs = _class_probabilities(labels, num_classes) if min_confidence > 0 else None
    maps = _as_label_maps(labels)
    if box_mode == "component":
        return _component_prompts(
            maps, class_probs, num_classes, box_jitter, with_boxes, with_points, generator,
            min_component_size, max_components, min_confidence,
        )  # fmt: skip
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
            if class_probs is not None and float(class_probs[i, k + 1, ys, xs].mean()) < min_confidence:
                continue
            valid[i, k] = True
            if boxes is not None:
                box = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
                if box_jitter > 0:
                    box = _jitter(box, box_jitter, (h, w), generator)
                boxes[i, k] = box
            if points is not None:
                j = int(torch.randint(ys.numel(), (1,), generator=generator))
                points[i, k] = torch.stack([xs[j], ys[j]]).float()
    return Prompts(valid, boxes, points)


def _component_prompts(
    maps: torch.Tensor,
    class_probs: torch.Tensor | None,
    num_classes: int,
    box_jitter: float,
    with_boxes: bool,
    with_points: bool,
    generator: torch.Generator | None,
    min_component_size: int,
    max_components: int,
    min_confidence: float,
) -> Prompts:
    """One prompt per connected component of each class (component mode of :func:`prompts_from_labels`)."""
    if max_components < 1:
        raise ValueError(f"max_components must be at least 1, got {max_components}")
    b, h, w = maps.shape
    c, m = num_classes - 1, max_components
    components = torch.zeros(b, c, m, dtype=torch.bool)
    boxes = torch.zeros(b, c, m, 4) if with_boxes else None
    points = torch.zeros(b, c, m, 2) if with_points else None
    label_maps = maps.cpu().numpy()
    probs = None if class_probs is None else class_probs.cpu().numpy()
    for i in range(b):
        for k in range(c):
            parts, n = ndimage.label(label_maps[i] == k + 1, structure=_CONNECTIVITY)
            if n == 0:
                continue
            ids = np.arange(1, n + 1)
            sizes = np.bincount(parts.ravel(), minlength=n + 1)[1:]
            keep = sizes >= min_component_size
            if probs is not None:
                mean_prob = np.bincount(parts.ravel(), weights=probs[i, k + 1].ravel(), minlength=n + 1)[1:] / sizes
                keep &= mean_prob >= min_confidence
            ids = ids[keep][np.argsort(-sizes[keep], kind="stable")][:m]  # largest first, ties in raster order
            regions = ndimage.find_objects(parts)
            for slot, index in enumerate(ids.tolist()):
                components[i, k, slot] = True
                rows, cols = regions[index - 1]
                if boxes is not None:
                    box = torch.tensor([cols.start, rows.start, cols.stop - 1, rows.stop - 1], dtype=torch.float32)
                    if box_jitter > 0:
                        box = _jitter(box, box_jitter, (h, w), generator)
                    boxes[i, k, slot] = box
                if points is not None:
                    ys, xs = np.nonzero(parts == index)
                    j = int(torch.randint(len(ys), (1,), generator=generator))
                    points[i, k, slot] = torch.tensor([xs[j], ys[j]], dtype=torch.float32)
    device = maps.device
    return Prompts(
        components.any(-1).to(device),
        None if boxes is None else boxes.to(device),
        None if points is None else points.to(device),
        components.to(device),
    )
