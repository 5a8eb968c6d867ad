"""The plan from the dataset's fingerprint: real small NIfTI, NRRD and DICOM files written here, the plan's
rules checked value by value, overrides, the fingerprint cache, the command line, the bad-input lines and
the normalisation transforms."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_dicom_series
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity

from custom.data.plan import (
    MEMORY_MODELS,
    STEP_MARGIN,
    MemoryModel,
    Plan,
    PlanError,
    PlannedNormalize,
    PlannedNormalized,
    bundle_plan,
    derive_plan,
    fingerprint_datalist,
    fit_memory_model,
    largest_patch,
    main,
    make_plan,
    measure_point,
    modality_hint,
    otsu_threshold,
    target_spacing,
)

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------------
# small datasets, written as real files
# --------------------------------------------------------------------------------------------------------


def _save_nifti(path: Path, array: np.ndarray, spacing) -> str:
    affine = np.diag([*spacing, *([1.0] * (3 - len(spacing))), 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path.name


def _save_nrrd(path: Path, array: np.ndarray, spacing) -> str:
    import itk

    image = itk.image_from_array(np.ascontiguousarray(array.T))  # ITK's array order is reversed
    image.SetSpacing([float(s) for s in spacing])
    itk.imwrite(image, str(path))
    return path.name


def _mr_case(shape, rng, body_value=200.0):
    """An MR-like slice: noisy non-zero background, an elliptic body, an organ (1) and a lesion (2)."""
    yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    image = rng.normal(20.0, 5.0, shape)
    body = (yy / 0.8) ** 2 + (xx / 0.7) ** 2 < 1
    organ = (yy + 0.2) ** 2 + xx**2 < 0.15
    lesion = (yy - 0.3) ** 2 + (xx - 0.2) ** 2 < 0.01
    image[body] += body_value
    image[organ] += 80.0
    image[lesion] -= 60.0
    label = np.zeros(shape, np.uint8)
    label[organ], label[lesion] = 1, 2
    return image.astype(np.float32), label


def write_mr_2d(root: Path, shapes=((176, 208), (176, 208), (160, 192)), unlabelled=((160, 192), (176, 208))) -> Path:
    """Non-square 2D MR-like slices at 0.9 mm: labelled at ``shapes``, unlabelled at ``unlabelled``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    training, unlabeled = [], []
    for i, shape in enumerate(shapes):
        image, label = _mr_case(shape, rng)
        training.append(
            {
                "image": _save_nifti(root / f"img{i}.nii.gz", image, (0.9, 0.9)),
                "label": _save_nifti(root / f"lbl{i}.nii.gz", label, (0.9, 0.9)),
            }
        )
    for i, shape in enumerate(unlabelled):
        image, _ = _mr_case(shape, rng)
        unlabeled.append({"image": _save_nifti(root / f"u{i}.nii.gz", image, (0.9, 0.9))})
    content = {"labels": {"0": "background", "1": "organ", "2": "lesion"}, "training": training, "unlabeled": unlabeled}
    (root / "datalist.json").write_text(json.dumps(content))
    return root / "datalist.json"


