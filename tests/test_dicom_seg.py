"""DICOM-SEG output: a synthetic CT series written with pydicom, a label map in its geometry written as
the bundle writes it (ITK's reading of the series, saved as NIfTI), the Segmentation read back with
highdicom and rebuilt slice by slice from the source instances its frames reference.

The label is random per voxel, so any transposition, flip or slice shift of the geometry changes it."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import write_dicom_series
from monai.transforms import LoadImage

from custom.data.datalist import DatalistError
from custom.data.dicom_seg import (
    SaveDicomSegd,
    bundle_check_dicom_seg_inputs,
    bundle_write_dicom_seg,
    write_dicom_seg,
)

CLASSES = ["organ", "lesion", "vessel"]  # "vessel" never occurs: it is described but has no frames
SLOPE, INTERCEPT = 1.0, -1024.0
ROWS, COLUMNS, SLICES = 40, 56, 7
PIXEL_SPACING = (0.8, 0.7)  # row spacing (between rows), column spacing (between columns), mm
STEP = 5.0
#: (direction along a row, direction down a column), LPS: plain axial, and an oblique coronal plane
ORIENTATIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "oblique": ((np.cos(np.pi / 6), np.sin(np.pi / 6), 0.0), (0.0, 0.0, -1.0)),
}


def write_series(folder: Path, stored: np.ndarray, orientation: str = "oblique", thickness: bool = True) -> list[str]:
    """``stored`` (slices, rows, columns) as this module's CT series; SOP instance UIDs by position."""
    return write_dicom_series(
        folder, stored, pixel_spacing=PIXEL_SPACING, step=STEP, origin=(-12.5, 30.0, 40.0),
        orientation=ORIENTATIONS[orientation], rescale=(SLOPE, INTERCEPT), thickness=thickness, name="IM{:04d}",
    )  # fmt: skip


def make_case(tmp_path: Path, orientation: str = "oblique", slices: int = SLICES, **series_options):
    """A series and the label map the bundle would write for it: ``(folder, uids, truth, nifti path)``
    with ``truth`` in the series' own (slice, row, column) order."""
    rng = np.random.default_rng(7)
    stored = rng.integers(0, 2000, (slices, ROWS, COLUMNS))
    folder = tmp_path / f"ct_{orientation}"
    uids = write_series(folder, stored, orientation, **series_options)
    truth = rng.integers(0, 3, (slices, ROWS, COLUMNS)).astype(np.uint8)  # organ and lesion, no vessel
    if slices > 1:
        truth[1] = 0  # an empty slice: no frame of it is written
    image = LoadImage(image_only=True, reader="ITKReader")(str(folder))
    # pins MONAI/ITK's order, so that the NIfTI below is what inference writes for this series:
    # x = columns, y = rows, z = slices by position
    assert image.shape == (COLUMNS, ROWS, slices)
    assert np.allclose(np.asarray(image), SLOPE * stored.transpose(2, 1, 0) + INTERCEPT)
    nifti = tmp_path / f"ct_{orientation}_seg.nii.gz"
    nib.save(nib.Nifti1Image(truth.transpose(2, 1, 0).copy(), np.asarray(image.affine)), nifti)
    return folder, uids, truth, nifti


def rebuild(seg_file: Path, uids: list[str]) -> np.ndarray:
    """The label volume (slice, row, column) from the Segmentation's frames alone: each frame goes to the
    source slice it references, as the value of its segment."""
    seg = hd.seg.segread(seg_file)
    source = {uid: k for k, uid in enumerate(uids)}
    volume = np.zeros((len(uids), int(seg.Rows), int(seg.Columns)), dtype=np.uint8)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        assert not (volume[source[uid]][frame > 0]).any(), "segments overlap"
        volume[source[uid]][frame > 0] = number
    return volume


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_dicom_seg_matches_the_nifti_voxel_for_voxel(tmp_path, orientation):
    folder, uids, truth, nifti = make_case(tmp_path, orientation)
    assert not np.array_equal(truth, truth[:, ::-1]) and not np.array_equal(truth, truth[::-1])
    out = write_dicom_seg(folder, nifti, tmp_path / "out" / "ct_seg.dcm", CLASSES, model_version="9.9.9")

    np.testing.assert_array_equal(rebuild(out, uids), truth)
    seg = hd.seg.segread(out)
    by_uid = {h.SOPInstanceUID: h for h in map(pydicom.dcmread, folder.iterdir())}
    for item in seg.PerFrameFunctionalGroupsSequence:  # each frame lies on the slice it references
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose(position, by_uid[uid].ImagePositionPatient, atol=1e-4)
    assert seg.NumberOfFrames == 2 * (SLICES - 1)  # organ and lesion on the non-empty slices
    source = by_uid[uids[0]]
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID == "phantom"
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(uids)
    assert np.allclose(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing, PIXEL_SPACING)
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG" and seg.SeriesNumber == 1003
    assert [s.SegmentLabel for s in seg.SegmentSequence] == CLASSES
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("UnCoL-MONAI", "9.9.9")
    # highdicom's own reading of the frames agrees
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    np.testing.assert_array_equal(pixels, truth)


def test_label_map_in_another_axis_order_or_as_array_maps_by_position(tmp_path):
    folder, uids, truth, nifti = make_case(tmp_path, "oblique")
    canonical = nib.as_closest_canonical(nib.load(nifti))  # axes permuted and flipped to RAS
    assert canonical.shape != (COLUMNS, ROWS, SLICES) or not np.allclose(canonical.affine, nib.load(nifti).affine)
    nib.save(canonical, tmp_path / "canonical.nii.gz")
    out = write_dicom_seg(folder, tmp_path / "canonical.nii.gz", tmp_path / "a.dcm", CLASSES)
    np.testing.assert_array_equal(rebuild(out, uids), truth)

    image = LoadImage(image_only=True, reader="ITKReader")(str(folder))  # MetaTensor: affine as a tensor
    out = write_dicom_seg(folder, truth.transpose(2, 1, 0), tmp_path / "b.dcm", CLASSES, affine=image.affine)
    np.testing.assert_array_equal(rebuild(out, uids), truth)
    version = hd.seg.segread(out).SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion
    from custom.data.dicom_seg import bundle_version

    assert version == bundle_version() != "unknown"


def test_single_slice_series(tmp_path):
    folder, uids, truth, nifti = make_case(tmp_path, "axial", slices=1)
    out = write_dicom_seg(folder, nifti, tmp_path / "one.dcm", CLASSES)
    np.testing.assert_array_equal(rebuild(out, uids), truth)
    affine = nib.load(nifti).affine  # a 2D array (columns, rows) with the slice's affine works as well
    out = write_dicom_seg(folder, truth[0].T, tmp_path / "two.dcm", CLASSES, affine=affine)
    np.testing.assert_array_equal(rebuild(out, uids), truth)
    _strip(folder, ("SliceThickness",))  # one slice: no spacing to stand in for it
    with pytest.raises(DatalistError, match=f"{folder}: DICOM series lacks SliceThickness needed for a Segmentation"):
        write_dicom_seg(folder, nifti, tmp_path / "x.dcm", CLASSES)


def test_transform_writes_dicom_inputs_and_skips_others(tmp_path):
    folder, uids, truth, nifti = make_case(tmp_path, "oblique", thickness=False)
    pred = LoadImage(image_only=True, reader="ITKReader", ensure_channel_first=True)(str(folder))
    pred.set_array(truth.transpose(2, 1, 0)[None])  # the label in the image's place, channel first
    save = SaveDicomSegd(keys="pred", output_dir=tmp_path / "out", class_names=CLASSES)
    save({"pred": pred})
    written = tmp_path / "out" / "ct_oblique_seg.dcm"
    np.testing.assert_array_equal(rebuild(written, uids), truth)
    measures = pydicom.dcmread(written).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(STEP)  # the series had none: its slice spacing
    other = LoadImage(image_only=True, ensure_channel_first=True)(str(nifti))
    save({"pred": other})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct_oblique_seg.dcm"]


def _strip(folder: Path, tags: tuple[str, ...], files: int | None = None) -> None:
    for path in sorted(folder.iterdir())[:files]:
        ds = pydicom.dcmread(path)
        for tag in tags:
            delattr(ds, tag)
        ds.save_as(path)


def test_series_without_the_tags_a_segmentation_needs_is_named(tmp_path):
    folder, _, _, nifti = make_case(tmp_path, "axial")
    _strip(folder, ("StudyInstanceUID", "FrameOfReferenceUID"))
    expected = f"error: {folder}: DICOM series lacks FrameOfReferenceUID, StudyInstanceUID needed for a Segmentation"
    with pytest.raises(SystemExit) as stop:
        bundle_write_dicom_seg(folder, nifti, tmp_path / "x.dcm", CLASSES)
    assert str(stop.value) == expected
    with pytest.raises(SystemExit) as stop:  # checked up front for every DICOM input of a run
        bundle_check_dicom_seg_inputs([{"image": str(nifti)}, {"image": str(folder)}])
    assert str(stop.value) == expected + " (--dicom_seg False segments it to NIfTI only)"
    assert not (tmp_path / "x.dcm").exists()


