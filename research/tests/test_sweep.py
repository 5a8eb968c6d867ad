"""The label-ratio sweep harness, in its --quick mode (one seed, tiny images and models)."""

import json
import math
import subprocess

import nibabel as nib

import research.bench.sweep as sweep
from research.bench.sweep import ROOT, main, reusable_stage1, summarise, table


def head_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_quick_sweep_writes_runs_table_and_plot_and_resumes(tmp_path, monkeypatch):
    # a clean tree at HEAD, as in CI: a stage 1 from a "-dirty" tree is never reused, so the sharing below
    # would not happen while anyone's code edits are uncommitted
    monkeypatch.setattr(sweep, "commit", head_commit)
    results, page = tmp_path / "results", tmp_path / "results.md"
    page.write_text("# Results\n\nprose that must survive\n")
    # a baseline, and two methods that share one distilled stage 1 (Mean Teacher and UnCoL generalized-only
    # differ from these only in stage 2 overrides; the 3D quick sweep below runs Mean Teacher)
    methods = ["--methods", "supervised", "distilled_supervised", "uncol"]
    args = ["--quick", *methods, "--out", str(tmp_path / "work"), "--results", str(results), "--results-md", str(page)]
    main(args)
    runs = sorted(p.stem for p in (results / "runs" / "quick").glob("*.json"))
    assert runs == ["0.5_distilled_supervised_seed0", "0.5_supervised_seed0", "0.5_uncol_seed0", "1_supervised_seed0"]
    # the distilled stage 1 was trained once and reused: both runs carry its one record
    shared = [json.loads((results / "runs" / "quick" / f"0.5_{m}_seed0.json").read_text()) for m in methods[2:]]
    assert shared[0]["seconds"]["stage1"] == shared[1]["seconds"]["stage1"]
    run = json.loads((results / "runs" / "quick" / "0.5_uncol_seed0.json").read_text())
    assert run["stage2_overrides"]["teachers"] == "both" and run["stage1_overrides"]["distillation"] == "both"
    assert set(run["metrics"]["test_dice"]) == {"organ", "lesion"}
    text = page.read_text()
    assert "prose that must survive" in text
    assert "| 50% | UnCoL (both teachers) |" in text and "| 100% | supervised only |" in text
    assert (results / "dice_vs_fraction_quick.png").stat().st_size > 1000
    # a second run finds every result and trains nothing; the rebuilt table is the same
    (tmp_path / "work").rename(tmp_path / "gone")
    main(args)
    assert page.read_text() == text