def write_aniso_3d(root: Path, slice_spacings=(5.0, 5.0, 4.0), shape=(64, 80, 12)) -> Path:
    """Anisotropic volumes at 0.8 x 0.8 x ``slice_spacing`` mm with 12 slices (fewer than the default
    patch depth of 64)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    training = []
    for i, dz in enumerate(slice_spacings):
        image = rng.normal(100.0, 10.0, shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[20:40, 30:50, 3:9] = 1
        image[label == 1] += 50
        training.append(
            {
                "image": _save_nifti(root / f"v{i}.nii.gz", image, (0.8, 0.8, dz)),
                "label": _save_nifti(root / f"s{i}.nii.gz", label, (0.8, 0.8, dz)),
            }
        )
    content = {"labels": {"0": "background", "1": "tumour"}, "training": training}
    (root / "datalist.json").write_text(json.dumps(content))
    return root / "datalist.json"


def _ct_case(rng, shape=(96, 96)):
    """A CT-like slice in Hounsfield units: air at -1024, soft tissue ~40 HU, an organ ~80 HU, bone ~700."""
    yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    image = np.full(shape, -1024.0)
    body = yy**2 + xx**2 < 0.8
    image[body] = rng.normal(40.0, 15.0, int(body.sum()))
    organ = (yy + 0.1) ** 2 + (xx - 0.2) ** 2 < 0.1
    image[organ] = rng.normal(80.0, 20.0, int(organ.sum()))
    bone = (yy - 0.5) ** 2 + xx**2 < 0.01
    image[bone] = rng.normal(700.0, 100.0, int(bone.sum()))
    label = organ.astype(np.uint8)
    return np.rint(image).astype(np.int16), label


def write_ct_2d(root: Path, n: int = 3) -> tuple[Path, list[np.ndarray]]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    training, foreground = [], []
    for i in range(n):
        image, label = _ct_case(rng)
        foreground.append(image[label > 0].astype(np.float64))
        training.append(
            {
                "image": _save_nifti(root / f"ct{i}.nii.gz", image, (0.7, 0.7)),
                "label": _save_nifti(root / f"ctl{i}.nii.gz", label, (0.7, 0.7)),
            }
        )
    (root / "datalist.json").write_text(json.dumps({"labels": ["background", "organ"], "training": training}))
    return root / "datalist.json", foreground


def write_binary_nrrd(root: Path) -> tuple[Path, np.ndarray]:
    """A binary task in NRRD: two 2D cases at 1.2 x 0.6 mm; returns the datalist and the class counts."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    training, counts = [], np.zeros(2, np.int64)
    for i, shape in enumerate([(40, 72), (48, 64)]):
        label = np.zeros(shape, np.uint8)
        label[5 : 15 + 5 * i, 10:40] = 1
        image = (rng.normal(0.0, 1.0, shape) + 3 * label).astype(np.float32)
        counts += np.bincount(label.ravel(), minlength=2)
        training.append(
            {
                "image": _save_nrrd(root / f"b{i}.nrrd", image, (1.2, 0.6)),
                "label": _save_nrrd(root / f"bl{i}.nrrd", label, (1.2, 0.6)),
            }
        )
    (root / "datalist.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "vessel"}, "training": training})
    )
    return root / "datalist.json", counts


@pytest.fixture(scope="module")
def mr2d(tmp_path_factory) -> Path:
    return write_mr_2d(tmp_path_factory.mktemp("mr2d"))


@pytest.fixture(scope="module")
def mr2d_fingerprint(mr2d) -> dict:
    return fingerprint_datalist(mr2d, spatial_dims=2)


@pytest.fixture(scope="module")
def aniso3d(tmp_path_factory) -> Path:
    return write_aniso_3d(tmp_path_factory.mktemp("aniso3d"))


@pytest.fixture(scope="module")
def aniso3d_fingerprint(aniso3d) -> dict:
    return fingerprint_datalist(aniso3d, spatial_dims=3)


