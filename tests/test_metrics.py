import pytest
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


def test_calibration_bins_and_ece_on_hand_built_predictions():
    from custom.metrics import calibration_bins, expected_calibration_error

    # 4 voxels with top-class confidence 0.95 (3 right), 2 voxels with confidence 0.65 (1 right)
    p_hi, p_lo = [0.95, 0.05], [0.65, 0.35]
    probs = torch.tensor([p_hi] * 4 + [p_lo] * 2).T.reshape(1, 2, 1, 6)
    truth = torch.tensor([[[0, 0, 0, 1, 0, 1]]])
    bins = calibration_bins(probs, truth, num_bins=10)
    assert bins["count"][9] == 4 and bins["count"][6] == 2 and bins["count"].sum() == 6
    assert bins["accuracy"][9] == 0.75 and bins["accuracy"][6] == 0.5
    # ECE = (4 * |0.75 - 0.95| + 2 * |0.5 - 0.65|) / 6
    assert expected_calibration_error(bins) == pytest.approx((4 * 0.2 + 2 * 0.15) / 6)
    perfect = calibration_bins(torch.tensor([[1.0, 0.0]]).T.reshape(1, 2, 1, 1), torch.tensor([[[0]]]))
    assert expected_calibration_error(perfect) == 0.0
    where = torch.tensor([[[True, True, True, True, False, False]]])
    assert calibration_bins(probs, truth, num_bins=10, where=where)["count"].sum() == 4
