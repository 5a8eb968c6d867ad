import hashlib
import json

import hypothesis.strategies as st
import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from scipy import ndimage

from custom.data.phantoms import (
    PhantomConfig,
    embedded_classes,
    ensure_dataset,
    generate_dataset,
    hidden_label_items,
    make_case,
)


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path):
    params = {
        "shape": (32, 32),
        "num_train": 3,
        "num_validation": 1,
        "num_test": 1,
        "seed": 7,
        "labelled_fraction": 0.34,
    }
    generate_dataset(tmp_path / "a", **params)
    generate_dataset(tmp_path / "b", **params)
    generate_dataset(tmp_path / "c", **{**params, "seed": 8})
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_datalist_splits_and_labelled_fraction(tmp_path):
    path = generate_dataset(tmp_path, shape=(32, 32), num_train=10, num_validation=2, num_test=3, labelled_fraction=0.2)
    d = json.loads(path.read_text())
    assert len(d["training"]) == 2 and len(d["unlabeled"]) == 8
    assert len(d["validation"]) == 2 and len(d["test"]) == 3
    assert all(set(e) == {"image", "label"} for e in d["training"] + d["validation"] + d["test"])
    assert all(set(e) == {"image"} for e in d["unlabeled"])
    train_images = {e["image"] for e in d["training"] + d["unlabeled"]}
    assert not train_images & {e["image"] for e in d["test"] + d["validation"]}
    for e in d["training"] + d["test"]:
        assert (tmp_path / e["image"]).is_file() and (tmp_path / e["label"]).is_file()
    assert d["labels"] == {"0": "background", "1": "organ", "2": "lesion"}


def test_labels_are_organ_with_lesions_inside():
    cfg = PhantomConfig().resolved()
    lesions = 0
    for i in range(20):
        image, label = make_case(cfg, np.random.default_rng([3, i]))
        assert image.shape == label.shape == (128, 128) and image.dtype == np.float32
        assert set(np.unique(label)) <= {0, 1, 2}
        assert (label == 1).sum() > 200  # the organ is always there and sizeable
        lesions += (label == 2).any()
        # every lesion lies in the organ: each connected lesion borders organ voxels
        lesion_parts, n = ndimage.label(label == 2)
        for k in range(1, n + 1):
            part = lesion_parts == k
            assert (label[ndimage.binary_dilation(part) & ~part] == 1).any()
    assert 10 <= lesions < 20  # most cases have lesions, some have none


def test_classes_overlap_in_intensity():
    """The task is not solvable by thresholding: organ and lesion intensities overlap."""
    cfg = PhantomConfig().resolved()
    organ, lesion = [], []
    for i in range(10):
        image, label = make_case(cfg, np.random.default_rng([5, i]))
        organ.append(image[label == 1])
        lesion.append(image[label == 2])
    organ, lesion = np.concatenate(organ), np.concatenate(lesion)
    lo, hi = np.percentile(organ, [5, 95])
    assert ((lesion > lo) & (lesion < hi)).mean() > 0.3


def test_3d_volume_has_anisotropic_affine(tmp_path):
    path = generate_dataset(
        tmp_path, spatial_dims=3, shape=(32, 32, 16), num_train=1, num_validation=0, num_test=0, labelled_fraction=1.0
    )
    entry = json.loads(path.read_text())["training"][0]
    img = nib.load(tmp_path / entry["image"])
    assert img.shape == (32, 32, 16)
    assert np.allclose(img.header.get_zooms(), (1.25, 1.25, 2.0))
    assert np.allclose(np.diag(img.affine)[:3], (1.25, 1.25, 2.0))


def test_ensure_dataset_reuses_matching_and_regenerates_changed(tmp_path):
    params = {"shape": (32, 32), "num_train": 2, "num_validation": 1, "num_test": 1, "labelled_fraction": 0.34}
    path = ensure_dataset(tmp_path, **params)
    stamp = path.stat().st_mtime_ns
    assert ensure_dataset(tmp_path, **params).stat().st_mtime_ns == stamp
    ensure_dataset(tmp_path, **{**params, "num_train": 3})
    assert len(json.loads(path.read_text())["training"]) == 1
    assert len(json.loads(path.read_text())["unlabeled"]) == 2


@pytest.mark.parametrize("bad", [{"spatial_dims": 4}, {"labelled_fraction": 0.0}, {"shape": (32, 32, 32)}])
def test_invalid_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        PhantomConfig(**bad).resolved()


def test_a_labelled_fraction_with_no_labelled_case_stops_the_run(tmp_path):
    with pytest.raises(SystemExit, match=r"embedded data in .*: labelled_fraction 0.1 of 4 training cases leaves no"):
        ensure_dataset(tmp_path, num_train=4, labelled_fraction=0.1)
    assert not list(tmp_path.iterdir())  # nothing written


@settings(max_examples=200, deadline=None)
@given(
    spatial_dims=st.integers(-1, 5),
    shape=st.none() | st.lists(st.integers(-4, 70), max_size=4),
    labelled_fraction=st.floats(-1, 2) | st.just(float("nan")),
    num_train=st.integers(-2, 100),
    num_validation=st.integers(-2, 5),
)
def test_fuzzed_generator_settings_resolve_or_fail_with_a_value_error(
    spatial_dims, shape, labelled_fraction, num_train, num_validation
):
    cfg = PhantomConfig(
        spatial_dims=spatial_dims,
        shape=shape,
        labelled_fraction=labelled_fraction,
        num_train=num_train,
        num_validation=num_validation,
    )
    try:
        resolved = cfg.resolved()
    except ValueError as err:
        assert str(err)
    else:
        assert resolved.spatial_dims in (2, 3) and len(resolved.shape) == resolved.spatial_dims
        assert min(resolved.shape) >= 8 and 1 <= resolved.num_labelled <= resolved.num_train


def test_embedded_classes_are_the_datalists_labels_and_unlabelled_images_keep_hidden_labels(tmp_path):
    path = generate_dataset(tmp_path, spatial_dims=2, shape=(32, 32), num_train=4, labelled_fraction=0.5, seed=3)
    datalist = json.loads(path.read_text())
    assert embedded_classes() == [datalist["labels"][str(v)] for v in range(len(datalist["labels"]))]
    items = hidden_label_items(path)
    assert len(items) == len(datalist["unlabeled"]) == 2 and len(hidden_label_items(path, limit=1)) == 1
    for item, entry in zip(items, datalist["unlabeled"], strict=True):
        assert item["image"] == str((tmp_path / entry["image"]).resolve())
        assert nib.load(item["label"]).shape == nib.load(item["image"]).shape  # the label training never sees
        assert set(np.unique(np.asanyarray(nib.load(item["label"]).dataobj))) <= {0, 1, 2}