def _expected_batches(model: MemoryModel, roi, budget_gb: float) -> tuple[int, int, int]:
    n = model.samples_that_fit(roi, budget_gb * 2**30 / STEP_MARGIN)
    return min(max(n // 2, 1), 2), min(max(n // 2, 1), 2), min(max(n, 1), 6)


# --------------------------------------------------------------------------------------------------------
# fingerprint and plan on each dataset
# --------------------------------------------------------------------------------------------------------


def test_mr_2d_plan_trains_whole_non_square_images_at_their_spacing(mr2d_fingerprint):
    fp = mr2d_fingerprint
    assert (fp["num_labelled"], fp["num_unlabelled"], fp["unlabelled_listed"], fp["skipped"]) == (3, 0, 2, [])
    with_unlabelled = fingerprint_datalist(fp["datalist"], spatial_dims=2, max_unlabelled=16)
    assert with_unlabelled["num_unlabelled"] == 2 and with_unlabelled["key"] != fp["key"]
    assert {tuple(c["shape"]) for c in fp["cases"]} == {(176, 208), (160, 192)}
    assert all(np.allclose(c["spacing"], [0.9, 0.9]) for c in fp["cases"])
    assert fp["modality"] == "MR"

    plan = derive_plan(fp, 2, 8.0)
    assert plan.pixdim == [0.9, 0.9]
    assert plan.roi_size == [176, 208]  # the median labelled image (2 of 3), already multiples of 16
    assert plan.normalisation == {"kind": "zscore_foreground", "clip": None, "mean": None, "std": None}
    assert plan.modality == "MR" and plan.axcodes == "RA"
    expected = _expected_batches(MEMORY_MODELS[2], [176, 208], 8.0)
    assert (plan.batch_size, plan.unlabelled_batch_size, plan.pretrain_batch_size) == expected
    assert (plan.batch_size, plan.unlabelled_batch_size, plan.pretrain_batch_size) == (2, 2, 6)  # the bundle's
    assert plan.step_memory_gb <= 8.0
    assert plan.overridden == []


def test_2d_roi_rounds_the_median_up_to_16_and_shrinks_with_its_aspect_ratio(mr2d_fingerprint):
    # pixdim 1.2 mm: the median image is 132 x 156 voxels, trained whole as 144 x 160
    assert derive_plan(mr2d_fingerprint, 2, 8.0, pixdim=[1.2, 1.2]).roi_size == [144, 160]
    # a budget of exactly four 160 x 176 patches at one byte a voxel: 176 x 208 -> 176 x 192 -> 160 x 192 ->
    # 160 x 176 (each step takes 16 off the side longest relative to the median image)
    memory = MemoryModel(fixed=0.0, transient=0.0, per_sample=0.0, per_voxel=1.0)
    plan = derive_plan(mr2d_fingerprint, 2, 4 * 160 * 176 / 2**30, memory=memory, margin=1.0)
    assert plan.roi_size == [160, 176]
    assert (plan.batch_size, plan.unlabelled_batch_size, plan.pretrain_batch_size) == (2, 2, 4)
    # one byte less: the next shrink
    assert derive_plan(mr2d_fingerprint, 2, (4 * 160 * 176 - 1) / 2**30, memory=memory, margin=1.0).roi_size == [
        144,
        176,
    ]
    # the margin for the rest of a stage 2 step divides the budget
    assert derive_plan(mr2d_fingerprint, 2, 2 * 4 * 160 * 176 / 2**30, memory=memory, margin=2.0).roi_size == [160, 176]


def test_anisotropic_3d_plan_keeps_thick_slices_and_a_patch_no_deeper_than_the_data(aniso3d_fingerprint):
    fp = aniso3d_fingerprint
    assert [c["spacing"] for c in fp["cases"]] == [[0.8, 0.8, 5.0], [0.8, 0.8, 5.0], [0.8, 0.8, 4.0]]
    plan = derive_plan(fp, 3, 8.0)
    # median 0.8 x 0.8 x 5 (ratio 6.25 > 3) and only 12 slices (12 * 3 < 80): the slice axis takes the 10th
    # percentile of the slice spacings, 4.2 mm, rather than resampling the 4 mm volume to 5 mm
    assert plan.pixdim == [0.8, 0.8, 4.2]
    # depth: median of 12 * 5 / 4.2 = 14.3 slices -> 16, never the default 64; in-plane the whole 64 x 80
    assert plan.roi_size == [64, 80, 16]
    assert plan.axcodes == "RAS"
    expected = _expected_batches(MEMORY_MODELS[3], [64, 80, 16], 8.0)
    assert (plan.batch_size, plan.unlabelled_batch_size, plan.pretrain_batch_size) == expected
    assert plan.batch_size >= 2


def test_3d_patch_shrinks_to_the_largest_that_fits_the_budget(aniso3d_fingerprint):
    memory = MemoryModel(fixed=0.0, transient=0.0, per_sample=0.0, per_voxel=1.0)
    # [64, 80, 16] -> [64, 64, 16] -> [48, 64, 16] -> [48, 48, 16]; the 16-slice axis is never cut
    plan = derive_plan(aniso3d_fingerprint, 3, 4 * 48 * 48 * 16 / 2**30, memory=memory, margin=1.0)
    assert plan.roi_size == [48, 48, 16]
    assert plan.batch_size == 2
    # a budget that fits 2 but not 4 patches of 16^3 keeps 16^3 at batch 1 + 1
    plan = derive_plan(aniso3d_fingerprint, 3, 3 * 16**3 / 2**30, memory=memory, margin=1.0)
    assert plan.roi_size == [16, 16, 16]
    assert (plan.batch_size, plan.unlabelled_batch_size, plan.pretrain_batch_size) == (1, 1, 3)


def test_anisotropy_rule_keeps_the_median_when_the_coarse_axis_has_many_voxels():
    spacings = [[0.8, 0.8, 5.0], [0.8, 0.8, 5.0], [0.8, 0.8, 4.0]]
    assert target_spacing(spacings, [[64, 80, 12]] * 3)[0] == [0.8, 0.8, 4.2]
    assert target_spacing(spacings, [[64, 80, 60]] * 3)[0] == [0.8, 0.8, 5.0]  # 60 * 3 >= 80: not few voxels
    assert target_spacing([[1.0, 1.0, 2.5]] * 2 + [[1.0, 1.0, 1.0]], [[64, 64, 10]] * 3)[0] == [1.0, 1.0, 2.5]
    # the 10th percentile is never finer than the in-plane spacing
    assert target_spacing([[2.0, 2.0, 8.0]] * 4 + [[2.0, 2.0, 1.0]] * 2, [[64, 64, 8]] * 6)[0] == [2.0, 2.0, 2.0]


def test_largest_patch_is_none_when_not_even_16_fits():
    assert largest_patch([100.0, 50.0], lambda roi: False) is None
    assert largest_patch([100.0, 50.0], lambda roi: True) == [112, 64]
    assert largest_patch([10.0, 3.0], lambda roi: True) == [16, 16]


def test_ct_plan_clips_and_z_scores_with_the_foreground_statistics(tmp_path):
    datalist, foreground = write_ct_2d(tmp_path / "ct")
    fp = fingerprint_datalist(datalist, spatial_dims=2)
    assert fp["modality"] == "CT"
    assert fp["intensity"]["min"] == -1024
    plan = derive_plan(fp, 2, 8.0)
    fg = np.concatenate(foreground)  # fewer voxels than the per-image sample: the statistics are exact
    assert plan.modality == "CT"
    assert plan.normalisation["kind"] == "clip_zscore"
    assert plan.normalisation["clip"] == pytest.approx(np.percentile(fg, [0.5, 99.5]), abs=0.01)
    assert plan.normalisation["mean"] == pytest.approx(fg.mean(), abs=1e-3)
    assert plan.normalisation["std"] == pytest.approx(fg.std(), abs=1e-3)
    assert plan.pixdim == [0.7, 0.7] and plan.roi_size == [96, 96]
    # MR for the same data when given, and the clip constants of the data when only the kind is given
    assert derive_plan(fp, 2, 8.0, modality="MR").normalisation["kind"] == "zscore_foreground"
    assert derive_plan(fp, 2, 8.0, normalisation={"kind": "clip_zscore"}).normalisation == plan.normalisation


def test_modality_hint():
    assert modality_hint([-1024, -1000, -1024], [1500, 900, 3000]) == "CT"
    assert modality_hint([-3024, -3024], [2000, 2500]) == "CT"  # scanner padding below air
    assert modality_hint([0, 0, 0], [4000, 3500, 3800]) == "MR"
    assert modality_hint([-1.2, -2.0], [3.0, 4.0]) == "MR"  # already normalised
    assert modality_hint([-1024, -1024], [-500, -400]) == "MR"  # air alone is no CT range


def test_binary_nrrd_class_fractions_and_spacing(tmp_path):
    datalist, counts = write_binary_nrrd(tmp_path / "bin")
    plan = make_plan(datalist, spatial_dims=2)
    assert plan.class_fractions == pytest.approx(
        {"background": counts[0] / counts.sum(), "vessel": counts[1] / counts.sum()}, abs=1e-6
    )
    assert plan.pixdim == [1.2, 0.6]
    # median shape 44 x 68 at 1.2 x 0.6 mm -> 48 x 80
    assert plan.roi_size == [48, 80]
    assert plan.normalisation["kind"] == "zscore_foreground"


def test_dicom_series_folder_is_fingerprinted_with_its_header_spacing(tmp_path):
    root = write_aniso_3d(tmp_path / "d", slice_spacings=(5.0,))
    volume = np.full((6, 20, 24), 24)  # stored 24 -> -1000 HU after the rescale
    write_dicom_series(root.parent / "series", volume)
    content = json.loads(root.read_text())
    content["unlabeled"] = [{"image": "series"}]
    root.write_text(json.dumps(content))
    fp = fingerprint_datalist(root, spatial_dims=3, max_unlabelled=1)
    dicom = [c for c in fp["cases"] if c["label"] is None]
    assert len(dicom) == 1 and dicom[0]["shape"] == [24, 20, 6]
    assert dicom[0]["spacing"] == pytest.approx([0.8, 0.7, 2.5])
    assert dicom[0]["intensity"]["min"] == pytest.approx(-1000.0)


# --------------------------------------------------------------------------------------------------------
# overrides, serialisation, cache
# --------------------------------------------------------------------------------------------------------


def test_overrides_are_kept_and_the_rest_follows_them(mr2d_fingerprint):
    plan = derive_plan(
        mr2d_fingerprint,
        2,
        8.0,
        pixdim=[1.8, 1.8],
        batch_size=3,
        normalisation={"kind": "zscore"},
    )
    assert plan.pixdim == [1.8, 1.8]
    assert plan.roi_size == [96, 112]  # derived from the given pixdim: 88 x 104 voxels -> 96 x 112
    assert plan.batch_size == 3 and plan.normalisation["kind"] == "zscore"
    assert set(plan.overridden) == {"pixdim", "batch_size", "normalisation"}
    given = derive_plan(mr2d_fingerprint, 2, 8.0, roi_size=[128, 64], pretrain_batch_size=1, modality="CT")
    assert given.roi_size == [128, 64] and given.pretrain_batch_size == 1 and given.modality == "CT"
    with pytest.raises(ValueError, match="multiples of 16"):
        derive_plan(mr2d_fingerprint, 2, 8.0, roi_size=[100, 64])
    with pytest.raises(ValueError, match="pixdim must be 2 positive values"):
        derive_plan(mr2d_fingerprint, 2, 8.0, pixdim=[1.0])


def test_plan_round_trips_through_json_and_describes_itself_on_one_screen(mr2d_fingerprint):
    plan = derive_plan(mr2d_fingerprint, 2, 8.0)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    text = plan.describe()
    assert len(text.splitlines()) <= 20
    assert "roi_size     176 x 208" in text and "pixdim       0.9 x 0.9 mm" in text
    with pytest.raises(ValueError, match="plan version"):
        Plan.from_dict({**plan.to_dict(), "version": 99})


def test_fingerprint_cache_is_reused_and_recomputed_after_a_change(tmp_path):
    datalist = write_mr_2d(tmp_path / "data", shapes=((64, 80), (64, 80)), unlabelled=())
    cache = tmp_path / "run" / "fingerprint.json"
    first = fingerprint_datalist(datalist, 2, cache=cache)
    assert cache.is_file() and json.loads(cache.read_text())["key"] == first["key"]
    marked = {**first, "modality": "CT-from-cache"}  # the same key: a second call must return this
    cache.write_text(json.dumps(marked))
    assert fingerprint_datalist(datalist, 2, cache=cache)["modality"] == "CT-from-cache"

    image, label = _mr_case((64, 96), np.random.default_rng(9))  # a changed case
    _save_nifti(datalist.parent / "img1.nii.gz", image, (0.9, 0.9))
    _save_nifti(datalist.parent / "lbl1.nii.gz", label, (0.9, 0.9))
    again = fingerprint_datalist(datalist, 2, cache=cache)
    assert again["modality"] == "MR" and again["key"] != first["key"]
    assert sorted(c["shape"][1] for c in again["cases"]) == [80, 96]

    content = json.loads(datalist.read_text())  # a changed datalist (one case less)
    content["training"] = content["training"][:1]
    datalist.write_text(json.dumps(content))
    assert fingerprint_datalist(datalist, 2, cache=cache)["num_labelled"] == 1
    # other settings are other fingerprints
    assert fingerprint_datalist(datalist, 2, axcodes="LP", cache=cache)["key"] != again["key"]


# --------------------------------------------------------------------------------------------------------
# command line and bad input
# --------------------------------------------------------------------------------------------------------


def test_cli_prints_the_plan_and_writes_it(mr2d, tmp_path, capsys):
    out = tmp_path / "run" / "plan.json"
    main(["--datalist", str(mr2d), "--out", str(out), "--memory-gb", "4"])
    text = capsys.readouterr().out
    assert "roi_size     176 x 208" in text and f"plan written to {out}" in text
    plan = Plan.from_dict(json.loads(out.read_text()))
    assert plan.memory_budget_gb == 4.0 and plan.roi_size == [176, 208]
    assert (out.parent / "fingerprint.json").is_file()  # cached beside the run
    main(["--datalist", str(mr2d), "--pixdim", "1.2", "1.2", "--batch-size", "2"])
    text = capsys.readouterr().out
    assert "pixdim       1.2 x 1.2 mm  [given]" in text and "given: batch_size" in text


def test_cli_as_a_module_in_3d(aniso3d):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "custom.data.plan", "--datalist", str(aniso3d), "--spatial-dims", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pixdim       0.8 x 0.8 x 4.2 mm" in out.stdout and "roi_size     64 x 80 x 16" in out.stdout


def _error_line(argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_naming_the_datalist(tmp_path, mr2d):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"training": [], "unlabeled": [{"image": "x.nii.gz"}]}))
    assert _error_line(["--datalist", str(empty)]) == (
        f"error: {empty}: no labelled images to fingerprint (the 'training' list is missing or empty)"
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.nii.gz").write_bytes(b"not an image")
    (broken / "l.nii.gz").write_bytes(b"not a label")
    (broken / "d.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "l.nii.gz"}]}))
    line = _error_line(["--datalist", str(broken / "d.json")])
    assert line.startswith(f"error: {broken / 'd.json'}: no readable labelled image to fingerprint (1 listed; ")
    assert "a.nii.gz: cannot read image" in line
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"training": [{"image": "nope.nii.gz", "label": "nope.nii.gz"}]}))
    assert "which does not exist" in _error_line(["--datalist", str(missing)])
    line = _error_line(["--datalist", str(mr2d), "--memory-gb", "0.01"])
    assert line.startswith(f"error: {mr2d}: even a 16x16 patch with batch 1") and "0.01 GB memory budget" in line
    assert "multiples of 16" in _error_line(["--datalist", str(mr2d), "--roi-size", "100", "64"])
    assert "axcodes 'RAS' has 3 letters" in _error_line(["--datalist", str(mr2d), "--axcodes", "RAS"])
    with pytest.raises(SystemExit, match=r"^error: .*empty\.json: no labelled images to fingerprint"):
        bundle_plan(empty)  # what configs call
    with pytest.raises(PlanError, match="fingerprint is of 2D images, the plan asked for 3D"):
        derive_plan(fingerprint_datalist(mr2d, 2), 3)


