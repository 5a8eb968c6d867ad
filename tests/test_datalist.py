import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from custom.data.datalist import DatalistError, bundle_datalist, find_images, load_datalist


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
