"""The method sweep: its arms, its cells' pairs, per-case Dice and the paired verdicts of its table."""

import json

from research.bench.method_sweep import (
    ABLATIONS,
    ARMS,
    BASELINES,
    BY_CLASS,
    CALIBRATED,
    CHOICE_CELLS,
    GUARDED,
    PAPER,
    SCREEN_CELLS,
    SCREEN_KEEP,
    SCREEN_PAIRS,
    answer,
    beats_on_choice_cells,
    chosen_by_validation,
    default_arms,
    pairs_for,
    passed_screen,
    screen,
    share_of_full,
    table,
    wanted,
)
from research.bench.paired import PAIR_ORDER
from research.bench.paired_runs import case_dice
from research.bench.sweep import TRAIN


def test_the_paper_arm_names_existing_train_json_keys_and_the_baselines_run_without_the_foundation_model():
    keys = json.loads(open(TRAIN).read())
    assert set(PAPER) <= set(keys)  # a renamed key would silently change the paper arm
    assert set(GUARDED) <= set(keys) and ARMS["uncol_quantile_agree_guarded"].stage2 == GUARDED
    assert set(CALIBRATED) <= set(keys) and keys["calibration"] != CALIBRATED["calibration"]  # else it is uncol
    assert set(BY_CLASS) <= set(keys) and keys["teachers"] != BY_CLASS["teachers"]
    for base in BASELINES:
        assert ARMS[base].stage1 == "none" and ARMS[base].stage2["teachers"] == "specialized"
    assert ARMS["copy_paste"].stage2["copy_paste"] == "bidirectional" and ARMS["uncol"].stage2 == {}


def test_the_paper_arm_runs_only_where_the_defaults_are_not_the_papers(tmp_path):
    keys = json.loads(open(TRAIN).read())
    paper_defaults = {**keys, **PAPER}
    (tmp_path / "paper.json").write_text(json.dumps(paper_defaults))
    assert "uncol_paper" not in default_arms(str(tmp_path / "paper.json")) and "uncol" in default_arms(TRAIN)
    (tmp_path / "moved.json").write_text(json.dumps({**paper_defaults, "gate": "soft"}))
    assert default_arms(str(tmp_path / "moved.json")) == [a for a in ARMS if a not in ABLATIONS]


def test_the_ablation_sits_between_mean_teacher_and_uncol_and_runs_only_when_named():
    distilled = ARMS["mean_teacher_distilled"]
    assert distilled.stage1 == ARMS["uncol"].stage1 == "both" and distilled.stage2 == ARMS["mean_teacher"].stage2
    assert "mean_teacher_distilled" in ABLATIONS and "mean_teacher_distilled" not in default_arms(TRAIN)


def test_a_cell_with_a_fixed_split_varies_only_the_seed():
    assert pairs_for("embedded2d_10", 0, 6) == PAIR_ORDER[:6] and len({s for s, _ in PAIR_ORDER[:6]}) == 3
    assert pairs_for("embedded2d_full", 1, 3) == [(0, 1), (0, 2)]


def test_per_case_dice_is_read_by_class_name(tmp_path):
    (tmp_path / "test_dice_raw.csv").write_text(
        "filename,class0,class1,class2,mean\n/a/b/case_000.nii.gz,0.9,0.5,nan,0.7\n/a/b/case_001.nii.gz,0.8,0.1,0.3,0.4\n"
    )
    cases = case_dice(tmp_path, ["organ", "lesion", "vessel"])
    assert cases["case_001.nii.gz"] == {"organ": 0.8, "lesion": 0.1, "vessel": 0.3}
    assert cases["case_000.nii.gz"]["vessel"] != cases["case_000.nii.gz"]["vessel"]  # NaN: absent from both


def write_run(folder, arm, pair, dice, validation=0.5):
    metrics = {"test_dice": {"organ": {"mean": dice, "std": 0.1, "n": 8}, "lesion": {"mean": dice, "std": 0.1, "n": 8}}}
    run = {
        "arm": arm,
        "split_seed": pair[0],
        "seed": pair[1],
        "commit": "abc1234",
        "metrics": metrics,
        "validation_metrics": {"test_dice": {"organ": {"mean": validation, "std": 0, "n": 4}}},
        "stage2_log": {"gate_kept": 0.9, "gate_from_generalized": 0.6} if arm.startswith("uncol") else {},
    }
    (folder / f"{arm}_split{pair[0]}_seed{pair[1]}.json").write_text(json.dumps(run))