def test_a_3d_image_in_a_2d_plan_is_skipped_and_named(tmp_path, aniso3d):
    line = _error_line(["--datalist", str(aniso3d), "--spatial-dims", "2"])
    assert "no readable labelled image" in line and "single-channel 2D images" in line


# --------------------------------------------------------------------------------------------------------
# normalisation transforms
# --------------------------------------------------------------------------------------------------------


def test_ct_normalisation_clips_then_z_scores_and_keeps_the_metadata():
    norm = {"kind": "clip_zscore", "clip": [-100.0, 300.0], "mean": 50.0, "std": 25.0}
    affine = torch.diag(torch.tensor([0.7, 0.7, 1.0, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.tensor([[[-1024.0, 0.0, 50.0, 1000.0]]]), affine=affine)
    out = PlannedNormalized("image", norm)({"image": image, "label": 1})
    assert torch.allclose(out["image"].as_tensor(), torch.tensor([[[-6.0, -2.0, 0.0, 10.0]]]))
    assert isinstance(out["image"], MetaTensor) and torch.equal(out["image"].affine, affine)
    assert out["label"] == 1
    numpy_out = PlannedNormalize(norm)(np.array([[[-1024.0, 300.0]]], dtype=np.float32))
    assert isinstance(numpy_out, np.ndarray) and np.allclose(numpy_out, [[[-6.0, 10.0]]])


def test_mr_foreground_z_score_ignores_how_much_background_the_image_has():
    """The same body in a small and in a large field of view: the foreground z-score maps the body to the
    same values, the whole-image z-score (NormalizeIntensity) does not."""
    rng = np.random.default_rng(0)
    body = rng.normal(300.0, 30.0, (40, 40)).astype(np.float32)

    def framed(size: int) -> torch.Tensor:
        image = rng.normal(15.0, 4.0, (size, size)).astype(np.float32)
        image[:40, :40] = body
        return torch.from_numpy(image)[None]

    small, large = framed(48), framed(160)
    norm = PlannedNormalize({"kind": "zscore_foreground"})
    a, b = norm(small)[0, :40, :40], norm(large)[0, :40, :40]
    assert torch.allclose(a, b, atol=0.02)
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std(unbiased=False)) - 1) < 0.01
    whole = NormalizeIntensity()
    assert not torch.allclose(whole(small)[0, :40, :40], whole(large)[0, :40, :40], atol=0.5)
    assert 15.0 < otsu_threshold(large) < 300.0
    # a constant image does not divide by zero; the whole-image z-score kind matches NormalizeIntensity
    assert torch.equal(norm(torch.full((1, 8, 8), 5.0)), torch.zeros(1, 8, 8))
    assert torch.allclose(PlannedNormalize({"kind": "zscore"})(small), whole(small), atol=1e-5)


