import json
import shutil
from pathlib import Path

import hypothesis.strategies as st
import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from custom.data.datalist import (
    DatalistError,
    bundle_datalist,
    find_images,
    load_classes,
    load_datalist,
    load_unlabelled,
)


@pytest.fixture
def dataset(tiny_dataset, tmp_path):
    """A private, writable copy of the tiny dataset."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset.parent, root)
    return root / "datalist.json"


def _rewrite(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_good_datalist_loads_with_absolute_paths(dataset):
    items = load_datalist(dataset, "training", num_classes=3)
    assert len(items) == 2
    for item in items:
        assert item["image"].startswith(str(dataset.parent)) and item["label"].endswith(".nii.gz")
    assert len(load_datalist(dataset, "unlabeled", require_label=False)) == 2


def test_missing_datalist(tmp_path):
    with pytest.raises(DatalistError, match=r"missing\.json: datalist file does not exist"):
        load_datalist(tmp_path / "missing.json", "training")


def test_not_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("{not json")
    with pytest.raises(DatalistError, match=r"d\.json: datalist is not valid JSON"):
        load_datalist(path, "training")


def test_missing_and_empty_key(dataset):
    with pytest.raises(DatalistError, match="no 'nonsense' key"):
        load_datalist(dataset, "nonsense")
    _rewrite(dataset, training=[])
    with pytest.raises(DatalistError, match=r"datalist\.json: 'training' must be a non-empty list"):
        load_datalist(dataset, "training")


def test_entry_without_label(dataset):
    d = json.loads(dataset.read_text())
    _rewrite(dataset, training=[{"image": d["training"][0]["image"]}])
    with pytest.raises(DatalistError, match="has no 'label' path"):
        load_datalist(dataset, "training")


def test_duplicate_entry(dataset):
    d = json.loads(dataset.read_text())
    _rewrite(dataset, training=d["training"] + d["training"][:1])
    with pytest.raises(DatalistError, match="more than once"):
        load_datalist(dataset, "training")


def test_file_that_does_not_exist(dataset):
    _rewrite(dataset, training=[{"image": "imagesTr/nope.nii.gz", "label": "labelsTr/nope.nii.gz"}])
    with pytest.raises(DatalistError, match=r"names image .*nope\.nii\.gz, which does not exist"):
        load_datalist(dataset, "training")


def test_unreadable_image(dataset):
    entry = json.loads(dataset.read_text())["training"][0]
    image = dataset.parent / entry["image"]
    image.write_bytes(image.read_bytes()[:200])  # truncated gzip
    with pytest.raises(DatalistError, match=rf"{image.name}: cannot read image"):
        load_datalist(dataset, "training", num_classes=3)


def test_label_values_outside_declared_classes(dataset):
    entry = json.loads(dataset.read_text())["training"][1]
    label_path = dataset.parent / entry["label"]
    label = nib.load(label_path)
    data = np.asanyarray(label.dataobj).copy()
    data[0, 0] = 5
    nib.save(nib.Nifti1Image(data, label.affine), label_path)
    with pytest.raises(DatalistError, match=rf"{label_path.name}: label values \[5\] are outside .* 0..2"):
        load_datalist(dataset, "training", num_classes=3)


def test_image_label_shape_mismatch(dataset):
    entry = json.loads(dataset.read_text())["training"][0]
    label_path = dataset.parent / entry["label"]
    nib.save(nib.Nifti1Image(np.zeros((16, 32), np.uint8), np.eye(4)), label_path)
    with pytest.raises(DatalistError, match=r"label shape \(16, 32\) does not match image .* shape \(32, 32\)"):
        load_datalist(dataset, "training", num_classes=3)


def test_nan_intensities(dataset):
    entry = json.loads(dataset.read_text())["training"][0]
    path = dataset.parent / entry["image"]
    img = nib.load(path)
    data = img.get_fdata().astype(np.float32)
    data[3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), path)
    with pytest.raises(DatalistError, match="contains NaN or Inf"):
        load_datalist(dataset, "training", num_classes=3)


def test_bundle_loader_exits_with_one_line_message(tmp_path):
    with pytest.raises(SystemExit) as exc:
        bundle_datalist(tmp_path / "absent.json", "training")
    assert str(exc.value) == f"error: {tmp_path / 'absent.json'}: datalist file does not exist"


def test_find_images_folder_file_and_errors(dataset, tmp_path):
    folder = dataset.parent / "imagesTs"
    items = find_images(folder)
    assert [i["image"] for i in items] == sorted(str(p) for p in folder.glob("*.nii.gz"))
    assert find_images(items[0]["image"]) == items[:1]
    with pytest.raises(DatalistError, match="input does not exist"):
        find_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatalistError, match="folder has no images"):
        find_images(tmp_path / "empty")


def _replace_image(dataset, data, role="image", affine=None):
    entry = json.loads(dataset.read_text())["training"][0]
    path = dataset.parent / entry[role]
    old = nib.load(path)
    nib.save(nib.Nifti1Image(data, old.affine if affine is None else affine), path)
    return path


@pytest.mark.parametrize(
    "shape, what",
    [((32, 32, 3), "multi-channel"), ((32, 32, 1, 2), "4D"), ((32, 32, 8), "a volume given to a 2D bundle")],
)
def test_image_with_channels_or_extra_axes_is_refused(dataset, shape, what):
    path = _replace_image(dataset, np.ones(shape, np.float32))
    with pytest.raises(DatalistError, match=rf"{path.name}: image has shape \({shape[0]}, .*single-channel 2D images"):
        load_datalist(dataset, "training", num_classes=3, spatial_dims=2)


def test_trailing_length_one_axes_are_single_channel(dataset):
    entry = json.loads(dataset.read_text())["training"][0]
    image = nib.load(dataset.parent / entry["image"])
    _replace_image(dataset, image.get_fdata().astype(np.float32)[..., None, None])
    assert len(load_datalist(dataset, "training", num_classes=3, spatial_dims=2)) == 2


def test_label_on_another_grid_is_refused(dataset):
    entry = json.loads(dataset.read_text())["training"][0]
    label = nib.load(dataset.parent / entry["label"])
    shifted = label.affine.copy()
    shifted[0, 3] += 2.5  # same shape, moved 2.5 mm
    _replace_image(dataset, np.asanyarray(label.dataobj), role="label", affine=shifted)
    with pytest.raises(DatalistError, match=r"label affine differs from image .* by up to 2.5 mm"):
        load_datalist(dataset, "training", num_classes=3)
    nudged = label.affine.copy()
    nudged[0, 3] += 1e-5  # rounding-level difference: accepted
    _replace_image(dataset, np.asanyarray(label.dataobj), role="label", affine=nudged)
    assert len(load_datalist(dataset, "training", num_classes=3)) == 2


# -- fuzzing: whatever the JSON holds, the loader either returns entries or raises DatalistError ----
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
entries = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"image": st.sampled_from(["imagesTr/case_000.nii.gz", "missing.nii.gz", "", "."]) | st.text(max_size=10)},
        optional={"label": st.sampled_from(["labelsTr/case_000.nii.gz", "x.nii.gz"]) | json_values},
    ),
)
datalists = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"training": st.lists(entries, max_size=4) | json_values, "test": json_values}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=datalists, raw=st.booleans(), raw_bytes=st.binary(max_size=20))
def test_fuzzed_datalists_load_or_fail_with_a_datalist_error(tiny_dataset, content, raw, raw_bytes):
    path = tiny_dataset.parent / "fuzzed.json"
    path.write_bytes(raw_bytes if raw else json.dumps(content).encode())
    try:
        items = load_datalist(path, "training", num_classes=3, spatial_dims=2)
    except DatalistError as err:
        assert str(err).startswith(str(path)) or str(tiny_dataset.parent) in str(err)
    else:
        assert items and all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)
    finally:
        path.unlink()


def test_unlabelled_stream_comes_from_the_runs_own_datalist(dataset):
    labelled = load_datalist(dataset, "training", num_classes=3)
    unlabelled = load_unlabelled(None, "unlabeled", labelled, fallback_datalist=dataset, spatial_dims=2)
    assert unlabelled == load_datalist(dataset, "unlabeled", require_label=False)


def test_labelled_pairs_from_elsewhere_bring_only_their_own_images(dataset, tmp_path, caplog):
    """What MONAI Label hands over: labelled pairs that are not the bundle datalist's training cases."""
    elsewhere = tmp_path / "datastore"
    shutil.copytree(dataset.parent / "imagesTr", elsewhere)
    labelled = [{"image": str(p), "label": str(p)} for p in sorted(elsewhere.glob("*.nii.gz"))[:2]]
    unlabelled = load_unlabelled(None, "unlabeled", labelled, fallback_datalist=dataset)
    assert unlabelled == [{"image": item["image"]} for item in labelled]
    assert "labelled images stand in as unlabelled" in caplog.text
    assert load_unlabelled(None, "unlabeled", labelled, fallback_datalist=tmp_path / "absent.json") == unlabelled
    with pytest.raises(DatalistError, match="datalist file does not exist"):  # given explicitly: strict
        load_unlabelled(tmp_path / "absent.json", "unlabeled", labelled)


def test_classes_come_from_the_labels_and_a_default_stands_in_until_the_datalist_exists(tmp_path, tiny_dataset):
    missing = tmp_path / "not_generated_yet" / "datalist.json"
    assert load_classes(missing, default=["background", "a", "b"]) == ["background", "a", "b"]
    assert load_classes(missing, required=False) is None
    with pytest.raises(DatalistError, match="datalist file does not exist"):
        load_classes(missing)
    # once the datalist exists, its labels decide, whatever the default says
    assert load_classes(tiny_dataset, default=["background", "x"]) == ["background", "organ", "lesion"]


def test_a_dicom_series_given_to_the_2d_bundle_stops_in_one_line_even_with_one_slice(tmp_path):
    from conftest import write_dicom_series

    from custom.data.datalist import find_images

    write_dicom_series(tmp_path / "one", np.zeros((1, 24, 32), np.int16))
    with pytest.raises(DatalistError, match=r"one: image is a DICOM series \(1 slice\(s\)\).*inference_3d\.json"):
        find_images(tmp_path / "one", spatial_dims=2)
