"""Largest-component post-processing: chosen classes lose their stray blobs, nothing else changes."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom.data.postprocess import KeepLargestComponentd, largest_component


def _labels() -> torch.Tensor:
    labels = torch.zeros(1, 20, 16, 8, dtype=torch.long)
    labels[0, 2:10, 2:10, 2:6] = 1  # the organ
    labels[0, 14:16, 12:14, 1:3] = 1  # a stray organ look-alike
    labels[0, 4:6, 4:6, 3:5] = 2  # a lesion inside the organ
    labels[0, 17:19, 2:4, 5:7] = 2  # a second lesion, elsewhere
    return labels


def test_chosen_classes_keep_their_largest_component_and_the_rest_becomes_background():
    labels = MetaTensor(_labels(), affine=torch.diag(torch.tensor([1.25, 1.25, 2.0, 1.0])))
    out = KeepLargestComponentd("pred", applied_labels=[1])({"pred": labels})["pred"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, labels.affine)
    assert int((out == 1).sum()) == 8 * 8 * 4 - 2 * 2 * 2, "the look-alike is gone, the organ kept"
    assert torch.equal(out[0, 14:16, 12:14, 1:3], torch.zeros(2, 2, 2, dtype=torch.long))
    assert torch.equal(out == 2, labels.as_tensor() == 2), "both lesions are untouched"
    assert torch.equal(KeepLargestComponentd("pred", [])({"pred": labels})["pred"], labels)


def test_diagonal_neighbours_are_one_component_and_background_labels_are_refused():
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corner-touching voxels: one component (26-connectivity)
    mask[3, 3, 3] = True
    assert largest_component(mask).sum() == 2
    with pytest.raises(ValueError, match="foreground class indices"):
        KeepLargestComponentd("pred", [0])
