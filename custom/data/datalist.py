"""Datalist loading with up-front validation, so a bad input stops a run before training starts.

Every problem is reported as one :class:`DatalistError` whose message names the file and what is
wrong with it. Configs call :data:`bundle_datalist` and :data:`bundle_images`, which turn that error
into a clean exit with the message alone instead of a traceback through MONAI's config machinery.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

T = TypeVar("T")
logger = logging.getLogger(__name__)


class DatalistError(ValueError):
    """A datalist, or a file it names, that cannot be used; the message names the file and the problem."""


#: image files inference picks up in a folder (NIfTI by nibabel; NRRD and MetaImage by ITK)
IMAGE_PATTERNS = ("*.nii.gz", "*.nii", "*.nrrd", "*.nhdr", "*.mha", "*.mhd")


def _read_array(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read an image fully (a truncated file fails here, not later in a data loader worker); returns
    the voxels and the voxel-to-world (RAS) affine."""
    if path.endswith((".nii", ".nii.gz")):
        img = nib.load(path)
        return np.asanyarray(img.dataobj), img.affine
    from monai.transforms import LoadImage

    if Path(path).is_dir():
        check_dicom_series(path)
        data = LoadImage(image_only=True, reader="ITKReader")(path)
    else:
        data = LoadImage(image_only=True)(path)
    return np.asarray(data), np.asarray(data.affine)


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files directly inside ``folder`` (by ``.dcm`` suffix or the ``DICM`` preamble)."""
    folder = Path(folder)
    return sorted(f for f in folder.iterdir() if f.is_file() and _is_dicom_file(f)) if folder.is_dir() else []


def dicom_headers(folder: str | Path) -> tuple[list[Path], list]:
    """The DICOM files directly inside ``folder`` and their headers (pixel data not read); a folder
    without DICOM files or a file that cannot be read raises :class:`DatalistError` naming it."""
    import pydicom

    folder = Path(folder)
    files = dicom_files(folder)
    if not files:
        raise DatalistError(f"{folder}: folder has no DICOM files")
    headers = []
    for f in files:
        try:
            headers.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception as err:
            raise DatalistError(f"{f}: cannot read DICOM header ({type(err).__name__}: {err})") from err
    return files, headers


def check_dicom_series(folder: str | Path, rel_tol: float = 0.01, headers: list | None = None) -> None:
    """One series per folder, slices on a regular grid: raise :class:`DatalistError` for mixed series,
    differing orientation or pixel spacing, duplicated positions, a missing slice or uneven spacing.
    (ITK's series reader would otherwise stack such a folder silently into a wrong volume.) ``headers``:
    the folder's, when the caller has read them already."""
    folder = Path(folder)
    if headers is None:
        headers = dicom_headers(folder)[1]
    series = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise DatalistError(f"{folder}: folder mixes {len(series)} DICOM series; put each series in its own folder")
    if len(headers) == 1:
        return
    for name in ("ImageOrientationPatient", "PixelSpacing"):
        values = {tuple(round(float(v), 4) for v in h.get(name, [])) for h in headers}
        if len(values) > 1:
            raise DatalistError(f"{folder}: slices differ in {name} ({sorted(values)[:3]})")
    orientation = np.array([float(v) for v in headers[0].get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
    normal = np.cross(orientation[:3], orientation[3:])
    try:
        positions = sorted(float(np.dot(normal, [float(v) for v in h.ImagePositionPatient])) for h in headers)
    except AttributeError as err:
        raise DatalistError(f"{folder}: a slice has no ImagePositionPatient") from err
    gaps = np.diff(positions)
    if (gaps < 1e-6).any():
        raise DatalistError(f"{folder}: two slices share a position (duplicated slice)")
    step = float(np.median(gaps))
    if (gaps > 1.5 * step).any():
        missing = int(np.argmax(gaps > 1.5 * step))
        raise DatalistError(
            f"{folder}: a slice is missing after position {positions[missing]:.2f} mm "
            f"(gap {gaps[missing]:.2f} mm, spacing {step:.2f} mm)"
        )
    if (np.abs(gaps - step) > rel_tol * step).any():
        raise DatalistError(
            f"{folder}: inconsistent slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm along the slice normal)"
        )


def _read_checked(path: str, role: str, spatial_dims: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    try:
        data, affine = _read_array(path)
    except Exception as err:  # any reader failure means the file is unusable
        raise DatalistError(f"{path}: cannot read {role} ({type(err).__name__}: {err})") from err
    if data.size == 0:
        raise DatalistError(f"{path}: {role} is empty (shape {data.shape})")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise DatalistError(f"{path}: {role} contains NaN or Inf values")
    if spatial_dims == 2 and Path(path).is_dir():
        # a series is a volume to MONAI's readers, even of one slice: the 2D transforms cannot orient it
        raise DatalistError(
            f"{path}: {role} is a DICOM series ({data.shape[-1] if data.ndim == 3 else 1} slice(s)); the 2D configs "
            "take 2D image files: segment a series with the 3D configs (inference_3d.json)"
        )
    if spatial_dims is not None:
        data = _single_channel(data, spatial_dims, path, role)
    return data, affine


def _single_channel(data: np.ndarray, spatial_dims: int, path: str, role: str) -> np.ndarray:
    """``data`` as ``spatial_dims`` axes: trailing length-1 axes are dropped; anything else (a time
    series, several channels or modalities, a volume given to a 2D bundle) is refused."""
    shape = data.shape
    while data.ndim > spatial_dims and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != spatial_dims or min(data.shape) < 2:
        raise DatalistError(
            f"{path}: {role} has shape {shape}, but this bundle takes single-channel {spatial_dims}D images "
            f"(4D, multi-channel or {'3D' if spatial_dims == 2 else '2D'} input)"
        )
    return data


def check_pair(
    image: str,
    label: str | None,
    num_classes: int | None,
    spatial_dims: int | None = None,
    affine_tolerance: float = 1e-3,
) -> None:
    """Check that an image (and its label) can be read, are single-channel ``spatial_dims``-D when that
    is given, lie on the same grid (shape, and affine to ``affine_tolerance`` mm) and have valid label values."""
    img, img_affine = _read_checked(image, "image", spatial_dims)
    if label is None:
        return
    lbl, lbl_affine = _read_checked(label, "label", spatial_dims)
    if lbl.shape != img.shape[: lbl.ndim]:
        raise DatalistError(f"{label}: label shape {lbl.shape} does not match image {image} shape {img.shape}")
    if img_affine.shape == lbl_affine.shape:
        difference = float(np.abs(img_affine - lbl_affine).max())
        if difference > affine_tolerance:
            raise DatalistError(
                f"{label}: label affine differs from image {image} affine by up to {difference:.3g} mm "
                f"(tolerance {affine_tolerance:g}); they are not on the same grid"
            )
    if num_classes is not None:
        values = np.unique(lbl)
        bad = [v for v in values.tolist() if v != int(v) or not 0 <= v < num_classes]
        if bad:
            raise DatalistError(
                f"{label}: label values {bad[:5]} are outside the declared classes 0..{num_classes - 1}"
            )


def datalist_entry(path: Path, key: str, index: int, entry: object, require_label: bool) -> dict:
    """Entry ``index`` of the datalist's ``key`` list as a dict with an ``image`` path (a bare string is
    one), and a ``label`` path when ``require_label``; else :class:`DatalistError` naming the entry."""
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise DatalistError(f"{path}: entry {index} of '{key}' has no 'image' path: {entry!r}")
    if require_label and not isinstance(entry.get("label"), str):
        raise DatalistError(f"{path}: entry {index} of '{key}' ({entry['image']}) has no 'label' path")
    return entry


def read_datalist_json(path: str | Path, key: str = "training") -> dict:
    """The datalist file's JSON object; a missing file, invalid JSON or another JSON value raises
    :class:`DatalistError` naming the file (``key``: the list the caller expects, for the message)."""
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"{path}: datalist file does not exist")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatalistError(f"{path}: datalist is not valid JSON ({err})") from err
    if not isinstance(content, dict):
        raise DatalistError(f"{path}: datalist must be a JSON object with a '{key}' list")
    return content


def load_datalist(
    datalist: str | Path,
    key: str,
    base_dir: str | Path | None = None,
    num_classes: int | None = None,
    require_label: bool = True,
    check_files: bool = True,
    spatial_dims: int | None = None,
) -> list[dict]:
    """Load the ``key`` section of a Decathlon-style datalist, validated.

    Args:
        datalist: path of the JSON datalist.
        key: section to load (``training``, ``unlabeled``, ``validation``, ``test``).
        base_dir: folder that relative paths are resolved against; defaults to the datalist's folder.
        num_classes: classes including background; label values must lie in ``0..num_classes-1``.
        require_label: every entry must have a ``label``.
        check_files: read every named file to check it (set False only for trusted, huge datasets).
        spatial_dims: 2 or 3: images (and labels) must be single-channel images of that many axes.

    Returns:
        entries with absolute ``image`` (and ``label``) paths.
    """
    path = Path(datalist)
    content = read_datalist_json(path, key)
    entries = content.get(key)
    if entries is None:
        raise DatalistError(f"{path}: datalist has no '{key}' key (keys: {sorted(content)})")
    if not isinstance(entries, list) or not entries:
        raise DatalistError(f"{path}: '{key}' must be a non-empty list")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        entry = datalist_entry(path, key, i, entry, require_label)
        if entry["image"] in seen:
            raise DatalistError(f"{path}: '{key}' lists {entry['image']} more than once")
        seen.add(entry["image"])

    base = Path(base_dir) if base_dir is not None else path.parent
    items = load_decathlon_datalist(str(path), is_segmentation=require_label, data_list_key=key, base_dir=str(base))
    for item in items:
        for role in ("image", "label"):
            if role in item and not Path(item[role]).is_file():
                raise DatalistError(f"{path}: '{key}' names {role} {item[role]}, which does not exist")
    if check_files:
        for item in items:
            check_pair(item["image"], item.get("label") if require_label else None, num_classes, spatial_dims)
    return items


def load_unlabelled(
    datalist: str | Path | None,
    key: str,
    labelled: list[dict],
    fallback_datalist: str | Path | None = None,
    spatial_dims: int | None = None,
) -> list[dict]:
    """The unlabelled stream of stage 2. ``datalist``, when given, must hold a valid ``key`` list. With
    none given, ``fallback_datalist``'s ``key`` list is used when the labelled images are that datalist's
    own ``training`` cases; labelled pairs from elsewhere (MONAI Label hands over its datastore's pairs
    this way) get their own images, without labels, as the unlabelled stream: never images the user did
    not give this run."""
    if datalist:
        return load_datalist(datalist, key, require_label=False, spatial_dims=spatial_dims)
    if fallback_datalist and lists_as_training(fallback_datalist, labelled):
        return load_datalist(fallback_datalist, key, require_label=False, spatial_dims=spatial_dims)
    if not labelled:
        raise DatalistError(f"no unlabelled datalist and no labelled images to stand in for '{key}'")
    logger.warning(
        f"the {len(labelled)} labelled images stand in as unlabelled: they do not come from {fallback_datalist}; "
        f"set unlabelled_datalist to a datalist with a '{key}' list to add unlabelled images"
    )
    return [{"image": item["image"]} for item in labelled]


def lists_as_training(datalist: str | Path, labelled: list[dict]) -> bool:
    """Whether every labelled image is a ``training`` entry of ``datalist`` (which then has other keys)."""
    path = Path(datalist)
    try:
        entries = json.loads(path.read_text()).get("training", [])
        listed = {str((path.parent / e["image"]).resolve()) for e in entries}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return False
    return bool(labelled) and all(str(Path(item["image"]).resolve()) in listed for item in labelled)


def write_datalist(folder: str | Path, content: dict, name: str = "datalist.json") -> Path:
    """Write a datalist atomically into ``folder`` (a temporary file renamed over it), so it appears only
    once every file it names is written; returns its path."""
    path = Path(folder) / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, indent=2))
    tmp.replace(path)
    return path


def load_classes(datalist: str | Path, required: bool = True, default: Sequence[str] | None = None) -> list[str] | None:
    """Class names by label value, background first, from a datalist's ``labels`` (the Decathlon
    convention: ``{"0": "background", "1": "liver", ...}``), which must name every value ``0..N-1``.
    While the datalist file does not exist, ``default`` when given (the classes of a dataset the run
    generates first, e.g. :func:`custom.data.phantoms.embedded_classes`). A missing datalist or one
    without ``labels`` is an error when ``required``, else gives ``None``."""
    path = Path(datalist)
    try:
        if default is not None and not path.is_file():
            return list(default)
        if not path.is_file():
            if not required:
                return None
            raise DatalistError(f"{path}: datalist file does not exist")
        labels = json.loads(path.read_text()).get("labels")
    except DatalistError:
        raise
    except (OSError, ValueError, AttributeError) as err:
        raise DatalistError(f"{path}: cannot read the datalist's 'labels' ({type(err).__name__}: {err})") from err
    if labels is None:
        if not required:
            return None
        raise DatalistError(f"{path}: datalist has no 'labels'; add them or give --num_classes and --class_names")
    if isinstance(labels, list):
        labels = dict(enumerate(labels))
    try:
        by_value = {int(k): str(v) for k, v in labels.items()}
    except (AttributeError, TypeError, ValueError) as err:
        raise DatalistError(f"{path}: 'labels' must map label values to names, got {labels!r}") from err
    if sorted(by_value) != list(range(len(by_value))) or len(by_value) < 2:
        raise DatalistError(f"{path}: 'labels' must name the values 0..N-1 (N >= 2), got {sorted(by_value)}")
    return [by_value[v] for v in range(len(by_value))]


def check_classes(datalist: str | Path, num_classes: int, class_names: list[str]) -> int:
    """Stop when the classes of a run disagree: ``class_names`` must name ``num_classes - 1`` foreground
    classes, and a datalist with ``labels`` must declare ``num_classes`` of them. Returns ``num_classes``."""
    if len(class_names) != num_classes - 1:
        raise DatalistError(
            f"class_names {list(class_names)} names {len(class_names)} classes, but num_classes {num_classes} "
            f"has {num_classes - 1} foreground classes"
        )
    declared = load_classes(datalist, required=False)
    if declared is not None and len(declared) != num_classes:
        raise DatalistError(
            f"{datalist}: its 'labels' declare {len(declared)} classes ({', '.join(declared)}), "
            f"but num_classes is {num_classes}"
        )
    return num_classes


def find_images(
    path: str | Path, patterns: tuple[str, ...] = IMAGE_PATTERNS, spatial_dims: int | None = None
) -> list[dict]:
    """Images to segment: a single file, a DICOM series folder, or a folder of files matching
    ``patterns`` and of DICOM series subfolders (sorted). Each is read once to check it, so a broken
    file stops the run before any inference."""
    path = Path(path)
    if path.is_file() or dicom_files(path):
        files = [path]
    elif path.is_dir():
        found = {f for pattern in patterns for f in path.glob(pattern)}
        found |= {d for d in path.iterdir() if d.is_dir() and dicom_files(d)}
        files = sorted(found)
        if not files:
            raise DatalistError(f"{path}: folder has no images matching {list(patterns)} and no DICOM series folders")
    else:
        raise DatalistError(f"{path}: input does not exist")
    for f in files:
        _read_checked(str(f), "image", spatial_dims)
    return [{"image": str(f)} for f in files]


def exit_on_error(loader: Callable[..., T]) -> Callable[..., T]:
    """Wrap a loader for bundle configs: a :class:`DatalistError` ends the run with its one-line
    message (``SystemExit``) before any compute is spent, instead of a traceback through the config parser."""

    @functools.wraps(loader)
    def wrapper(*args, **kwargs) -> T:
        try:
            return loader(*args, **kwargs)
        except DatalistError as err:
            raise SystemExit(f"error: {err}") from None

    return wrapper


#: what configs call (``"_target_": "custom.data.datalist.bundle_datalist"``)
bundle_datalist = exit_on_error(load_datalist)
bundle_images = exit_on_error(find_images)
bundle_unlabelled = exit_on_error(load_unlabelled)
bundle_classes = exit_on_error(load_classes)
bundle_check_classes = exit_on_error(check_classes)
