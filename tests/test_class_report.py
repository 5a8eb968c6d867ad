import json
import math
from types import SimpleNamespace

import pytest
import torch

from custom.handlers.class_report import ClassMetricsReport


def test_report_summarises_finite_values_per_class(tmp_path):
    details = {
        "dice": torch.tensor([[0.8, math.nan], [0.6, 0.5], [1.0, 0.1]]),
        "hd95": torch.tensor([[2.0, math.nan], [4.0, math.nan], [6.0, 3.0]]),
    }
    engine = SimpleNamespace(state=SimpleNamespace(metric_details=details))
    ClassMetricsReport(tmp_path, ["dice", "hd95"], ["organ", "lesion"], extra={"split": "test"})(engine)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["split"] == "test" and report["num_cases"] == 3
    assert report["metrics"]["dice"]["organ"] == pytest.approx({"mean": 0.8, "std": 0.163299, "n": 3}, rel=1e-4)
    assert report["metrics"]["dice"]["lesion"]["n"] == 2
    assert report["metrics"]["hd95"]["lesion"] == {"mean": 3.0, "std": 0.0, "n": 1}
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert rows[0] == "metric,class,mean,std,n" and len(rows) == 5


def test_report_rejects_details_of_the_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        ClassMetricsReport(tmp_path, ["dice"], ["organ", "lesion"]).summarise(torch.zeros(3, 3))
