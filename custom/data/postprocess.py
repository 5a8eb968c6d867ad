"""Post-processing of predicted label maps: each chosen class cut to its largest connected component.

A student trained on patches sees little context, and in the 3D phantoms it predicts the organ in
tens of scattered look-alike blobs beside the true organ, nearly all of them off the ground truth
(measured in the project's research record, research/results.md).
For a class that is one connected structure per image, keeping only its largest component removes
them. It is what MONAI's ``KeepLargestConnectedComponentd`` does, written with SciPy (which the
project already needs) rather than scikit-image. A class that may come in several pieces (two
lesions) must not be cut this way: choose the classes on validation data (the audit prints both).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component (full connectivity: 26 neighbours in 3D) of the bool ``mask``."""
    labelled, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labelled, range(1, count + 1))
    return labelled == 1 + int(np.argmax(sizes))


class KeepLargestComponentd(MapTransform):
    """In ``(1, *S)`` class-index maps, voxels of the ``applied_labels`` classes outside each one's largest
    connected component become background (0). No labels: the map passes unchanged."""

    def __init__(self, keys: KeysCollection, applied_labels: Sequence[int] = (), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.applied_labels = [int(label) for label in applied_labels]
        if any(label <= 0 for label in self.applied_labels):
            raise ValueError(f"applied_labels must be foreground class indices (> 0), got {self.applied_labels}")

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        if not self.applied_labels:
            return d
        for key in self.key_iterator(d):
            labels = d[key]
            values = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.array(labels)
            out = values.copy()
            for label in self.applied_labels:
                mask = values[0] == label
                out[0][mask & ~largest_component(mask)] = 0
            if isinstance(labels, torch.Tensor):  # a MetaTensor keeps its affine and metadata
                result = labels.clone()
                result[...] = torch.as_tensor(out, device=labels.device)
                d[key] = result
            else:
                d[key] = out
        return d
