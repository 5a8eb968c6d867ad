"""The run-cost table: each run paired with the baseline's run of the same method and round."""

from research.bench.run_cost import table


def test_table_pairs_runs_by_method_and_round_and_gives_the_stage2_ratio():
    def side(stage1, stage2):
        return {"stage1": stage1, "stage2": stage2, "commit": "x"}

    result = {
        "baseline": "base",
        "head": "head",
        "rounds": [
            {"method": "uncol", "round": 0, "baseline": side(300, 300), "head": side(150, 120)},
            {"method": "mean_teacher", "round": 0, "baseline": side(250, 200), "head": side(140, 100)},
        ],
    }
    text = table(result)
    assert "| uncol | 0 | 300 + 300 = 600 | 150 + 120 = 270 | 0.45 |" in text
    assert "| mean_teacher | 0 | 250 + 200 = 450 | 140 + 100 = 240 | 0.53 |" in text
    assert "- UnCoL stage 2 / Mean Teacher stage 2 at base: 1.50" in text
    assert "- UnCoL stage 2 / Mean Teacher stage 2 at head: 1.20" in text
    assert "- uncol run, head / base: 0.45" in text
