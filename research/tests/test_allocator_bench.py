"""The allocator bench (research/bench/allocator.py): its table and its worker (the timing is the bench's)."""

import json
import subprocess
import sys

from research.bench.allocator import table
from research.bench.sweep import ROOT


def test_table_gives_each_workload_its_ratio_and_page_faults():
    runs = {
        "default": [{"ms": 100.0, "page_faults": 4000}, {"ms": 120.0, "page_faults": 4200}],
        "kept": [{"ms": 80.0, "page_faults": 0}, {"ms": 90.0, "page_faults": 2}],
    }
    payload = {"commit": "abc1234", "threads": 2, "pairs": 2, "rows": {"train_2d": runs}}
    payload["softmax"] = {"aten": [40.0, 50.0], "softmax_few": [10.0, 20.0]}
    text = table(payload)
    assert "| train_2d | 110.0 | 85.0 | 0.78 [0.75, 0.80] | 4,100 / 1 |" in text
    assert "`torch.softmax` 45.0 ms, `softmax_few` 15.0 ms (median ratio 0.33 [0.25, 0.40])" in text


def test_a_worker_sets_the_thresholds_and_reports_no_page_faults():
    command = [sys.executable, "-m", "research.bench.allocator", "--worker", "inference_2d", "kept"]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ms"] > 0 and result["page_faults"] < 50
