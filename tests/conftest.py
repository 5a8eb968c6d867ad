"""Shared fixtures: a tiny embedded dataset and tiny-model overrides for bundle runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"

# `make test` runs two pytest-xdist workers on the 2 cores: one torch thread each (2 threads in each of
# two workers oversubscribes the cores and slows both several-fold); a plain `pytest` keeps 2
os.environ.setdefault("OMP_NUM_THREADS", "1" if "PYTEST_XDIST_WORKER" in os.environ else "2")

#: LiteMedSAM's encoder outputs for the tiny runs, shared by the session's tests and xdist workers: every
#: tiny run has the same images, and entries are keyed by their pixels and written atomically, so a
#: later run is served what the first one encoded (about 1.5 s a 32x32 image on one core). Tests that
#: count what a run encodes give it a cache of its own.
SHARED_CACHE_ENV = "UNCOL_TEST_TEACHER_CACHE"


def pytest_configure(config) -> None:
    if SHARED_CACHE_ENV not in os.environ:  # the controller (or a plain pytest): workers inherit its folder
        os.environ[SHARED_CACHE_ENV] = tempfile.mkdtemp(prefix="uncol-test-teacher-cache-")
        config._uncol_shared_cache = os.environ[SHARED_CACHE_ENV]


def pytest_unconfigure(config) -> None:
    folder = getattr(config, "_uncol_shared_cache", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        del os.environ[SHARED_CACHE_ENV]


#: generator parameters of the tiny 2D dataset (32x32, 4 train cases of which 2 labelled)
TINY_2D = {
    "spatial_dims": 2,
    "shape": (32, 32),
    "num_train": 4,
    "num_validation": 2,
    "num_test": 2,
    "labelled_fraction": 0.5,
    "seed": 1,
}

#: bundle overrides that shrink the student and the schedule to seconds
TINY_NET = {
    "network_def#hidden_size": 48,
    "network_def#mlp_dim": 96,
    "network_def#num_heads": 2,
    "network_def#feature_size": 8,
}


def tiny_train_overrides(bundle_root: Path, spatial_dims: int = 2) -> dict:
    size = [32] * spatial_dims
    return {
        "bundle_root": str(bundle_root),
        "config_dir": str(CONFIGS),
        "embedded_data#shape": size,
        "embedded_data#num_train": 4,
        "embedded_data#num_validation": 2,
        "embedded_data#num_test": 2,
        "embedded_data#labelled_fraction": 0.5,
        "roi_size": size,
        "batch_size": 2,
        "iterations_per_epoch": 2,
        "max_epochs": 2,
        "pretrain_epochs": 2,
        "val_interval": 1,
        "teacher_cache_dir": os.environ[SHARED_CACHE_ENV],
        **TINY_NET,
    }


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Datalist path of a tiny generated 2D dataset (shared, read-only)."""
    from custom.data.phantoms import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("phantom2d"), **TINY_2D)


@pytest.fixture(scope="session")
def lite_teacher():
    """The default generalized teacher (LiteMedSAM with its packaged weights), no cache."""
    from custom.teachers.generalized import GeneralizedTeacher

    return GeneralizedTeacher("litemedsam", num_classes=3)


def save_student(network, path: Path, class_names: tuple[str, ...] = ("organ", "lesion")) -> Path:
    """Save ``network`` as the bundle saves a student (weights under ``model`` and a training record
    with the default orientation and spacing of its dims, and the normalisation the plan gives MR-like
    data such as the phantoms), so inference configs accept it."""
    import torch

    from custom.handlers.checkpoints import TrainingRecord

    axcodes, pixdim = ("RA", [1.0, 1.0]) if network.spatial_dims == 2 else ("RAS", [1.25, 1.25, 2.0])
    record = TrainingRecord(
        network, axcodes=axcodes, pixdim=pixdim, class_names=class_names, normalisation="zscore_foreground"
    ).state_dict()
    torch.save({"model": network.state_dict(), "record": record}, path)
    return Path(path)


@contextmanager
def configured(teacher, **settings):
    """The shared teacher with some constructor settings changed for the block (restored after)."""
    saved = {k: getattr(teacher, k) for k in settings}
    for k, v in settings.items():
        setattr(teacher, k, v)
    try:
        yield teacher
    finally:
        for k, v in saved.items():
            setattr(teacher, k, v)


def write_dicom_series(
    folder: Path,
    stored,
    *,
    pixel_spacing: tuple[float, float] = (0.7, 0.8),
    step: float = 2.5,
    origin: tuple[float, float, float] = (-20.0, -30.0, 10.0),
    orientation: tuple = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    rescale: tuple[float, float] = (1.0, -1024.0),
    thickness: bool = True,
    series_uid: str | None = None,
    skip: tuple[int, ...] | set[int] = (),
    name: str = "slice_{:03d}.dcm",
) -> list[str]:
    """Write ``stored`` (slices, rows, columns of stored integers; slice k at ``origin`` + k ``step`` along
    the normal of ``orientation``, the LPS directions along a row and down a column) as one CT series,
    one file per slice, with file names and instance numbers in reverse position order (a reader must
    sort by position). ``pixel_spacing``: (between rows, between columns) in mm. Returns the SOP
    instance UIDs by position (skipped slices left out)."""
    import datetime

    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    along_row, along_column = (np.asarray(v, dtype=float) for v in orientation)
    normal = np.cross(along_row, along_column)
    series_uid = series_uid or generate_uid()
    study, frame = generate_uid(), generate_uid()
    uids = []
    for k, plane in enumerate(stored):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.ContentDate = "CT", "phantom", datetime.date.today().strftime("%Y%m%d")
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.SeriesNumber, ds.InstanceNumber = 3, len(stored) - k
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * step * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*along_row, *along_column)]
        ds.PixelSpacing = list(pixel_spacing)
        if thickness:
            ds.SliceThickness = step
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.PixelData = plane.astype(np.uint16).tobytes()
        ds.save_as(folder / name.format(len(stored) - k), enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids
