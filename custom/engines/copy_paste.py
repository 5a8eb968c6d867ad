"""Bidirectional copy-paste between labelled and unlabelled patches (stage 2's ``copy_paste`` switch).

BCP (Bai et al., CVPR 2023) trains the student on mixed images instead of the unlabelled view alone:
a box of a labelled patch pasted into an unlabelled one ("inward") and a box of the unlabelled patch
pasted into the labelled one ("outward"), each supervised by the ground truth where its voxels came
from the labelled patch and by the gated pseudo-label elsewhere. The student then sees labelled
structures (a lesion) in unlabelled surroundings and the other way round, which neither teacher's
pseudo-labels supply where both miss a class.

Works for 2D and 3D patches of any shape and any class count: the box takes ``ratio`` of every
spatial side.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

COPY_PASTE_MODES = ("none", "bidirectional")


def random_boxes(shape: tuple[int, ...] | torch.Size, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``(B, 1, *S)`` bool: per sample one axis-aligned box, each side ``round(ratio * size)`` voxels
    (at least 1), at a random position inside the patch (``shape`` is ``(B, C, *S)``)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"copy_paste_ratio must be in (0, 1), got {ratio}")
    batch, spatial = shape[0], list(shape[2:])
    boxes = torch.zeros((batch, 1, *spatial), dtype=torch.bool)
    for i in range(batch):
        window = [slice(None), slice(None)]
        for size in spatial:
            side = max(1, round(ratio * size))
            start = int(torch.randint(size - side + 1, (1,), generator=generator))
            window.append(slice(start, start + side))
        boxes[i][tuple(window[1:])] = True
    return boxes


class MixedBatch(NamedTuple):
    """The student's mixed images and what supervises them, inward mixes first, then outward."""

    images: torch.Tensor  # (2B, C, *S)
    targets: torch.Tensor  # (2B, 1, *S) class indices: ground truth or pseudo-label
    weights: torch.Tensor  # (2B, 1, *S) 1 on ground-truth voxels, the gate's weight on pseudo-labelled ones
    from_labelled: torch.Tensor  # (2B, 1, *S) bool, the voxels that came from the labelled patch


class BidirectionalCopyPaste:
    """Mix each unlabelled patch with a labelled one (unlabelled ``i`` with labelled ``i mod n``) both ways.

    Args:
        ratio: share of every spatial side the pasted box takes (BCP: 2/3).
        seed: seed of the boxes' random stream (its own, so switching copy-paste on leaves every other
            random stream of the step as it was).
    """

    def __init__(self, ratio: float = 2.0 / 3.0, seed: int = 0) -> None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"copy_paste_ratio must be in (0, 1), got {ratio}")
        self.ratio = ratio
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        unlabelled: torch.Tensor,
        pseudo_label: torch.Tensor,
        weights: torch.Tensor,
    ) -> MixedBatch:
        """``images``/``labels``: the labelled batch ``(n, C, *S)``/``(n, 1, *S)``; ``unlabelled``, its
        ``pseudo_label`` and the gate's ``weights``: ``(B, C, *S)``/``(B, 1, *S)``, as the student sees them."""
        if images.shape[2:] != unlabelled.shape[2:]:
            raise ValueError(
                f"copy-paste needs labelled and unlabelled patches of one size, got {list(images.shape[2:])} "
                f"and {list(unlabelled.shape[2:])}: crop both to the plan's roi_size"
            )
        partner = torch.arange(len(unlabelled), device=images.device) % len(images)
        image_l, label_l = images[partner], labels[partner].to(pseudo_label.dtype)
        box = random_boxes(unlabelled.shape, self.ratio, self.generator).to(images.device)
        ones = torch.ones_like(weights)
        inward = MixedBatch(
            torch.where(box, image_l, unlabelled),
            torch.where(box, label_l, pseudo_label),
            torch.where(box, ones, weights),
            box,
        )
        outward = MixedBatch(
            torch.where(box, unlabelled, image_l),
            torch.where(box, pseudo_label, label_l),
            torch.where(box, weights, ones),
            ~box,
        )
        return MixedBatch(*(torch.cat(parts) for parts in zip(inward, outward, strict=True)))


def copy_paste(mode: str = "none", ratio: float = 2.0 / 3.0, seed: int = 0) -> BidirectionalCopyPaste | None:
    """The copy-paste a configuration asks for: None for ``"none"``, else :class:`BidirectionalCopyPaste`."""
    if mode not in COPY_PASTE_MODES:
        raise ValueError(f"copy_paste must be one of {COPY_PASTE_MODES}, got {mode!r}")
    return None if mode == "none" else BidirectionalCopyPaste(ratio, seed)