def test_normalisation_is_validated():
    with pytest.raises(ValueError, match="kind must be one of"):
        PlannedNormalize({"kind": "minmax"})
    with pytest.raises(ValueError, match="clip_zscore needs clip"):
        PlannedNormalize({"kind": "clip_zscore", "clip": [300, -100], "mean": 0, "std": 1})


def test_transform_takes_the_plan_itself(mr2d_fingerprint):
    plan = derive_plan(mr2d_fingerprint, 2, 8.0)
    assert PlannedNormalized("image", plan).normaliser.normalisation == plan.normalisation


# --------------------------------------------------------------------------------------------------------
# memory model
# --------------------------------------------------------------------------------------------------------


def test_memory_model_fit_recovers_its_coefficients_and_counts_samples():
    truth = MemoryModel(fixed=5e7, transient=300.0, per_sample=2e6, per_voxel=900.0, floor=6e7)
    points = [(roi, b, truth.step_bytes(roi, b)) for roi in ([128, 128], [256, 256], [96, 512]) for b in (1, 2, 3)]
    fitted = fit_memory_model(points, floor=6e7)
    for name in ("fixed", "transient", "per_sample", "per_voxel", "floor"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6)
    budget = truth.step_bytes([64, 64], 5)
    assert truth.samples_that_fit([64, 64], budget) == 5
    assert truth.samples_that_fit([64, 64], budget - 1) == 4
    assert truth.samples_that_fit([16, 16], 5.9e7) == 0  # under the floor: nothing fits
    assert truth.step_bytes([16, 16], 1) == 6e7


