"""DICOM Segmentation (DICOM-SEG) output for scans that came in as a DICOM series.

Why: inference writes NIfTI in the input's own geometry, which a PACS viewer cannot show. For a
DICOM series input, :func:`write_dicom_seg` also writes the label map as one DICOM Segmentation
instance (highdicom, ``BINARY``) in the source's study and frame of reference, whose frames point to
the source slices they lie on, so the viewer overlays it on the series the user sent.

What:

- **Segments**: one per class in ``class_names`` (the foreground classes, background excluded),
  whether or not the class was found: segment number = label value, so segment 2 is always the same
  class across cases, and a class the model looked for and did not find is listed with no frames
  (all-empty frames are omitted). Segment labels are the class names; the property category and type
  are the generic SNOMED "Tissue", since the bundle only knows the names. Each segment names the
  algorithm: ``UnCoL-MONAI``, family "Artificial Intelligence", version from ``configs/metadata.json``.
- **Geometry**: the label map is mapped back to each source slice by position, not by array order:
  every pixel centre of every slice (from ImagePositionPatient, ImageOrientationPatient and
  PixelSpacing, in LPS) is taken through the label map's affine (RAS, as MONAI/ITK and nibabel write
  it) to a voxel index. The label map may so be in any axis order or orientation (ITK's x, y, z order
  of the bundle's output, or reoriented); it must lie on the series' grid (same voxel centres to 0.1
  voxel) and have its shape, else the call stops.
- **Bad input** raises :class:`~custom.data.datalist.DatalistError` (a ``ValueError``) with one line
  naming the folder or file and the problem, e.g. ``/in/ct: DICOM series lacks FrameOfReferenceUID,
  StudyInstanceUID needed for a Segmentation``; :data:`bundle_write_dicom_seg` turns it into a clean
  exit ``error: ...`` for configs, as the datalist loaders do. Empty type 2 patient and study
  attributes (PatientName, StudyDate, ...) are allowed and written empty; a missing SliceThickness
  is taken as the spacing of the slices (a one-slice series must have it).

Use, after inference wrote ``out/ct_series_seg.nii.gz`` for the series folder ``in/ct_series``::

    from custom.data.dicom_seg import write_dicom_seg

    write_dicom_seg("in/ct_series", "out/ct_series_seg.nii.gz", "out/ct_series_seg.dcm", ["organ", "lesion"])
    # or with the label array (spatial axes only) and its affine, e.g. a MONAI MetaTensor's
    write_dicom_seg("in/ct_series", pred[0], "out/ct_series_seg.dcm", ["organ", "lesion"], affine=pred.affine)

In an inference config, :data:`bundle_check_dicom_seg_inputs` checks every DICOM input folder in
``initialize`` (a series lacking tags stops the run before any compute), and :class:`SaveDicomSegd`
writes ``<output_dir>/<folder>_<postfix>.dcm`` for each case after ``SaveImaged`` (inputs that are not
DICOM folders are skipped). Only series of single-frame images (CT, MR, PET
slices) are supported: a one-slice series gives a one-slice segmentation, multi-frame (enhanced)
images are refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from custom.data.datalist import DatalistError, check_dicom_series, dicom_files, dicom_headers, exit_on_error
from custom.data.outputs import output_path

logger = logging.getLogger(__name__)

#: source attributes a Segmentation cannot be made without (type 1 for referencing and geometry)
REQUIRED_TAGS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
)
#: type 2 attributes highdicom copies from the source; written empty when the source lacks them
EMPTY_ALLOWED_TAGS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
#: how far (in voxels) a slice pixel centre may lie from the nearest label voxel centre
GRID_TOLERANCE = 0.1
#: display colours of segments 1, 2, ... (RGB, cycled)
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180))
ALGORITHM_NAME = "UnCoL-MONAI"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def bundle_version(metadata_file: str | Path | None = None) -> str | None:
    """The bundle's version from ``configs/metadata.json`` (``metadata_file``, or the one beside this
    package in the repository or in an exported bundle); ``None`` when there is none to read."""
    root = Path(__file__).resolve().parents[2]
    candidates = (
        [Path(metadata_file)]
        if metadata_file
        else [root / "bundle/configs/metadata.json", root / "configs/metadata.json"]
    )
    for path in candidates:
        try:
            version = json.loads(path.read_text()).get("version")
        except (OSError, ValueError, AttributeError):
            continue
        if version:
            return str(version)
    return None


def read_series(folder: str | Path) -> list[Any]:
    """The headers of the DICOM series in ``folder``, sorted by position along the slice normal (as
    ITK stacks them), after checking that a Segmentation can reference and place them."""
    folder = Path(folder)
    files, headers = dicom_headers(folder)
    # a single slice has no spacing to stand in for a missing slice thickness
    required = REQUIRED_TAGS + (("SliceThickness",) if len(headers) == 1 else ())
    lacking = {f: [t for t in required if h.get(t) in (None, "", [])] for f, h in zip(files, headers, strict=True)}
    missing = sorted({t for tags in lacking.values() for t in tags})
    if missing:
        where = [f.name for f, tags in lacking.items() if tags]
        some = f" (in {len(where)} of {len(files)} files, e.g. {where[0]})" if len(where) < len(files) else ""
        raise DatalistError(f"{folder}: DICOM series lacks {', '.join(missing)} needed for a Segmentation{some}")
    if any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers):
        raise DatalistError(f"{folder}: multi-frame DICOM images are not supported for DICOM-SEG output")
    check_dicom_series(
        folder, headers=headers
    )  # one series, one orientation and pixel spacing, slices on a regular grid
    normal = _directions(headers[0])[2]
    headers.sort(key=lambda h: float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float))))
    if any((h.Rows, h.Columns) != (headers[0].Rows, headers[0].Columns) for h in headers):
        raise DatalistError(f"{folder}: slices differ in Rows and Columns")
    return headers


def _directions(header: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors (LPS) along a slice's columns index, rows index, and the slice normal."""
    orientation = np.asarray(header.ImageOrientationPatient, dtype=float)
    along_row, along_column = orientation[:3], orientation[3:]
    return along_row, along_column, np.cross(along_row, along_column)


