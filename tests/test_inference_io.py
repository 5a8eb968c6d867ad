"""Inference inputs beyond NIfTI: a DICOM series folder and NRRD/MetaImage via ITK, each written by the
test itself; the segmentation comes back as NIfTI in the input's space."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, TINY_NET, save_student, write_dicom_series
from monai.bundle import run
from monai.transforms import LoadImage

from custom.data.datalist import DatalistError, check_dicom_series, find_images

INFER = [str(CONFIGS / "inference.json"), str(CONFIGS / "inference_3d.json")]
SLOPE, INTERCEPT = 2.0, -100.0


def write_series(folder: Path, volume: np.ndarray, **options) -> Path:
    """``volume`` as an axial CT series in ``folder`` (rescale SLOPE, INTERCEPT); returns the folder."""
    write_dicom_series(folder, volume, rescale=(SLOPE, INTERCEPT), **options)
    return folder


@pytest.fixture
def model_3d(tmp_path):
    """A tiny 3D student checkpoint (untrained: these tests check geometry, not accuracy)."""
    from custom.networks.student import UnCoLStudent

    torch.manual_seed(0)
    net = UnCoLStudent(spatial_dims=3, **{k.split("#")[1]: v for k, v in TINY_NET.items()})
    path = tmp_path / "model.pt"
    return save_student(net, path)


def _infer(ckpt, src, out):
    run("inference", config_file=INFER, ckpt_path=str(ckpt), input_dir=str(src), output_dir=str(out),
        roi_size=[32, 32, 16], **TINY_NET)  # fmt: skip


def test_dicom_series_is_read_sorted_by_position_with_rescale_and_spacing(tmp_path):
    volume = np.random.default_rng(0).integers(0, 1000, (6, 20, 24))
    folder = write_series(tmp_path / "series", volume)
    (item,) = find_images(folder)
    image = LoadImage(image_only=True, reader="ITKReader")(item["image"])
    # MONAI/ITK order (x, y, z): x = columns, y = rows, z = slices sorted by position
    assert image.shape == (24, 20, 6)
    assert np.allclose(np.asarray(image), SLOPE * volume.transpose(2, 1, 0) + INTERCEPT)
    assert np.allclose(image.pixdim[:3].numpy(), [0.8, 0.7, 2.5])


def test_dicom_series_problems_are_named(tmp_path):
    volume = np.zeros((5, 8, 8))
    with pytest.raises(DatalistError, match="slice is missing"):
        check_dicom_series(write_series(tmp_path / "gap", volume, skip={2}))
    mixed = write_series(tmp_path / "mixed", volume)
    write_series(mixed / "..", volume[:1], series_uid="1.2.3.4")  # into its parent, then move in
    (tmp_path / "slice_001.dcm").rename(mixed / "other.dcm")
    with pytest.raises(DatalistError, match="mixes 2 DICOM series"):
        check_dicom_series(mixed)
    uneven = write_series(tmp_path / "uneven", volume)
    import pydicom

    ds = pydicom.dcmread(uneven / "slice_001.dcm")  # the last slice: move it 0.4 mm
    ds.ImagePositionPatient = [-20.0, -30.0, 10.0 + 4 * 2.5 + 0.4]
    ds.save_as(uneven / "slice_001.dcm")
    with pytest.raises(DatalistError, match="inconsistent slice spacing"):
        check_dicom_series(uneven)


def test_inference_on_a_dicom_series_writes_nifti_in_its_space(tmp_path, model_3d):
    src = tmp_path / "in"
    volume = np.random.default_rng(1).integers(0, 1000, (16, 40, 36))
    write_series(src / "ct_series", volume)
    _infer(model_3d, src, tmp_path / "out")
    seg = nib.load(tmp_path / "out" / "ct_series_seg.nii.gz")
    expected = LoadImage(image_only=True, reader="ITKReader")(str(src / "ct_series"))
    assert seg.shape == expected.shape == (36, 40, 16)
    assert np.allclose(seg.affine, expected.affine.numpy(), atol=1e-4)
    assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2}


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_inference_on_itk_formats_writes_nifti_in_their_space(tmp_path, model_3d, suffix):
    import itk

    array = np.random.default_rng(2).normal(0, 1, (12, 30, 26)).astype(np.float32)  # ITK order z, y, x
    image = itk.image_from_array(array)
    image.SetSpacing([0.9, 1.1, 2.0])
    image.SetOrigin([5.0, -7.0, 12.0])
    src = tmp_path / "in"
    src.mkdir()
    itk.imwrite(image, str(src / f"case{suffix}"))
    _infer(model_3d, src, tmp_path / "out")
    seg = nib.load(tmp_path / "out" / "case_seg.nii.gz")
    expected = LoadImage(image_only=True)(str(src / f"case{suffix}"))
    assert seg.shape == expected.shape == (26, 30, 12)
    assert np.allclose(seg.affine, expected.affine.numpy(), atol=1e-4)


def test_inference_keeps_only_the_largest_component_of_the_chosen_classes(tmp_path, model_3d):
    from scipy import ndimage

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    nib.save(nib.Nifti1Image(rng.normal(0, 1, (40, 36, 16)).astype(np.float32), np.eye(4)), src / "noise.nii.gz")

    def segment(out: str, **overrides) -> np.ndarray:
        run("inference", config_file=INFER, ckpt_path=str(model_3d), input_dir=str(src), output_dir=str(tmp_path / out),
            roi_size=[32, 32, 16], **TINY_NET, **overrides)  # fmt: skip
        return np.asanyarray(nib.load(tmp_path / out / "noise_seg.nii.gz").dataobj)

    def count(mask: np.ndarray) -> int:
        return ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]

    raw, kept = segment("raw"), segment("kept", largest_component_labels=[1])
    assert count(raw == 1) > 1, "the untrained student scatters class 1 (the premise of this test)"
    assert count(kept == 1) == 1 and np.array_equal(kept == 2, raw == 2)
    assert set(np.unique(raw[raw != kept])) == {1} and set(np.unique(kept[raw != kept])) == {0}