def test_memory_model_fit_drops_a_term_that_noise_makes_negative():
    # 1e8 fixed + 1.5 kB a voxel, one point 2 MB low: an exact fit of all four terms has a negative per-sample
    def peak(v: int, b: int) -> float:
        return 1.0e8 + b * 1.5e3 * v

    points = [([256, 256], 1, peak(65536, 1)), ([256, 256], 2, peak(65536, 2) - 2e6)]
    points += [([512, 512], 1, peak(262144, 1)), ([512, 512], 2, peak(262144, 2))]
    rows = np.asarray([[1.0, math.prod(r), b, b * math.prod(r)] for r, b, _ in points])
    assert np.linalg.lstsq(rows, np.asarray([p for *_, p in points]), rcond=None)[0].min() < 0
    fitted = fit_memory_model(points)
    assert min(fitted.fixed, fitted.transient, fitted.per_sample, fitted.per_voxel) >= 0
    assert fitted.per_voxel == pytest.approx(1.5e3, rel=0.02) and fitted.fixed == pytest.approx(1e8, rel=0.02)


def test_memory_constants_are_measured_and_grow_with_the_patch():
    for dims, model in MEMORY_MODELS.items():
        assert model.fixed > 0 and model.per_voxel > 0, dims
        assert model.step_bytes([160] * dims, 2) > model.step_bytes([32] * dims, 2) >= model.floor > model.fixed


def test_measure_point_runs_the_real_student_in_a_fresh_process():
    tiny = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 2, "num_layers": 4, "feature_size": 8}
    peak = measure_point([128, 128], 2, tiny)
    # a step of the tiny student takes some memory, and a plausible amount (the exact figure depends on the
    # allocator and threads of the process that runs it, so only the machinery is checked here)
    assert 2**20 < peak < 2**31