def test_verdicts_ahead_behind_and_level_come_from_the_paired_test(tmp_path):
    folder = tmp_path / "embedded2d_10"
    folder.mkdir()
    pairs = PAIR_ORDER[:6]
    base = [0.50, 0.60, 0.55, 0.40, 0.65, 0.58]
    for pair, b in zip(pairs, base, strict=True):
        write_run(folder, "supervised", pair, b)
        write_run(folder, "mean_teacher", pair, b + 0.05)  # ahead of supervised on every pair
        write_run(folder, "copy_paste", pair, b - 0.04 + (0.001 if pair[1] else 0))  # behind supervised
        write_run(folder, "uncol", pair, b + (0.02 if pair[0] % 2 else -0.02))  # level: half the pairs either way
    lines = [line.split("|") for line in table(tmp_path).splitlines() if line.startswith("|")]
    rows = {cells[2].strip(): [c.strip() for c in cells] for cells in lines}
    assert rows["mean_teacher"][6].startswith("+0.050 ± 0.000, 6 of 6") and rows["mean_teacher"][6].endswith("ahead")
    assert rows["copy_paste"][6].endswith("behind") and rows["copy_paste"][7].endswith("behind")
    assert rows["uncol"][6].endswith("level") and rows["supervised"][6] == "" and rows["uncol"][3] == "6"
    assert rows["uncol"][9] == "0.500 ± 0.000" and rows["uncol"][10:12] == ["0.90", "0.60"]
    for pair in pairs[3:]:  # three pairs: the same differences, no verdict yet
        for arm in ("supervised", "mean_teacher", "copy_paste", "uncol"):
            (folder / f"{arm}_split{pair[0]}_seed{pair[1]}.json").unlink()
    lines = [line.split("|") for line in table(tmp_path).splitlines() if line.startswith("|")]
    rows = {cells[2].strip(): [c.strip() for c in cells] for cells in lines}
    assert rows["mean_teacher"][6].startswith("+0.050 ± 0.000, 3 of 3")
    assert rows["mean_teacher"][6].endswith("p 0: too few pairs")


def test_the_configuration_is_chosen_on_validation_over_every_2d_cell_never_on_test(tmp_path):
    for i, cell in enumerate(CHOICE_CELLS):
        (tmp_path / cell).mkdir()
        for pair in PAIR_ORDER[:2]:
            write_run(tmp_path / cell, "uncol", pair, dice=0.9, validation=0.50)  # best on test, not on validation
            write_run(tmp_path / cell, "uncol_soft", pair, dice=0.1, validation=0.55 if i else 0.45)
    assert chosen_by_validation(tmp_path) == ("uncol_soft", {"uncol": 0.5, "uncol_soft": 0.525})
    assert "Chosen by validation Dice" in table(tmp_path) and "**uncol_soft**" in table(tmp_path)
    (tmp_path / CHOICE_CELLS[-1] / "uncol_soft_split0_seed0.json").unlink()
    (tmp_path / CHOICE_CELLS[-1] / "uncol_soft_split1_seed0.json").unlink()
    assert chosen_by_validation(tmp_path)[0] == "uncol"  # a configuration missing a cell is not a candidate


def test_the_target_cells_methods_are_read_against_full_supervision(tmp_path):
    for cell in ("embedded2d_10", "embedded2d_full"):
        (tmp_path / cell).mkdir()
    assert share_of_full(tmp_path) is None  # nothing to compare yet
    for seed in range(2):
        write_run(tmp_path / "embedded2d_full", "supervised", (0, seed), 0.80 + 0.02 * seed)
    for pair in PAIR_ORDER[:2]:
        write_run(tmp_path / "embedded2d_10", "uncol", pair, 0.777)
    line = share_of_full(tmp_path)
    assert "2 seeds, mean Dice 0.810" in line and line.endswith("uncol 95.9%.")  # 0.777 / 0.81
    assert line in table(tmp_path)


def test_the_screen_keeps_the_variants_best_on_validation_among_those_with_their_first_pairs(tmp_path):
    variants = [a for a in default_arms() if a.startswith("uncol_")]
    for cell in SCREEN_CELLS:
        (tmp_path / cell).mkdir()
    assert screen(tmp_path) is None and not wanted("colin27", variants[0], 0, tmp_path)  # nothing screened yet
    for cell in SCREEN_CELLS:
        for pair in PAIR_ORDER[:SCREEN_PAIRS]:
            write_run(tmp_path / cell, "uncol", pair, dice=0.5)
            for rank, arm in enumerate(variants):  # the first variants best on validation, the last best on test
                write_run(tmp_path / cell, arm, pair, dice=0.1 * rank, validation=0.9 - 0.1 * rank)
    missing = tmp_path / SCREEN_CELLS[1] / f"{variants[0]}_split{PAIR_ORDER[2][0]}_seed{PAIR_ORDER[2][1]}.json"
    kept = missing.read_text()
    missing.unlink()  # the best variant, added late, lacks a screen run: the others rank without it
    assert variants[0] not in screen(tmp_path) and passed_screen(screen(tmp_path)) == variants[1 : SCREEN_KEEP + 1]
    assert wanted(SCREEN_CELLS[1], variants[0], SCREEN_PAIRS - 1, tmp_path)  # its screen pairs still run
    assert not wanted("colin27", variants[0], 0, tmp_path) and wanted("colin27", variants[1], 0, tmp_path)
    assert f"Not yet screened (its first pairs are running): {variants[0]}." in table(tmp_path)
    missing.write_text(kept)
    scores = screen(tmp_path)
    assert passed_screen(scores) == variants[:SCREEN_KEEP] and scores[variants[0]] == 0.9
    assert wanted("embedded2d_5", variants[-1], SCREEN_PAIRS - 1, tmp_path)  # the screen's own pairs
    assert not wanted("embedded2d_5", variants[-1], SCREEN_PAIRS, tmp_path)
    assert not wanted("colin27", variants[-1], 0, tmp_path) and wanted("colin27", variants[0], 0, tmp_path)
    assert all(wanted("macaque", arm, 5, tmp_path) for arm in (*BASELINES, "uncol"))
    assert f"only {' and '.join(variants[:SCREEN_KEEP])} run" in table(tmp_path)