def _read_label(label: str | Path | Any, affine: Any, folder: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """The label map as a 3D array, its 4x4 voxel-to-RAS affine, and a name for messages."""
    if isinstance(label, str | Path):
        import nibabel as nib

        name = str(label)
        try:
            image = nib.load(name)
            array, affine = np.asanyarray(image.dataobj), image.affine
        except Exception as err:
            raise DatalistError(f"{name}: cannot read label map ({type(err).__name__}: {err})") from err
    else:
        name = str(folder)  # messages name the series the array belongs to
        if affine is None:
            affine = getattr(label, "affine", None)
        if affine is None:
            raise DatalistError(f"{name}: an array label map needs its affine")
        array = np.asarray(label.detach().cpu() if hasattr(label, "detach") else label)
    affine = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, dtype=float)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or affine.shape != (4, 4):
        raise DatalistError(
            f"{name}: label map has shape {array.shape} and a {affine.shape} affine; "
            "a DICOM-SEG needs a 2D or 3D label map with a 4x4 affine"
        )
    return array, affine, name


def label_frames(
    headers: Sequence[Any], label: np.ndarray, affine: np.ndarray, name: str = "", folder: str | Path = ""
) -> np.ndarray:
    """The label map resampled (nearest, exact on a matching grid) onto the source slices: an array
    ``(slices, rows, columns)`` whose plane ``k`` lies on ``headers[k]``, which must be sorted by
    position. ``affine`` maps ``label``'s voxel indices to RAS millimetres."""
    along_row, along_column, normal = _directions(headers[0])
    row_spacing, column_spacing = (float(s) for s in headers[0].PixelSpacing)
    rows, columns = int(headers[0].Rows), int(headers[0].Columns)
    to_index = np.linalg.inv(affine)
    linear = to_index[:3, :3] @ _LPS_TO_RAS
    step_column = linear @ (along_row * column_spacing)  # label index step per column to the right
    step_row = linear @ (along_column * row_spacing)  # ... per row down
    step_slice = linear @ normal  # direction only: the shape check needs the axis
    axes = [int(np.argmax(np.abs(v))) for v in (step_column, step_row, step_slice)]
    series = f"DICOM series {folder}" if folder and str(folder) != name else "the DICOM series"
    if len(set(axes)) != 3:
        raise DatalistError(f"{name}: label map axes are oblique to the slices of {series}; it is not on its grid")
    expected = [0, 0, 0]
    for axis, size in zip(axes, (columns, rows, len(headers)), strict=True):
        expected[axis] = size
    if tuple(label.shape) != tuple(expected):
        raise DatalistError(
            f"{name}: label map has shape {tuple(label.shape)}, but {series} has {len(headers)} slices of "
            f"{rows} rows x {columns} columns (shape {tuple(expected)} in the label map's axis order)"
        )
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    frames = np.empty((len(headers), rows, columns), dtype=label.dtype)
    for k, header in enumerate(headers):
        origin = linear @ np.asarray(header.ImagePositionPatient, dtype=float) + to_index[:3, 3]
        index = origin[:, None, None] + step_column[:, None, None] * c + step_row[:, None, None] * r
        nearest = np.rint(index).astype(np.int64)
        off = float(np.abs(index - nearest).max())
        outside = (nearest < 0).any() or any((nearest[i] >= label.shape[i]).any() for i in range(3))
        if off > GRID_TOLERANCE or outside:
            problem = f"miss its voxel centres by up to {off:.2f} voxels" if off > GRID_TOLERANCE else "lie outside it"
            raise DatalistError(
                f"{name}: label map is not on the grid of {series}: the pixels of slice {k + 1} {problem}"
            )
        frames[k] = label[nearest[0], nearest[1], nearest[2]]
    return frames


