"""The component audit's figures on a prediction whose stray blobs are known."""

import numpy as np
import torch

from research.bench.component_audit import components, keep_largest


def test_stray_share_and_how_much_of_it_misses_the_truth():
    pred = np.zeros((12, 12, 4), dtype=bool)
    pred[0:6, 0:6, :] = True  # 144 voxels, the structure
    pred[9:11, 9:11, 0:2] = True  # 8 voxels apart: stray, off the truth
    pred[9:10, 0:2, 0:2] = True  # 4 voxels apart: stray, on the truth
    truth = np.zeros_like(pred)
    truth[0:6, 0:6, :] = truth[9:10, 0:2, 0:2] = True
    count, share, missed = components(pred, truth)
    assert count == 3 and share == 12 / 156 and missed == 8 / 12
    assert components(np.zeros_like(pred), truth) == (0, 0.0, 0.0)


def test_keep_largest_works_on_one_hot_predictions():
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[0:4, 0:4], labels[6:8, 6:8], labels[5, 0] = 1, 1, 2
    one_hot = torch.nn.functional.one_hot(labels, 3).movedim(-1, 0).float()
    kept = keep_largest(one_hot)
    assert kept.shape == one_hot.shape and kept[1].sum() == 16 and kept[2].sum() == 1
    assert torch.equal(kept.sum(0), torch.ones(8, 8))


def test_report_rows_per_run_split_and_class_with_the_command_that_made_them():
    from research.bench.component_audit import report_table

    figure = {"mean": 0.5, "n": 2}
    classes = {"organ": dict.fromkeys(["components", "stray_share", "stray_off_truth", "dice_raw", "dice_largest",
                                       "hd95_raw", "hd95_largest"], figure)}  # fmt: skip
    classes["lesion"] = {**classes["organ"], "hd95_largest": {"mean": None, "n": 0}}
    split = {"summary": classes}
    run = {"setting": "3d_patch", "fraction": 0.1, "seed": 1, "method": "mean_teacher", "seconds": 120.0}
    text = report_table([{**run, "splits": {"validation": split, "test": split}}])
    assert text.count("| 10% | Mean Teacher |") == 4 and "| 50.0 % | 50 % | 0.500 | 0.500 | 0.5 | n/a |" in text
    assert "--fraction 0.1 --method mean_teacher --seed 1 --out research/results/component_audit/" in text
