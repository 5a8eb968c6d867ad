"""The inference speed bench's matched UNet and its table (the timing itself is the bench's, not a test's)."""

from custom.networks.student import UnCoLStudent
from research.bench.inference_speed import STUDENT, matched_unet, parameters, table


def test_the_matched_unet_has_about_the_students_parameter_count():
    for dims in (2, 3):
        student = parameters(UnCoLStudent(spatial_dims=dims, **STUDENT))
        assert abs(parameters(matched_unet(dims)) - student) / student < 0.1


def test_table_gives_each_row_its_medians_and_ratio():
    row = {
        "dims": 3,
        "student_overrides": {"feature_size": 8},
        "parameters_m": {"student": 4.9, "unet": 4.8},
        "ms_per_input": {"student": [30.0, 10.0, 20.0], "unet": [5.0, 4.0, 6.0]},
        "ratio_median": 4.0,
        "ratio_range": [2.5, 6.0],
    }
    text = table({"commit": "abc1234", "threads": 2, "repeats": 3, "rows": [row]})
    assert "| 3D 160x160x96, roi 64x64x32 | feature_size 8 | 4.9 | 4.8 | 20.0 | 5.0 | 4.00 [2.50, 6.00] |" in text
    assert "Commit abc1234, 2 torch threads, 3 pairs" in text
