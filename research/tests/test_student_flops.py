"""The FLOP breakdown of the student: its parts cover the whole forward, and the table reads the time ratios."""

import pytest
import torch

from custom.networks.student import UnCoLStudent
from research.bench.inference_speed import STUDENT
from research.bench.student_flops import PARTS, forward_flops, student_parts, table


@pytest.mark.parametrize("dims, shape", [(2, (1, 1, 64, 48)), (3, (1, 1, 32, 32, 16))])
def test_the_parts_add_up_to_the_whole_forward(dims, shape):
    total, children = forward_flops(UnCoLStudent(spatial_dims=dims, **STUDENT), torch.zeros(shape))
    parts = student_parts(children)
    assert sum(parts.values()) == total
    assert parts["encoder (ViT)"] > 0 and parts["up1 (full)"] > parts["head"] > 0


def test_a_module_of_no_part_is_refused():
    with pytest.raises(ValueError, match="'adapter' belongs to no part"):
        student_parts({"adapter": 10})


def test_table_gives_shares_and_both_ratios():
    parts = dict.fromkeys(PARTS, 0.0) | {"encoder (ViT)": 0.5, "up1 (full)": 1.5}
    row = {"dims": 2, "student_overrides": {}, "student_gflop": 2.0, "unet_gflop": 1.0, "parts_gflop": parts}
    speed = {"rows": [{"dims": 2, "student_overrides": {}, "ratio_median": 1.82}]}
    text = table({"commit": "abc1234", "rows": [row]}, speed)
    assert "| 2D 128x128 | bundle default | 2.00 | 25 | 0 | 0 | 0 | 0 | 0 | 75 | 0 | 1.00 | 2.00 | 1.82 |" in text
    assert "Commit abc1234." in text