def test_stage1_is_reused_only_with_the_same_overrides_and_unchanged_code(tmp_path, monkeypatch):
    """A stage 1 checkpoint trained at a commit whose code differs from HEAD's, with other overrides,
    or from a dirty tree is trained again, not silently reused."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    head, first = git("rev-parse", "--short", "HEAD"), git("rev-list", "--max-parents=0", "HEAD")
    monkeypatch.setattr(sweep, "commit", lambda: head)  # a clean tree at HEAD
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "pretrain.pt").write_bytes(b"weights")
    settings = {"seed": 0, "distillation": "both"}

    def record(commit: str, overrides: dict) -> bool:
        (tmp_path / "stage1.json").write_text(json.dumps({"commit": commit, "seconds": 1.0, "overrides": overrides}))
        return reusable_stage1(tmp_path, settings)

    assert record(head, settings)
    assert not record(head, {**settings, "seed": 1})
    assert not record(head + "-dirty", settings)
    assert not record(first, settings), "the first commit has none of today's code"


def test_quick_3d_sweep_trains_and_evaluates_volumes(tmp_path):
    """The 3D setting layers train_3d.json (3D orientation and spacing) on every stage; the baselines
    run without the generalized teacher, so no LiteMedSAM cache is built for them."""
    results, page = tmp_path / "results", tmp_path / "results.md"
    work = tmp_path / "work"
    main(
        ["--quick", "--dims", "3", "--fractions", "0.5", "--methods", "supervised", "mean_teacher"]
        + ["--out", str(work), "--results", str(results), "--results-md", str(page)]
    )
    run = json.loads((results / "runs" / "quick3d" / "0.5_mean_teacher_seed0.json").read_text())
    assert run["stage2_overrides"]["spatial_dims"] == 3 and run["stage2_overrides"]["teachers"] == "specialized"
    assert run["num_test_cases"] == 2 and set(run["metrics"]["test_dice"]) == {"organ", "lesion"}
    assert not list((work / "quick3d").rglob("teacher_cache/**/*.pt")), "nothing was encoded by LiteMedSAM"
    image = next((work / "quick3d" / "data" / "fraction_0.5" / "imagesTr").glob("*.nii.gz"))
    assert nib.load(image).shape == (32, 32, 16)
    assert "| 50% | Mean Teacher |" in page.read_text()


def test_table_counts_runs_without_a_finite_hd95_and_says_n_a_when_none_has_one():
    """A run whose student never predicts a class has no HD95 for it: the table says how many runs
    the mean is over, and 'n/a' (not 'nan') when it is over none."""

    def run(seed: int, lesion_hd95: float) -> dict:
        metrics = {
            "test_dice": {"organ": {"mean": 0.8}, "lesion": {"mean": 0.0 if math.isnan(lesion_hd95) else 0.3}},
            "test_hd95": {"organ": {"mean": 5.0 + seed}, "lesion": {"mean": lesion_hd95}},
        }
        return {"fraction": 0.1, "method": "uncol", "seed": seed, "metrics": metrics}

    nan = float("nan")
    rows = table(summarise([run(0, nan), run(1, 4.0), run(2, 6.0)])).splitlines()
    assert (
        rows[2]
        == "| 10% | UnCoL (both teachers) | 0.800 ± 0.000 | 0.200 ± 0.173 | 6.0 ± 1.0 | 5.0 ± 1.4 (2 of 3 runs) | 3 |"
    )
    rows = table(summarise([run(0, nan), run(1, nan)])).splitlines()
    assert rows[2].endswith("| n/a (0 of 2 runs predict it) | 2 |") and "nan" not in rows[2]
    one = table(summarise([run(0, 4.0)])).splitlines()[2]  # one seed: no spread to show
    assert one == "| 10% | UnCoL (both teachers) | 0.800 | 0.300 | 5.0 | 4.0 | 1 |"


def test_per_seed_table_pairs_each_method_with_the_baselines_on_the_same_seed():
    def run(method: str, seed: int, organ: float, lesion: float) -> dict:
        dice = {"organ": {"mean": organ}, "lesion": {"mean": lesion}}
        return {"fraction": 0.1, "method": method, "seed": seed, "metrics": {"test_dice": dice}}

    runs = [
        run("supervised", 0, 0.8, 0.2),  # mean 0.5
        run("supervised", 1, 0.9, 0.5),  # 0.7
        run("mean_teacher", 0, 0.6, 0.2),  # 0.4
        run("uncol", 0, 0.9, 0.3),  # 0.6
        run("uncol", 1, 0.8, 0.4),  # 0.6
        run("uncol_generalized", 0, 0.8, 0.1998),  # 0.4999: behind supervised by less than 0.0005
    ]
    lines = sweep.per_seed_table(runs).splitlines()
    assert lines[0].startswith("| labelled | method | seed 0 | seed 1 | mean ± sample std |")
    uncol = next(line for line in lines if "| UnCoL (both teachers) |" in line)
    # seed by seed against supervised (+0.1, -0.1), against Mean Teacher only where it ran (seed 0)
    assert "| 0.600 | 0.600 | 0.600 ± 0.000 | +0.100 / -0.100 | +0.200 |" in uncol
    mean_teacher = next(line for line in lines if "| Mean Teacher |" in line)
    assert "| 0.400 | - | 0.400 | -0.100 | - |" in mean_teacher  # one seed: no spread
    generalized = next(line for line in lines if "| UnCoL, generalized teacher only |" in line)
    assert "| +0.000 | +0.100 |" in generalized  # a difference that rounds to zero is not printed "-0.000"


def test_each_sweep_budget_is_past_its_full_supervision_plateau():
    """The budget rule: every method sees at least as many labelled samples (stage 1's batches, then
    stage 2's labelled batches) as full supervision needed, in the setting's committed learning curve,
    to reach the point from which its validation Dice is flat on every class."""
    from custom.data.plan import BUNDLE_BATCH
    from research.bench.learning_curve import TASK_SETTINGS
    from research.bench.real_report import plateau_epoch
    from research.bench.sweep import SETTINGS

    train = json.loads((ROOT / "bundle" / "configs" / "train.json").read_text())
    curves = ROOT / "research" / "results" / "real"

    def samples(setting: str) -> int:
        spec = SETTINGS[setting]
        # train.json leaves the batch sizes to the plan, which keeps the bundle's on these small images
        stage1 = spec["bundle"].get(
            "pretrain_batch_size", train["pretrain_batch_size"] or BUNDLE_BATCH["pretrain_batch_size"]
        )
        stage2 = spec["bundle"].get("batch_size", train["batch_size"] or BUNDLE_BATCH["batch_size"])
        return spec["epochs"] * 25 * (stage1 + stage2)

    def needed(curve: str) -> int:
        result = json.loads((curves / f"learning_curve_{curve}.json").read_text())
        return plateau_epoch(result["validation"]) * result["iterations_per_epoch"] * result["batch_size"]

    pairs = [("2d", "embedded2d"), ("3d_patch", "embedded3d"), ("colin27", "colin27"), ("macaque", "macaque")]
    # Colin27's curve is not committed until it is measured again (its run was made from uncommitted code)
    pairs = [(s, c) for s, c in pairs if (curves / f"learning_curve_{c}.json").is_file()]
    assert len(pairs) >= 3
    for setting, curve in pairs:
        assert TASK_SETTINGS[curve] == setting  # the curve was measured on that setting's data and batches
        assert samples(setting) >= needed(curve), (setting, samples(setting), needed(curve))
    assert samples("2d_short") < needed("embedded2d")  # the short sweep stopped well before it


def test_portable_overrides_name_no_folder_of_the_machine(tmp_path):
    """Paths inside the checkout become relative to it; absolute paths outside it keep only their last
    two parts, so a committed run JSON holds no machine's folders."""
    inside = str(ROOT / "research" / "work" / "sweep" / "2d")
    out = sweep.portable({"a": inside, "b": str(tmp_path / "data" / "fraction_0.1"), "c": 3, "d": "relative/x"})
    assert out == {
        "a": "research/work/sweep/2d",
        "b": f"{sweep.OUTSIDE}/data/fraction_0.1",
        "c": 3,
        "d": "relative/x",
    }
