"""The real-anatomy figure's crop: every panel's foreground stays inside it, with a margin."""

from __future__ import annotations

import torch

from research.bench.real_figure import foreground_window


def test_window_holds_every_panels_foreground_with_a_margin():
    truth = torch.zeros(100, 80, dtype=torch.long)
    truth[40:50, 30:36] = 1
    prediction = torch.zeros_like(truth)
    prediction[55:60, 20:22] = 2  # a prediction outside the truth widens the window
    rows, cols = foreground_window([truth, prediction])
    assert rows.start < 40 and rows.stop > 60 and cols.start < 20 and cols.stop > 36
    assert rows.start >= 0 and rows.stop <= 100 and (rows.stop - rows.start) < 100  # a crop, not the slice
    assert foreground_window([torch.zeros_like(truth)]) == (slice(None), slice(None))
    edge = torch.zeros_like(truth)
    edge[0:5, 75:80] = 1
    rows, cols = foreground_window([edge])
    assert rows.start == 0 and cols.stop == 80  # clipped to the image
