import torch
from monai.data import MetaTensor, list_data_collate

from custom.metrics import PhysicalHausdorffDistanceMetric


def _square(offset: int) -> torch.Tensor:
    x = torch.zeros(2, 16, 16)
    x[1, 4:8, 4 + offset : 8 + offset] = 1
    x[0] = 1 - x[1]
    return x


def test_hd95_is_measured_in_millimetres_from_the_affine():
    affine = torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0]))
    y = list_data_collate([{"y": MetaTensor(_square(0), affine=affine)}] * 2)["y"]
    y_pred = torch.stack([_square(2)] * 2)  # shifted 2 pixels along the axis with 3 mm pixels
    metric = PhysicalHausdorffDistanceMetric(include_background=False, percentile=95)
    metric(y_pred, y)
    assert metric.aggregate().item() == 6.0
    plain = PhysicalHausdorffDistanceMetric(include_background=False, percentile=95)
    plain(y_pred, y.as_tensor())  # no affine: voxels, as MONAI would report
    assert plain.aggregate().item() == 2.0