def test_a_single_run_shows_its_mean_without_a_spread(tmp_path):
    (tmp_path / "embedded2d_10").mkdir()
    write_run(tmp_path / "embedded2d_10", "supervised", (0, 0), 0.6)
    row = next(line for line in table(tmp_path).splitlines() if "| supervised |" in line)
    assert "±" not in row and "organ 0.600, lesion 0.600 | 0.600 |" in row


def test_the_readme_answer_gives_verdicts_once_a_cell_has_its_pairs_and_no_figures(tmp_path):
    folder = tmp_path / "embedded2d_10"
    folder.mkdir()
    for i, pair in enumerate(PAIR_ORDER[:6]):
        for rank, arm in enumerate(BASELINES):
            write_run(folder, arm, pair, 0.40 + 0.01 * rank + 0.02 * i)
        write_run(folder, "uncol", pair, 0.50 + 0.02 * i + 0.001 * (i % 2))  # ahead of all three
    text = answer(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| embedded 2D phantoms, 10 %"))
    assert row.count("ahead, higher on 6 of 6") == len(BASELINES) and "| 6 of 6 |" in row
    assert "0.5" not in text and "0.4" not in text  # the figures stay in results.md's table
    assert text.startswith("2D tasks with all their pairs: 1 of 4; the default is ahead of all three baselines in 1 (")
    assert "| Colin27 deep grey nuclei, 10 % of the slices labelled | 0 of 6 | not run yet" in text
    for pair in PAIR_ORDER[3:6]:
        (folder / f"uncol_split{pair[0]}_seed{pair[1]}.json").unlink()
    text = answer(tmp_path)
    assert text.startswith("No 2D task has its pairs yet") and "| 3 of 6 | higher on 3 of 3 so far |" in text


def test_the_chosen_configuration_becomes_the_default_only_ahead_of_supervised_and_mean_teacher_pooled(tmp_path):
    for cell in CHOICE_CELLS:
        (tmp_path / cell).mkdir()
        for i, pair in enumerate(PAIR_ORDER[:6]):
            write_run(tmp_path / cell, "uncol", pair, dice=0.60 + 0.01 * i, validation=0.55)
            write_run(tmp_path / cell, "supervised", pair, dice=0.50 + 0.01 * i + 0.002 * (i % 2))
            write_run(tmp_path / cell, "mean_teacher", pair, dice=0.55 + 0.01 * i + 0.003 * (i % 3))
    calls = beats_on_choice_cells("uncol", tmp_path)
    assert calls["supervised"]["n"] == 24 and calls["mean_teacher"]["verdict"] == "ahead"
    assert "So: it becomes train.json's defaults." in table(tmp_path)
    for i, pair in enumerate(PAIR_ORDER[:6]):  # Mean Teacher as good in one cell: pooled, still ahead
        write_run(tmp_path / CHOICE_CELLS[0], "mean_teacher", pair, dice=0.60 + 0.01 * i + 0.001 * (i % 2))
    assert beats_on_choice_cells("uncol", tmp_path)["mean_teacher"]["verdict"] == "ahead"
    for cell in CHOICE_CELLS:  # Mean Teacher better everywhere: the defaults stay
        for i, pair in enumerate(PAIR_ORDER[:6]):
            write_run(tmp_path / cell, "mean_teacher", pair, dice=0.65 + 0.01 * i + 0.001 * (i % 2))
    assert "So: the defaults stay." in table(tmp_path)
    (tmp_path / CHOICE_CELLS[0] / "supervised_split0_seed0.json").unlink()
    assert "So: undecided." in table(tmp_path)  # a cell short of its pairs
