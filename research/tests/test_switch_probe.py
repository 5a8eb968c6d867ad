"""The speed-switch probe's table: arms paired with the current defaults on the pairs both have."""

import json
import math
import statistics

from research.bench.paired import paired_t
from research.bench.switch_probe import table


def write_run(folder, arm, split_seed, seed, test, validation, seconds=(100.0, 50.0)):
    def metrics(values):
        classes = zip(("organ", "lesion"), values, strict=True)
        return {"test_dice": {c: {"mean": v, "std": 0.1, "n": 8} for c, v in classes}}

    run = {
        "task": "embedded2d",
        "arm": arm,
        "split_seed": split_seed,
        "seed": seed,
        "commit": "abc1234",
        "seconds": {"stage1": seconds[0], "stage2": seconds[1]},
        "metrics": metrics(test),
        "validation_metrics": metrics(validation),
    }
    (folder / f"{arm}_split{split_seed}_seed{seed}.json").write_text(json.dumps(run))


def test_table_pairs_each_arm_with_current_on_shared_pairs(tmp_path):
    folder = tmp_path / "embedded2d"
    folder.mkdir()
    current = {(0, 0): (0.8, 0.4), (1, 0): (0.7, 0.5), (0, 1): (0.9, 0.3)}
    narrow = {(0, 0): (0.82, 0.44), (1, 0): (0.69, 0.47)}  # one pair short: paired on two
    for (s, k), v in current.items():
        write_run(folder, "current", s, k, v, (0.6, 0.6), seconds=(300.0, 200.0))
    for (s, k), v in narrow.items():
        write_run(folder, "feature_size_8", s, k, v, (0.62, 0.6), seconds=(150.0, 120.0))
    text = table(tmp_path)
    rows = {line.split("|")[2].strip(): line.split("|") for line in text.splitlines() if line.startswith("|")}
    diffs = [statistics.fmean(narrow[k]) - statistics.fmean(current[k]) for k in narrow]
    mean, se, p = paired_t(diffs)
    cells = [c.strip() for c in rows["feature_size_8"]]
    assert cells[3] == "2" and cells[6] == f"{mean:+.3f} ± {se:.3f}" and cells[7] == "1 of 2" and cells[8] == f"{p:.3g}"
    assert cells[9].startswith("+0.010") and cells[12:14] == ["150", "120"]
    assert [c.strip() for c in rows["current"]][3] == "3" and "feature_size_8_reuse_2" not in rows
    expected = statistics.fmean(statistics.fmean(v) for v in narrow.values())
    assert math.isclose(float(cells[5].split(" ± ")[0]), expected, abs_tol=5e-4)