def test_a_slice_without_its_position_is_named(tmp_path):
    folder, _, _, nifti = make_case(tmp_path, "oblique")
    _strip(folder, ("ImagePositionPatient",), files=1)
    with pytest.raises(ValueError, match=r"lacks ImagePositionPatient needed for a Segmentation \(in 1 of 7 files"):
        write_dicom_seg(folder, nifti, tmp_path / "x.dcm", CLASSES)


def test_label_map_off_the_series_is_named(tmp_path):
    folder, _, truth, nifti = make_case(tmp_path, "oblique")
    affine = nib.load(nifti).affine
    label = truth.transpose(2, 1, 0)
    short = tmp_path / "short.nii.gz"
    nib.save(nib.Nifti1Image(label[..., :6], affine), short)
    with pytest.raises(
        DatalistError, match=rf"{short}: label map has shape \(56, 40, 6\), but DICOM series {folder} has 7"
    ):
        write_dicom_seg(folder, short, tmp_path / "x.dcm", CLASSES)
    with pytest.raises(DatalistError, match=r"shape \(40, 56, 7\), but the DICOM series .* \(shape \(56, 40, 7\) in"):
        write_dicom_seg(folder, truth.transpose(1, 2, 0), tmp_path / "x.dcm", CLASSES, affine=affine)
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0] * 0.5  # half a voxel along x
    with pytest.raises(
        DatalistError, match=f"{folder}: label map is not on the grid of the DICOM series: .* by up to 0.50 voxels"
    ):
        write_dicom_seg(folder, label, tmp_path / "x.dcm", CLASSES, affine=shifted)
    moved = affine.copy()
    moved[:3, 3] += affine[:3, 2] * 2  # two slices along z: the first two slices fall outside the label map
    with pytest.raises(DatalistError, match="not on the grid .*: the pixels of slice 1 lie outside it"):
        write_dicom_seg(folder, label, tmp_path / "x.dcm", CLASSES, affine=moved)
    with pytest.raises(DatalistError, match=r"label values \[2\] are outside the classes 0..1 \(organ\)"):
        write_dicom_seg(folder, nifti, tmp_path / "x.dcm", CLASSES[:1])
    with pytest.raises(DatalistError, match="cannot read label map"):
        write_dicom_seg(folder, tmp_path / "missing.nii.gz", tmp_path / "x.dcm", CLASSES)
    assert not (tmp_path / "x.dcm").exists()


def test_the_bundles_own_output_for_an_oblique_series(tmp_path):
    """End to end: the bundle's 3D inference segments the series (a tiny untrained student: geometry, not
    accuracy) and writes beside its NIfTI a DICOM-SEG that holds it voxel for voxel on the source slices,
    its segments named after the checkpoint's classes."""
    import torch
    from conftest import CONFIGS, TINY_NET, save_student
    from monai.bundle import run

    from custom.networks.student import UnCoLStudent

    folder, uids, _, _ = make_case(tmp_path / "in", "oblique")
    torch.manual_seed(0)
    ckpt = save_student(
        UnCoLStudent(spatial_dims=3, **{k.split("#")[1]: v for k, v in TINY_NET.items()}), tmp_path / "m.pt"
    )
    configs = [str(CONFIGS / "inference.json"), str(CONFIGS / "inference_3d.json")]
    run("inference", config_file=configs, ckpt_path=str(ckpt), input_dir=str(folder), output_dir=str(tmp_path / "out"),
        roi_size=[32, 32, 16], **TINY_NET)  # fmt: skip
    nifti = tmp_path / "out" / f"{folder.name}_seg.nii.gz"
    predicted = np.asanyarray(nib.load(nifti).dataobj)
    assert predicted.shape == (COLUMNS, ROWS, SLICES)
    assert len(np.unique(predicted)) > 1 and not np.array_equal(predicted, predicted[::-1])  # a check that can fail
    source = LoadImage(image_only=True, reader="ITKReader")(str(folder))
    assert np.allclose(nib.load(nifti).affine, source.affine.numpy(), atol=1e-4)  # the series' own geometry
    out = tmp_path / "out" / f"{folder.name}_seg.dcm"  # written by the inference run itself (dicom_seg: true)
    np.testing.assert_array_equal(rebuild(out, uids), predicted.transpose(2, 1, 0))
    assert [s.SegmentLabel for s in pydicom.dcmread(out).SegmentSequence] == ["organ", "lesion"]