def _segment_descriptions(class_names: Sequence[str], version: str) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=version
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(name)[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*PALETTE[(number - 1) % len(PALETTE)]),
        )
        for number, name in enumerate(class_names, start=1)
    ]


def _fill_empty_allowed(headers: Sequence[Any]) -> None:
    """Give the type 2 attributes highdicom copies an empty value where the source lacks them, and a
    missing slice thickness (which the Segmentation's pixel measures need) the spacing of the slices."""
    normal = _directions(headers[0])[2]
    positions = [float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float))) for h in headers]
    spacing = float(np.median(np.diff(positions))) if len(headers) > 1 else None
    for header in headers:
        for tag in EMPTY_ALLOWED_TAGS:
            if tag not in header:
                setattr(header, tag, None)
        if header.get("PatientSex") not in (None, "", "M", "F", "O"):
            header.PatientSex = None  # not a DICOM value: leave it empty rather than fail
        if header.get("SliceThickness") in (None, "") and spacing is not None:
            header.SliceThickness = round(spacing, 6)


def build_dicom_seg(
    series_dir: str | Path,
    label: str | Path | Any,
    class_names: Sequence[str],
    affine: Any = None,
    model_version: str | None = None,
    series_number: int | None = None,
    series_description: str = "UnCoL-MONAI segmentation",
) -> Any:
    """The DICOM Segmentation (``highdicom.seg.Segmentation``, BINARY) of ``label`` for the series in
    ``series_dir``; see the module docstring.

    Args:
        series_dir: folder of the source DICOM series (the bundle's input).
        label: path of the label map NIfTI the bundle wrote, or the label array (spatial axes only;
            a torch tensor or MONAI MetaTensor is fine).
        class_names: foreground class names by label value (value 1 first); one segment each.
        affine: the array's 4x4 voxel-to-RAS affine (a MetaTensor's own when not given); not with a path.
        model_version: algorithm version written in each segment; default the bundle's version.
        series_number: of the new series; default the source's plus 1000.
        series_description: of the new series.
    """
    import highdicom as hd

    folder = Path(series_dir)
    if not class_names:
        raise DatalistError(f"{folder}: no class names given for the DICOM-SEG segments")
    headers = read_series(folder)
    array, affine, name = _read_label(label, affine, folder)
    values = np.unique(array)
    bad = [v for v in values.tolist() if not (np.isfinite(v) and v == int(v) and 0 <= v <= len(class_names))]
    if bad:
        raise DatalistError(
            f"{name}: label values {bad[:5]} are outside the classes 0..{len(class_names)} ({', '.join(class_names)})"
        )
    frames = label_frames(headers, array, affine, name, folder).astype(np.uint8)
    _fill_empty_allowed(headers)
    version = model_version or bundle_version() or "unknown"
    if series_number is None:
        series_number = int(headers[0].get("SeriesNumber") or 0) + 1000
    try:
        return hd.seg.Segmentation(
            source_images=headers,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_segment_descriptions(class_names, version),
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="UnCoL-MONAI contributors",
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=version,
            device_serial_number="0",
            content_label="UNCOL_SEG",
            content_description=series_description[:64],
            series_description=series_description[:64],
            omit_empty_frames=True,
        )
    except ValueError as err:  # highdicom's own checks of the source (e.g. orientations differing by rounding)
        raise DatalistError(f"{folder}: cannot make a Segmentation of this DICOM series ({err})") from err


def write_dicom_seg(
    series_dir: str | Path,
    label: str | Path | Any,
    output_file: str | Path,
    class_names: Sequence[str],
    affine: Any = None,
    model_version: str | None = None,
    series_number: int | None = None,
    series_description: str = "UnCoL-MONAI segmentation",
) -> Path:
    """Write the DICOM Segmentation of ``label`` for the series in ``series_dir`` to ``output_file``
    (see :func:`build_dicom_seg` for the arguments); returns its path."""
    segmentation = build_dicom_seg(
        series_dir, label, class_names, affine, model_version, series_number, series_description
    )
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    segmentation.save_as(output_file)
    return output_file


def check_dicom_seg_inputs(items: list[dict]) -> list[dict]:
    """``items`` unchanged, after checking that every DICOM series folder among their ``image`` paths
    can be referenced by a Segmentation (for a run that writes DICOM-SEG, before any compute)."""
    for item in items:
        if Path(item["image"]).is_dir() and dicom_files(item["image"]):
            try:
                read_series(item["image"])
            except DatalistError as err:
                raise DatalistError(f"{err} (--dicom_seg False segments it to NIfTI only)") from None
    return items


class SaveDicomSegd:
    """Dictionary transform for inference postprocessing: for a case read from a DICOM series folder,
    write ``<output_dir>/<folder name>_<postfix>.dcm`` from ``data[key]``, the channel-first label map
    (MetaTensor) in the input's geometry (after ``Invertd`` and ``AsDiscreted``); other inputs pass
    unchanged. A bad series or label map ends the run with ``error: ...`` (``SystemExit``)."""

    def __init__(
        self,
        keys: str | Sequence[str],
        output_dir: str | Path,
        class_names: Sequence[str],
        output_postfix: str = "seg",
        model_version: str | None = None,
    ) -> None:
        self.key = keys if isinstance(keys, str) else keys[0]
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.output_postfix = output_postfix
        self.model_version = model_version

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        label = data[self.key]
        meta = getattr(label, "meta", None) or data.get(f"{self.key}_meta_dict", {})
        source = meta.get("filename_or_obj")
        if not source or not Path(str(source)).is_dir() or not dicom_files(str(source)):
            return data
        target = output_path(str(source), self.output_dir, self.output_postfix, ext=".dcm")
        array = label[0]  # drop the channel axis
        affine = getattr(label, "affine", None)
        bundle_write_dicom_seg(source, array, target, self.class_names, affine=affine, model_version=self.model_version)
        logger.info(f"wrote DICOM-SEG {target}")
        return data


#: what configs call: a bad series or label map ends the run with its one-line message
bundle_write_dicom_seg = exit_on_error(write_dicom_seg)
bundle_check_dicom_seg_inputs = exit_on_error(check_dicom_seg_inputs)
