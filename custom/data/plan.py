"""A training plan derived from the dataset's fingerprint: spacing, patch, intensity normalisation, batch sizes.

The bundle's defaults were made for 128x128 phantoms at 1 mm. A user's scans differ in spacing, size and
intensity scale, and nnU-Net's lesson is that a plan derived from the dataset itself is most of the
accuracy on a new task. This module

1. **fingerprints** a datalist once (:func:`fingerprint_datalist`): every labelled image and label, and an
   evenly spaced sample of the unlabelled images, are read as the bundle's loaders read them (MONAI
   ``LoadImage``, NIfTI / NRRD / MetaImage / DICOM series folders, reoriented to ``axcodes``) and
   summarised: shape and spacing per image, whole-image and foreground intensity statistics, class voxel
   fractions and a CT/MR hint. The result is cached as JSON, keyed by the datalist's content and the size
   and modification time of every file read, so a changed dataset is fingerprinted again.
2. **derives** the plan (:func:`derive_plan`, a pure function of the fingerprint, the dimensionality and a
   memory budget): ``pixdim``, ``roi_size``, the normalisation and the three batch sizes. Every value can
   be given instead, and a given value is kept.
3. provides the normalisation as MONAI transforms (:class:`PlannedNormalize`, :class:`PlannedNormalized`)
   to replace ``NormalizeIntensityd`` in the configs.

``python -m custom.data.plan --datalist my_data/datalist.json [--spatial-dims 3] [--memory-gb 8]`` prints
the plan; ``python -m custom.data.plan --measure-memory`` re-measures the memory constants below.

MONAI's ``monai.apps.auto3dseg.DataAnalyzer`` was tried first (MONAI 1.6.1) and not used: it reorients
every image to ``RAS`` whatever the bundle's ``axcodes`` (2D images fail that step and are dropped), it
does not check DICOM series folders the way the bundle does, and its JSON output raised ``TypeError``.
The statistics here are a small subset of its own, gathered with the same MONAI readers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from custom.data.datalist import (
    DatalistError,
    check_dicom_series,
    datalist_entry,
    dicom_files,
    exit_on_error,
    load_classes,
    read_datalist_json,
)

logger = logging.getLogger(__name__)

PLAN_VERSION = 1
FINGERPRINT_VERSION = 1
#: the student's token size: every side of a patch is a multiple of it (custom.networks.student.PATCH_SIZE)
PATCH_MULTIPLE = 16
DEFAULT_MEMORY_GB = 8.0
#: the bundle's batch sizes: the plan lowers them when the budget requires, never raises them (more patches
#: a step cost time on a CPU and change the optimisation the learning rates and schedules were set for)
BUNDLE_BATCH = {"batch_size": 2, "unlabelled_batch_size": 2, "pretrain_batch_size": 6}
#: the stage 2 step the roi is shrunk for: this many labelled and as many unlabelled images
MIN_BATCH = 2
#: ratio of the largest to the smallest median spacing above which the data counts as anisotropic
ANISOTROPY_RATIO = 3.0
#: foreground (and whole-image) voxels sampled per image for the dataset-wide percentiles
SAMPLES_PER_IMAGE = 10_000
#: unlabelled images fingerprinted by default: none. The plan comes from the labelled training cases (as
#: nnU-Net's does), so stage 1, stage 2 and ``python -m custom.data.plan`` plan alike whatever unlabelled
#: list each stage uses; ``max_unlabelled`` > 0 adds that many (evenly spaced through the list)
MAX_UNLABELLED = 0
#: A whole stage 2 step holds more than the student's own step that :data:`MEMORY_MODELS` describes (the
#: EMA teacher's forward pass, pseudo-labels and masks, the strong-augmented copies, the batch itself).
#: research/results.md ("3D at clinical size") measured a stage 2 step of 2 + 2 patches of 96x96x64 at
#: 3231 MiB (huge pages off) and 3317 MiB (on) above the resident datasets, where the model gives 2890 MiB:
#: 12-15 % more. The plan fills the budget divided by this.
STEP_MARGIN = 1.15
NORMALISATION_KINDS = ("clip_zscore", "zscore_foreground", "zscore")


class PlanError(DatalistError):
    """A dataset that cannot be fingerprinted or planned; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------------
# memory model of the student's training step
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """Peak memory of one training step of the default student, in bytes, for ``samples`` patches of
    ``voxels`` voxels each::

        max(floor, fixed + transient * voxels + samples * (per_sample + per_voxel * voxels))

    ``fixed`` is the weights, gradients and AdamW state; ``transient`` a buffer that grows with the patch
    but not with the batch; ``per_sample + per_voxel * voxels`` the activations kept for the backward pass,
    per patch; ``floor`` the peak of a step on small patches, where the optimizer's temporaries, not the
    activations, set the peak.
    """

    fixed: float
    transient: float
    per_sample: float
    per_voxel: float
    floor: float = 0.0

    def step_bytes(self, roi_size: Sequence[int], samples: int) -> float:
        """Estimated peak bytes of a step on ``samples`` patches of ``roi_size``."""
        voxels = math.prod(roi_size)
        linear = self.fixed + self.transient * voxels + samples * (self.per_sample + self.per_voxel * voxels)
        return max(self.floor, linear)

    def samples_that_fit(self, roi_size: Sequence[int], budget_bytes: float) -> int:
        """The most patches of ``roi_size`` one step can hold within ``budget_bytes`` (0 when not even one)."""
        voxels = math.prod(roi_size)
        room = budget_bytes - self.fixed - self.transient * voxels
        if budget_bytes < self.floor or room <= 0:
            return 0
        return int(room // max(self.per_sample + self.per_voxel * voxels, 1.0))


#: Measured with :func:`measure_memory` (``python -m custom.data.plan --measure-memory``, 5 minutes) on the
#: CPU (x86_64, torch 2.14, MONAI 1.6.1, float32, 2 threads, glibc's cache of freed memory turned off): for each patch
#: size and batch 1 and 2, a fresh Python process builds ``UnCoLStudent`` with train.json's ``network_def``
#: (hidden 192, mlp 768, 3 heads, 4 layers, feature size 16; 3 classes), runs one forward, DiceCE loss,
#: backward and AdamW step, and reports its peak resident memory (``VmHWM``) less its resident memory
#: before the model was built. The constants are the least-squares fit of those peaks (MiB):
#:   2D 256^2: 136 / 228, 384^2: 250 / 456, 512^2: 410 / 774, 640^2: 615 / 1184; 32^2 batch 1 (floor): 83
#:   3D 48^3: 193 / 321, 64^3: 372 / 686, 80x80x64: 547 / 1041, 96x96x64: 765 / 1475; 32^3 (floor): 149
#: i.e. about 1.46 kB a voxel per 2D patch and 1.26 kB per 3D patch, plus 45-60 MB of weights and optimizer
#: state; the fit is within 2 % of every point, and of two patches outside them (128x128x64: 1315 MiB
#: measured, 1316 modelled; 1024^2: 1502 and 1504). Huge pages on (``THP_MEM_ALLOC_ENABLE=1``, as in
#: training). A GPU step with AMP keeps half-precision activations, so these CPU figures over-estimate it:
#: the plan errs on the side that fits. Not modelled: the generalized teacher (LiteMedSAM, inference only,
#: its encoder outputs cached on disk) and the distillation heads of stage 1.
MEMORY_MODELS: dict[int, MemoryModel] = {
    2: MemoryModel(fixed=46.41e6, transient=4.296, per_sample=0.7442e6, per_voxel=1455.1, floor=87.48e6),
    3: MemoryModel(fixed=59.99e6, transient=0.0, per_sample=0.0, per_voxel=1259.1, floor=156.10e6),
}

#: the default student of bundle/configs/train.json ("network_def"), which the constants above describe
DEFAULT_NETWORK = {"hidden_size": 192, "mlp_dim": 768, "num_heads": 3, "num_layers": 4, "feature_size": 16}
#: patch sizes :func:`measure_memory` runs by default
MEASURE_SIZES = {
    2: [(256, 256), (384, 384), (512, 512), (640, 640)],
    3: [(48, 48, 48), (64, 64, 64), (80, 80, 64), (96, 96, 64)],
}

_MEASURE_WORKER = """
import json, sys
import torch
from monai.losses import DiceCELoss
from custom.networks.student import UnCoLStudent

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

job = json.loads(sys.argv[1])
torch.manual_seed(0)
base = status("VmRSS")
net = UnCoLStudent(spatial_dims=len(job["roi"]), in_channels=1, out_channels=job["classes"], **job["network"])
opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
x = torch.randn(job["batch"], 1, *job["roi"])
y = torch.randint(0, job["classes"], (job["batch"], 1, *job["roi"]))
opt.zero_grad(set_to_none=True)
loss_fn(net(x), y).backward()
opt.step()
print(json.dumps({"peak": status("VmHWM") - base}))
"""


def measure_point(
    roi_size: Sequence[int], batch: int, network: Mapping[str, int] | None = None, num_classes: int = 3
) -> float:
    """Peak resident-memory growth (bytes) of one training step of the student on ``batch`` patches of
    ``roi_size``, measured in a fresh process: its ``VmHWM`` (the peak of its own address space; not
    ``ru_maxrss``, which also holds the peak of the parent that started it) less its ``VmRSS`` before
    the model is built."""
    job = {"roi": list(roi_size), "batch": batch, "network": dict(network or DEFAULT_NETWORK), "classes": num_classes}
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "2")
    # glibc keeps freed memory for reuse, so the peak RSS would depend on the allocation history (two runs of
    # one step differed by 30 %); big blocks mmapped and returned at once make RSS follow the live tensors
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="2")
    env["THP_MEM_ALLOC_ENABLE"] = "1"  # as custom/__init__.py sets it for training
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE_WORKER, json.dumps(job)], capture_output=True, text=True, env=env, cwd=root
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement of {job} failed: {out.stderr.strip()[-500:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak"])


def fit_memory_model(points: Sequence[tuple[Sequence[int], int, float]], floor: float = 0.0) -> MemoryModel:
    """Least-squares :class:`MemoryModel` through measured ``(roi_size, batch, peak_bytes)`` points (two
    batch sizes or more at two patch sizes or more, all large enough for the activations to set the peak).
    Coefficients are kept non-negative: a term that the fit makes negative (noise) is dropped and the rest
    fitted again."""
    rows = np.asarray([[1.0, math.prod(roi), float(batch), batch * math.prod(roi)] for roi, batch, _ in points])
    peaks = np.asarray([float(peak) for _, _, peak in points])
    active = [0, 1, 2, 3]
    coef = np.zeros(4)
    while active:
        solution, *_ = np.linalg.lstsq(rows[:, active], peaks, rcond=None)
        if (solution >= 0).all():
            coef[active] = solution
            break
        active.pop(int(np.argmin(solution)))
    fixed, transient, per_sample, per_voxel = (float(c) for c in coef)
    return MemoryModel(fixed=fixed, transient=transient, per_sample=per_sample, per_voxel=per_voxel, floor=floor)


def measure_memory(
    spatial_dims: int,
    sizes: Sequence[Sequence[int]] | None = None,
    batches: Sequence[int] = (1, 2),
    network: Mapping[str, int] | None = None,
    log: Callable[[str], None] | None = print,
) -> tuple[MemoryModel, list[tuple[list[int], int, float]]]:
    """Re-measure the :data:`MEMORY_MODELS` constants of ``spatial_dims``: one :func:`measure_point` per
    patch size and batch, fitted by :func:`fit_memory_model`, and the floor from one ``32^d`` patch.
    Returns the model and the measured points."""
    points = []
    for roi in sizes or MEASURE_SIZES[spatial_dims]:
        for batch in batches:
            peak = measure_point(roi, batch, network)
            points.append((list(roi), batch, peak))
            if log:
                log(f"  {'x'.join(map(str, roi))} batch {batch}: {peak / 2**20:.0f} MiB")
    floor = measure_point([32] * spatial_dims, 1, network)
    if log:
        log(f"  floor ({'x'.join(['32'] * spatial_dims)} batch 1): {floor / 2**20:.0f} MiB")
    return fit_memory_model(points, floor), points


# --------------------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------------------


def _entries(path: Path, content: dict, key: str, require_label: bool) -> list[dict]:
    """The ``key`` list with paths resolved against the datalist's folder (files or DICOM series folders)."""
    entries = content.get(key) or []
    if not isinstance(entries, list):
        raise PlanError(f"{path}: '{key}' must be a list")
    items = []
    for i, entry in enumerate(entries):
        entry = datalist_entry(path, key, i, entry, require_label)
        item = {}
        for role in ("image", "label") if require_label else ("image",):
            resolved = path.parent / entry[role]  # an absolute path stays as it is
            if not resolved.exists():
                raise PlanError(f"{path}: '{key}' names {role} {resolved}, which does not exist")
            item[role] = str(resolved)
        items.append(item)
    return items


def _sample_evenly(items: list[dict], limit: int) -> list[dict]:
    if len(items) <= limit:
        return list(items)
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else items[:limit]


def _read_oriented(path: str, role: str, spatial_dims: int, axcodes: str) -> tuple[np.ndarray, list[float]]:
    """Voxels and spacing of one image as the bundle's transforms see them before resampling
    (``LoadImage``, channel first, ``Orientation(axcodes)``); problems as :class:`DatalistError`."""
    from monai.transforms import EnsureChannelFirst, LoadImage, Orientation

    try:
        if Path(path).is_dir():
            check_dicom_series(path)
            img = LoadImage(image_only=True, reader="ITKReader")(path)
        else:
            img = LoadImage(image_only=True)(path)
        img = EnsureChannelFirst()(img)
    except DatalistError:
        raise
    except Exception as err:  # any reader failure means the file is unusable
        raise DatalistError(f"{path}: cannot read {role} ({type(err).__name__}: {err})") from err
    if img.ndim - 1 != spatial_dims or img.shape[0] != 1:
        raise DatalistError(
            f"{path}: {role} has shape {tuple(img.shape)} (channel first), but a {spatial_dims}D plan takes "
            f"single-channel {spatial_dims}D images"
        )
    img = Orientation(axcodes=axcodes, labels=None)(img)
    spacing = [round(float(s), 5) for s in np.asarray(img.pixdim)[:spatial_dims]]  # float32 headers: 0.8 not 0.80000001
    data = np.asarray(img.array)[0]
    if data.size == 0 or min(data.shape) < 2:
        raise DatalistError(f"{path}: {role} has shape {data.shape}, too small to use")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise DatalistError(f"{path}: {role} contains NaN or Inf values")
    return data, spacing


def _stats(values: np.ndarray) -> dict[str, float]:
    p = np.percentile(values, [0.5, 50.0, 99.5])
    return {
        "min": float(values.min()),
        "p00_5": float(p[0]),
        "p50": float(p[1]),
        "p99_5": float(p[2]),
        "max": float(values.max()),
        "mean": float(values.mean(dtype=np.float64)),
        "std": float(values.std(dtype=np.float64)),
    }


def _sample(values: np.ndarray, rng: np.random.Generator, n: int = SAMPLES_PER_IMAGE) -> np.ndarray:
    return values if values.size <= n else values[rng.choice(values.size, n, replace=False)]


def _file_stamps(items: list[dict]) -> list[list]:
    """(path, size, mtime_ns) of every file the fingerprint reads (each file of a DICOM series folder)."""
    stamps = []
    for item in items:
        for role in ("image", "label"):
            if role not in item:
                continue
            path = Path(item[role])
            for f in dicom_files(path) if path.is_dir() else [path]:
                st = f.stat()
                stamps.append([str(f), st.st_size, st.st_mtime_ns])
    return stamps


def fingerprint_key(items: list[dict], params: Mapping[str, Any]) -> str:
    """Cache key of a fingerprint: the fingerprint's parameters, and the path, role, size and modification
    time of every file it reads."""
    h = hashlib.sha256(json.dumps({"params": dict(params), "files": _file_stamps(items)}, sort_keys=True).encode())
    return h.hexdigest()


def modality_hint(minima: Sequence[float], maxima: Sequence[float]) -> str:
    """``"CT"`` when the images look like Hounsfield units (the median image minimum lies between -3100
    and -900, which covers air at -1000/-1024 and the -2048/-3024 padding of some scanners, and the median
    range is at least 1000), else ``"MR"`` (anything else: MR, or already normalised data)."""
    lo = float(np.median(minima))
    span = float(np.median(np.asarray(maxima) - np.asarray(minima)))
    return "CT" if -3100.0 <= lo <= -900.0 and span >= 1000.0 else "MR"


def _pooled(cases: list[dict], key: str) -> dict[str, float] | None:
    """Exact dataset-wide mean and std from per-image counts, means and stds."""
    parts = [(c[key]["voxels"], c[key]["mean"], c[key]["std"]) for c in cases if c.get(key)]
    total = sum(n for n, _, _ in parts)
    if not total:
        return None
    mean = sum(n * m for n, m, _ in parts) / total
    var = sum(n * (s * s + m * m) for n, m, s in parts) / total - mean * mean
    return {"voxels": int(total), "mean": float(mean), "std": float(math.sqrt(max(var, 0.0)))}


def fingerprint_datalist(
    datalist: str | Path,
    spatial_dims: int = 2,
    axcodes: str | None = None,
    cache: str | Path | None = None,
    unlabelled_key: str = "unlabeled",
    max_unlabelled: int = MAX_UNLABELLED,
) -> dict:
    """Fingerprint of a Decathlon-style datalist (see the module docstring), read from ``cache`` when that
    file holds one with the same key, else computed (and written to ``cache`` when given).

    Labelled images (``training``) give shape, spacing, whole-image and foreground (label > 0) intensity
    statistics and class voxel counts; up to ``max_unlabelled`` unlabelled images (``unlabelled_key``,
    evenly spaced through the list) give shape, spacing and whole-image statistics. Images that cannot
    be read are skipped and listed under ``skipped``; fewer than one readable labelled image is a
    :class:`PlanError`.
    """
    path = Path(datalist)
    content = read_datalist_json(path)
    if not isinstance(content.get("training"), list) or not content["training"]:
        raise PlanError(f"{path}: no labelled images to fingerprint (the 'training' list is missing or empty)")
    labelled = _entries(path, content, "training", require_label=True)
    unlabelled = _entries(path, content, unlabelled_key, require_label=False)
    classes = None
    try:
        classes = load_classes(path, required=False)
    except DatalistError:
        pass  # the bundle's own class check names this problem; the fingerprint counts the values it finds
    return fingerprint_items(labelled, unlabelled, path, spatial_dims, axcodes, cache, max_unlabelled, classes)


def fingerprint_items(
    labelled: Sequence[Mapping],
    unlabelled: Sequence[Mapping],
    source: str | Path,
    spatial_dims: int = 2,
    axcodes: str | None = None,
    cache: str | Path | None = None,
    max_unlabelled: int = MAX_UNLABELLED,
    classes: Sequence[str] | None = None,
) -> dict:
    """:func:`fingerprint_datalist` of the ``image``/``label`` items a run trains on (``source`` names
    them in messages: the datalist, or whoever handed the items over, as MONAI Label does)."""
    path = source
    if spatial_dims not in (2, 3):
        raise PlanError(f"{path}: spatial_dims must be 2 or 3, got {spatial_dims}")
    axcodes = axcodes or ("RA" if spatial_dims == 2 else "RAS")
    if len(axcodes) != spatial_dims:
        raise PlanError(f"{path}: axcodes {axcodes!r} has {len(axcodes)} letters, but spatial_dims is {spatial_dims}")
    if not labelled:
        raise PlanError(f"{path}: no labelled images to fingerprint")
    labelled = [{"image": str(item["image"]), "label": str(item["label"])} for item in labelled]
    unlabelled_all = [{"image": str(item["image"])} for item in unlabelled]
    unlabelled = _sample_evenly(unlabelled_all, max_unlabelled)
    params = {
        "version": FINGERPRINT_VERSION,
        "spatial_dims": spatial_dims,
        "axcodes": axcodes,
        "max_unlabelled": max_unlabelled,
        "samples_per_image": SAMPLES_PER_IMAGE,
        "classes": list(classes or []),
    }
    key = fingerprint_key(labelled + unlabelled, params)
    if cache is not None and Path(cache).is_file():
        try:
            cached = json.loads(Path(cache).read_text())
            if cached.get("key") == key:
                logger.info(f"fingerprint of {path} read from {cache}")
                return cached
        except (OSError, ValueError, AttributeError) as err:
            logger.warning(f"{cache}: unreadable fingerprint cache ({err}); computing it again")

    cases, skipped = [], []
    fg_samples, all_samples = [], []
    class_voxels = np.zeros(len(classes) if classes else 0, dtype=np.int64)
    for index, item in enumerate(labelled + unlabelled):
        has_label = "label" in item
        rng = np.random.default_rng(index)
        try:
            image, spacing = _read_oriented(item["image"], "image", spatial_dims, axcodes)
            label = None
            if has_label:
                label, _ = _read_oriented(item["label"], "label", spatial_dims, axcodes)
                if label.shape != image.shape:
                    raise DatalistError(
                        f"{item['label']}: label shape {label.shape} does not match image {item['image']} "
                        f"shape {image.shape}"
                    )
                label = np.rint(label).astype(np.int64)
                if label.min() < 0:
                    raise DatalistError(f"{item['label']}: label has negative values")
        except DatalistError as err:
            skipped.append(" ".join(str(err).split()))  # one line, even for a reader's multi-line message
            logger.warning(f"fingerprint skips: {skipped[-1]}")
            continue
        shape = [int(n) for n in image.shape]
        image = image.astype(np.float32, copy=False).ravel()
        case = {
            "image": item["image"],
            "label": item.get("label"),
            "shape": shape,
            "spacing": spacing,
            "intensity": {**_stats(image), "zero_fraction": float(np.mean(image == 0))},
        }
        all_samples.append(_sample(image, rng))
        if label is not None:
            counts = np.bincount(label.ravel())
            if len(counts) > len(class_voxels):
                class_voxels = np.pad(class_voxels, (0, len(counts) - len(class_voxels)))
            class_voxels[: len(counts)] += counts
            case["class_voxels"] = counts.tolist()
            fg = image[label.ravel() > 0]
            if fg.size:
                case["foreground"] = {**_stats(fg), "voxels": int(fg.size)}
                fg_samples.append(_sample(fg, rng))
        case["intensity"]["voxels"] = int(image.size)
        cases.append(case)
        del image, label

    n_labelled = sum(1 for c in cases if c["label"] is not None)
    if n_labelled < 1:
        first = f"; first problem: {skipped[0]}" if skipped else ""
        raise PlanError(f"{path}: no readable labelled image to fingerprint ({len(labelled)} listed{first})")

    foreground = None
    if fg_samples:
        pooled = np.concatenate(fg_samples)
        p = np.percentile(pooled, [0.5, 50.0, 99.5])
        foreground = {**_pooled(cases, "foreground"), "p00_5": float(p[0]), "p50": float(p[1]), "p99_5": float(p[2])}
    pooled = np.concatenate(all_samples)
    p = np.percentile(pooled, [0.5, 50.0, 99.5])
    intensity = {
        "min": min(c["intensity"]["min"] for c in cases),
        "max": max(c["intensity"]["max"] for c in cases),
        "p00_5": float(p[0]),
        "p50": float(p[1]),
        "p99_5": float(p[2]),
        **{k: v for k, v in (_pooled(cases, "intensity") or {}).items() if k != "voxels"},
    }
    names = list(classes or [])
    names += [str(v) for v in range(len(names), len(class_voxels))]
    total = int(class_voxels.sum())
    fingerprint = {
        "version": FINGERPRINT_VERSION,
        "key": key,
        "datalist": str(path),
        "spatial_dims": spatial_dims,
        "axcodes": axcodes,
        "num_labelled": n_labelled,
        "num_unlabelled": len(cases) - n_labelled,
        "unlabelled_listed": len(unlabelled_all),
        "skipped": skipped,
        "cases": cases,
        "intensity": intensity,
        "foreground": foreground,
        "class_fractions": {n: (float(c) / total if total else 0.0) for n, c in zip(names, class_voxels, strict=True)},
        "modality": modality_hint([c["intensity"]["min"] for c in cases], [c["intensity"]["max"] for c in cases]),
    }
    if cache is not None:
        cache = Path(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # ranks of a multi-GPU run write at once
        tmp.write_text(json.dumps(fingerprint, indent=1))
        tmp.replace(cache)
    return fingerprint


# --------------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------------


def _ceil16(n: float) -> int:
    return max(PATCH_MULTIPLE, PATCH_MULTIPLE * math.ceil(round(n, 6) / PATCH_MULTIPLE))


def target_spacing(
    spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], ratio: float = ANISOTROPY_RATIO
) -> tuple[list[float], str]:
    """The spacing to resample to, and a note saying why.

    The median spacing per axis. When the data is anisotropic (largest / smallest median spacing above
    ``ratio``) *and* the coarse axis also has few voxels (its median size at the median spacing, times
    ``ratio``, is below the largest other median size: thick slices, few of them), the coarse axis takes
    the 10th percentile of its spacings instead, never finer than the largest other median spacing.
    Resampling the finer-sliced images of such a set to the median would throw away most of their slices
    while the patch has only a few along that axis anyway (nnU-Net's rule, same idea). Anisotropic data
    with many voxels along the coarse axis keeps the median.
    """
    sp = np.asarray(spacings, dtype=np.float64)
    sh = np.asarray(shapes, dtype=np.float64)
    median = np.median(sp, axis=0)
    target = median.copy()
    note = "median spacing"
    if len(median) > 1 and median.max() / median.min() > ratio:
        worst = int(np.argmax(median))
        others = [a for a in range(len(median)) if a != worst]
        size = np.median(sh * sp / median, axis=0)
        if size[worst] * ratio < size[others].max():
            finer = float(np.percentile(sp[:, worst], 10))
            target[worst] = max(finer, float(median[others].max()))
            note = (
                f"median; anisotropic ({median.max() / median.min():.1f} > {ratio:g}) with few voxels along axis "
                f"{worst}: there the 10th percentile {target[worst]:.3g} (median {median[worst]:.3g})"
            )
        else:
            note = f"median; anisotropic ({median.max() / median.min():.1f}) but many voxels along axis {worst}"
    return [round(float(v), 4) for v in target], note


def resampled_shape(
    spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], pixdim: Sequence[float]
) -> list[float]:
    """Median image shape after resampling every image to ``pixdim``."""
    sp, sh = np.asarray(spacings, dtype=np.float64), np.asarray(shapes, dtype=np.float64)
    return [float(v) for v in np.median(sh * sp / np.asarray(pixdim, dtype=np.float64), axis=0)]


def largest_patch(median_shape: Sequence[float], fits: Callable[[list[int]], bool]) -> list[int] | None:
    """The patch the plan trains on: the median shape rounded up to multiples of 16 when that ``fits``,
    else shrunk 16 voxels at a time along the axis that is largest relative to the median shape (ties: the
    longer side, then the first axis), so the patch keeps the median's aspect ratio. None when even
    ``16^d`` does not fit."""
    roi = [_ceil16(n) for n in median_shape]
    while not fits(roi):
        axes = [a for a in range(len(roi)) if roi[a] > PATCH_MULTIPLE]
        if not axes:
            return None
        a = max(axes, key=lambda i: (roi[i] / max(median_shape[i], 1.0), roi[i], -i))
        roi[a] -= PATCH_MULTIPLE
    return roi


def _median_int(values: Sequence[float]) -> list[float]:
    return [round(float(v), 1) for v in values]


def _normalisation(fingerprint: Mapping, modality: str) -> tuple[dict, str]:
    if modality == "CT":
        fg = fingerprint.get("foreground")
        if not fg:
            raise PlanError(
                f"{fingerprint['datalist']}: the labels have no foreground voxels to take CT statistics from"
            )
        norm = {
            "kind": "clip_zscore",
            "clip": [round(fg["p00_5"], 2), round(fg["p99_5"], 2)],
            "mean": round(fg["mean"], 4),
            "std": round(max(fg["std"], 1e-6), 4),
        }
        return norm, "CT-like: clip to foreground 0.5/99.5 %, z-score by its mean/std"
    norm = {"kind": "zscore_foreground", "clip": None, "mean": None, "std": None}
    return norm, "MR-like: z-score per image over its Otsu foreground"


def check_normalisation(norm: Mapping | str) -> dict:
    """A complete normalisation dict (``kind``, ``clip``, ``mean``, ``std``), or ValueError; a kind alone
    (``"zscore"``) stands for ``{"kind": "zscore"}``."""
    if isinstance(norm, str):
        norm = {"kind": norm}
    kind = norm.get("kind")
    if kind not in NORMALISATION_KINDS:
        raise ValueError(f"normalisation kind must be one of {NORMALISATION_KINDS}, got {kind!r}")
    out = {"kind": kind, "clip": norm.get("clip"), "mean": norm.get("mean"), "std": norm.get("std")}
    if kind == "clip_zscore":
        if out["clip"] is None or len(out["clip"]) != 2 or out["clip"][0] >= out["clip"][1]:
            raise ValueError(f"clip_zscore needs clip [low, high] with low < high, got {out['clip']!r}")
        if out["mean"] is None or not out["std"] or out["std"] <= 0:
            raise ValueError(f"clip_zscore needs a mean and a positive std, got {out['mean']!r}, {out['std']!r}")
        out["clip"] = [float(v) for v in out["clip"]]
        out["mean"], out["std"] = float(out["mean"]), float(out["std"])
    return out


@dataclasses.dataclass
class Plan:
    """What the bundle trains with on a dataset, derived by :func:`derive_plan`.

    ``normalisation``: ``kind`` ``clip_zscore`` (clip to ``clip``, subtract ``mean``, divide by ``std``:
    dataset-wide constants), ``zscore_foreground`` (per image over its Otsu foreground) or ``zscore`` (per
    image over all voxels, the bundle's old ``NormalizeIntensityd``). ``batch_size`` and
    ``unlabelled_batch_size`` are stage 2's two streams (one step holds both), ``pretrain_batch_size``
    stage 1's. ``overridden`` names the fields given rather than derived; ``notes`` says why each derived
    value is what it is.
    """

    spatial_dims: int
    pixdim: list[float]
    axcodes: str
    roi_size: list[int]
    normalisation: dict
    batch_size: int
    pretrain_batch_size: int
    unlabelled_batch_size: int
    memory_budget_gb: float
    modality: str
    class_fractions: dict[str, float]
    fingerprint: dict
    step_memory_gb: float = 0.0
    overridden: list[str] = dataclasses.field(default_factory=list)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    version: int = PLAN_VERSION

    def to_dict(self) -> dict:
        """A JSON-ready dict (:meth:`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """The plan of :meth:`to_dict`; a plan of another version or with unknown fields is refused."""
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {data.get('version')!r}, this code reads version {PLAN_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown plan fields {unknown}")
        return cls(**{k: data[k] for k in names if k in data})

    def describe(self) -> str:
        """The plan on one screen: values, where they came from, and what the dataset looked like."""
        fp = self.fingerprint

        def x(values: Sequence, fmt: str = "{:g}") -> str:
            return " x ".join(fmt.format(v) for v in values)

        def why(field: str) -> str:
            return "given" if field in self.overridden else self.notes.get(field, "")

        norm = self.normalisation
        norm_text = norm["kind"]
        if norm["kind"] == "clip_zscore":
            norm_text += f"  clip {norm['clip'][0]:g}..{norm['clip'][1]:g}, mean {norm['mean']:g}, std {norm['std']:g}"
        fg = fp.get("foreground")
        fg_text = " / ".join(f"{v:.4g}" for v in fg) if fg else "none"
        batch_given = [
            n for n in ("batch_size", "unlabelled_batch_size", "pretrain_batch_size") if n in self.overridden
        ]
        batch_why = f"given: {', '.join(batch_given)}" if batch_given else self.notes.get("batch_size", "")
        images = f"{fp.get('num_labelled', 0)} labelled + {fp.get('num_unlabelled', 0)} unlabelled images read"
        listed = f"{fp.get('unlabelled_listed', 0)} unlabelled listed, {fp.get('skipped', 0)} skipped"
        spacing = f"median {x(fp['median_spacing'])} mm (range {x(fp['spacing_min'])} .. {x(fp['spacing_max'])})"
        shape = f"median {x(fp['median_shape'], '{:.0f}')} (range {x(fp['shape_min'])} .. {x(fp['shape_max'])})"
        lines = [
            f"UnCoL plan v{self.version}: {fp.get('datalist', '?')}",
            f"  dataset      {self.spatial_dims}D, {images} ({listed})",
            f"  spacing      {spacing}",
            f"  shape        {shape}; at pixdim {x(fp['resampled_shape'], '{:.0f}')}",
            f"  intensity    {fp['intensity_min']:.4g} .. {fp['intensity_max']:.4g}; foreground 0.5/50/99.5 %: "
            + fg_text,
            "  classes      " + ", ".join(f"{k} {v:.3f}" for k, v in self.class_fractions.items()),
            f"  modality     {self.modality}-like  [{why('modality')}]",
            "",
            f"  axcodes      {self.axcodes}",
            f"  pixdim       {x(self.pixdim)} mm  [{why('pixdim')}]",
            f"  roi_size     {x(self.roi_size, '{:d}')}  [{why('roi_size')}]",
            f"  normalise    {norm_text}  [{why('normalisation')}]",
            f"  batch        labelled {self.batch_size}, unlabelled {self.unlabelled_batch_size}, "
            f"stage 1 {self.pretrain_batch_size}  [{batch_why}]",
            f"  memory       about {self.step_memory_gb:.2f} GB a step of the {self.memory_budget_gb:g} GB budget",
        ]
        if self.notes.get("warning"):
            lines.append(f"  warning      {self.notes['warning']}")
        return "\n".join(lines)

    def bundle_overrides(self) -> dict:
        """The plan as bundle config overrides (``--key value`` on the ``monai.bundle run`` command line)."""
        return {
            "pixdim": self.pixdim,
            "axcodes": self.axcodes,
            "roi_size": self.roi_size,
            "batch_size": self.batch_size,
            "unlabelled_batch_size": self.unlabelled_batch_size,
            "pretrain_batch_size": self.pretrain_batch_size,
            "normalisation": self.normalisation,
        }


def _summary(fingerprint: Mapping, pixdim: Sequence[float]) -> dict:
    cases = fingerprint["cases"]
    spacings = np.asarray([c["spacing"] for c in cases])
    shapes = np.asarray([c["shape"] for c in cases])
    fg = fingerprint.get("foreground")
    return {
        "datalist": fingerprint["datalist"],
        "key": fingerprint["key"],
        "num_labelled": fingerprint["num_labelled"],
        "num_unlabelled": fingerprint["num_unlabelled"],
        "unlabelled_listed": fingerprint["unlabelled_listed"],
        "skipped": len(fingerprint["skipped"]),
        "median_spacing": [round(float(v), 4) for v in np.median(spacings, axis=0)],
        "spacing_min": [round(float(v), 4) for v in spacings.min(0)],
        "spacing_max": [round(float(v), 4) for v in spacings.max(0)],
        "median_shape": [float(v) for v in np.median(shapes, axis=0)],
        "shape_min": [int(v) for v in shapes.min(0)],
        "shape_max": [int(v) for v in shapes.max(0)],
        "resampled_shape": [round(v, 1) for v in resampled_shape(spacings, shapes, pixdim)],
        "intensity_min": fingerprint["intensity"]["min"],
        "intensity_max": fingerprint["intensity"]["max"],
        "foreground": [round(fg[k], 4) for k in ("p00_5", "p50", "p99_5")] if fg else None,
    }


def derive_plan(
    fingerprint: Mapping,
    spatial_dims: int | None = None,
    memory_budget_gb: float = DEFAULT_MEMORY_GB,
    *,
    pixdim: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
    normalisation: Mapping[str, Any] | str | None = None,
    modality: str | None = None,
    batch_size: int | None = None,
    pretrain_batch_size: int | None = None,
    unlabelled_batch_size: int | None = None,
    memory: MemoryModel | None = None,
    margin: float = STEP_MARGIN,
) -> Plan:
    """The plan of a fingerprint (pure: no file is read). Every keyword given is kept as it is.

    - ``pixdim``: :func:`target_spacing` (median spacing, anisotropy rule).
    - ``roi_size``: :func:`largest_patch` of the median shape at ``pixdim``: the whole median image
      (rounded up to 16) when a stage 2 step of ``MIN_BATCH`` labelled and ``MIN_BATCH`` unlabelled patches
      fits ``memory_budget_gb``, else the largest patch shaped like it that does; when not even ``16^d``
      fits that, the largest that fits one labelled and one unlabelled patch.
    - batch sizes: ``n`` patches of ``roi_size`` fit a step (``memory``, default :data:`MEMORY_MODELS`,
      times ``margin`` for what a whole stage 2 step adds to the student's, :data:`STEP_MARGIN`); stage 1
      takes ``n``, stage 2 ``n // 2`` labelled and as many unlabelled, each at least 1 and at most
      :data:`BUNDLE_BATCH`'s.
    - normalisation: CT-like data (:func:`modality_hint`) is clipped to the foreground's 0.5 and 99.5
      percentiles and z-scored with the foreground's dataset-wide mean and std (one scale for every scan, as
      Hounsfield units already are); MR-like data is z-scored per image over its Otsu foreground
      (:class:`PlannedNormalize`), since MR intensities have no fixed scale between scans.

    Raises :class:`PlanError` (naming the datalist) when no patch fits the budget, ValueError for an
    invalid override.
    """
    dims = int(fingerprint["spatial_dims"])
    where = fingerprint["datalist"]
    if spatial_dims is not None and spatial_dims != dims:
        raise PlanError(f"{where}: the fingerprint is of {dims}D images, the plan asked for {spatial_dims}D")
    if memory_budget_gb <= 0:
        raise PlanError(f"{where}: memory budget must be positive, got {memory_budget_gb} GB")
    memory = memory or MEMORY_MODELS[dims]
    budget = memory_budget_gb * 2**30 / margin  # what the student's own step may take
    cases = fingerprint["cases"]
    spacings = [c["spacing"] for c in cases]
    shapes = [c["shape"] for c in cases]
    overridden, notes = [], {}

    if pixdim is not None:
        pixdim = [float(v) for v in pixdim]
        if len(pixdim) != dims or min(pixdim) <= 0:
            raise ValueError(f"pixdim must be {dims} positive values, got {pixdim}")
        overridden.append("pixdim")
    else:
        pixdim, notes["pixdim"] = target_spacing(spacings, shapes)
    median = resampled_shape(spacings, shapes, pixdim)

    def fits(samples: int) -> Callable[[list[int]], bool]:
        return lambda roi: memory.samples_that_fit(roi, budget) >= samples

    if roi_size is not None:
        roi = [int(v) for v in roi_size]
        if len(roi) != dims or any(v < PATCH_MULTIPLE or v % PATCH_MULTIPLE for v in roi):
            raise ValueError(f"roi_size must be {dims} multiples of {PATCH_MULTIPLE}, got {list(roi_size)}")
        overridden.append("roi_size")
    else:
        whole = [_ceil16(n) for n in median]
        roi = largest_patch(median, fits(2 * MIN_BATCH))
        if roi is None:
            roi = largest_patch(median, fits(2))
        if roi is None:
            need = margin * memory.step_bytes([PATCH_MULTIPLE] * dims, 2) / 2**30
            raise PlanError(
                f"{where}: even a {'x'.join([str(PATCH_MULTIPLE)] * dims)} patch with batch 1 (1 labelled + 1 "
                f"unlabelled image a step) needs about {need:.2f} GB, over the {memory_budget_gb:g} GB memory budget"
            )
        notes["roi_size"] = (
            "whole median image, rounded up to 16"
            if roi == whole
            else f"largest patch shaped like the median image ({'x'.join(map(str, whole))}) that fits"
        )

    n = memory.samples_that_fit(roi, budget)
    fit = {"pretrain_batch_size": n, "batch_size": n // 2, "unlabelled_batch_size": n // 2}
    derived = {name: min(max(fit[name], 1), cap) for name, cap in BUNDLE_BATCH.items()}
    given = {
        "batch_size": batch_size,
        "pretrain_batch_size": pretrain_batch_size,
        "unlabelled_batch_size": unlabelled_batch_size,
    }
    batches = {}
    for name, value in given.items():
        if value is not None:
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
            overridden.append(name)
        batches[name] = int(value) if value is not None else derived[name]
    notes["batch_size"] = f"{n} patches fit a step (stage 2 splits them between its two streams); at most the bundle's"
    step = max(
        memory.step_bytes(roi, batches["batch_size"] + batches["unlabelled_batch_size"]),
        memory.step_bytes(roi, batches["pretrain_batch_size"]),
    )
    if step > budget:
        notes["warning"] = (
            f"the given roi_size/batch sizes need about {margin * step / 2**30:.2f} GB a step, over the "
            f"{memory_budget_gb:g} GB budget"
        )

    if modality is not None:
        if modality not in ("CT", "MR"):
            raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
        overridden.append("modality")
    else:
        modality = fingerprint["modality"]
        lo = float(np.median([c["intensity"]["min"] for c in cases]))
        notes["modality"] = f"median image minimum {lo:.4g}, " + (
            "Hounsfield-like" if modality == "CT" else "not Hounsfield-like"
        )
    if normalisation is not None:
        given_norm = {"kind": normalisation} if isinstance(normalisation, str) else dict(normalisation)
        if given_norm.get("kind") == "clip_zscore" and any(given_norm.get(k) is None for k in ("clip", "mean", "std")):
            planned, _ = _normalisation(fingerprint, "CT")  # constants not given: the dataset's own
            given_norm = {**planned, **{k: v for k, v in given_norm.items() if v is not None}}
        norm = check_normalisation(given_norm)
        overridden.append("normalisation")
    else:
        norm, notes["normalisation"] = _normalisation(fingerprint, modality)

    return Plan(
        spatial_dims=dims,
        pixdim=pixdim,
        axcodes=fingerprint["axcodes"],
        roi_size=roi,
        normalisation=norm,
        batch_size=batches["batch_size"],
        pretrain_batch_size=batches["pretrain_batch_size"],
        unlabelled_batch_size=batches["unlabelled_batch_size"],
        memory_budget_gb=float(memory_budget_gb),
        modality=modality,
        class_fractions={k: round(v, 6) for k, v in fingerprint["class_fractions"].items()},
        fingerprint=_summary(fingerprint, pixdim),
        step_memory_gb=round(margin * step / 2**30, 3),
        overridden=overridden,
        notes=notes,
    )


def make_plan(
    datalist: str | Path,
    spatial_dims: int = 2,
    memory_budget_gb: float = DEFAULT_MEMORY_GB,
    cache: str | Path | None = None,
    axcodes: str | None = None,
    unlabelled_key: str = "unlabeled",
    max_unlabelled: int = MAX_UNLABELLED,
    out: str | Path | None = None,
    labelled: Sequence[Mapping] | None = None,
    unlabelled: Sequence[Mapping] = (),
    class_names: Sequence[str] | None = None,
    **overrides: Any,
) -> Plan:
    """Fingerprint ``datalist`` (cached in ``cache``) and derive its plan; ``overrides`` are
    :func:`derive_plan`'s keywords (``None`` values count as not given). ``out``: also write the plan
    there as JSON. With ``labelled`` given, those items (and ``unlabelled``) are fingerprinted instead
    of the datalist's lists: what the run trains on, whoever listed it (``class_names``: the foreground
    classes, to name the class fractions). An invalid override is reported as
    :class:`PlanError` naming the datalist."""
    if labelled is not None:
        classes = None if class_names is None else ["background", *class_names]
        items = (labelled, unlabelled, datalist, spatial_dims, axcodes, cache, max_unlabelled, classes)
        fingerprint = fingerprint_items(*items)
    else:
        fingerprint = fingerprint_datalist(datalist, spatial_dims, axcodes, cache, unlabelled_key, max_unlabelled)
    try:
        plan = derive_plan(
            fingerprint, spatial_dims, memory_budget_gb, **{k: v for k, v in overrides.items() if v is not None}
        )
    except ValueError as err:
        if isinstance(err, PlanError):
            raise
        raise PlanError(f"{datalist}: {err}") from err
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(plan.to_dict(), indent=2))
    return plan


@exit_on_error
def bundle_plan(datalist: str | Path, spatial_dims: int = 2, out: str | Path | None = None, **kwargs: Any) -> Plan:
    """What training configs call: :func:`make_plan`, logged and written to ``out`` (the run folder); a
    :class:`PlanError` ends the run with its one line."""
    plan = make_plan(datalist, spatial_dims, out=out, **kwargs)
    logger.info("training plan (every value can be given on the command line):\n" + plan.describe())
    if out is not None:
        logger.info(f"plan written to {out}")
    return plan


# --------------------------------------------------------------------------------------------------------
# normalisation transforms
# --------------------------------------------------------------------------------------------------------


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (the cut that maximises the between-class variance of a 256-bin
    histogram), computed over the 0.5-99.5 percentile range so a few extreme voxels do not squeeze the
    histogram."""
    flat = values.detach().flatten().float()
    step = max(1, flat.numel() // 1_000_000)
    lo, hi = (float(q) for q in torch.quantile(flat[::step], torch.tensor([0.005, 0.995], device=flat.device)))
    if hi <= lo:
        return lo
    hist = torch.histc(flat.clamp(lo, hi), bins=bins, min=lo, max=hi).double()
    centres = lo + (torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5) * (hi - lo) / bins
    w0 = torch.cumsum(hist, 0)
    s0 = torch.cumsum(hist * centres, 0)
    w1, s1 = w0[-1] - w0, s0[-1] - s0
    valid = (w0 > 0) & (w1 > 0)
    m0 = s0 / w0.clamp_min(1)
    m1 = s1 / w1.clamp_min(1)
    between = torch.where(valid, w0 * w1 * (m0 - m1) ** 2, torch.zeros_like(w0))
    k = int(torch.argmax(between))
    return lo + (k + 1) * (hi - lo) / bins


class PlannedNormalize(Transform):
    """The plan's intensity normalisation of one image (all channels together).

    - ``clip_zscore``: ``(clip(x, low, high) - mean) / std`` with the plan's dataset-wide constants (CT).
    - ``zscore_foreground``: ``(x - m) / s`` with ``m``, ``s`` the mean and std of the image's voxels above
      its Otsu threshold (MR: the body, without the air around it, whose share of the image changes with
      the field of view). Every voxel is normalised, background included. A foreground under 1 % of the
      image, or a constant one, falls back to the whole image.
    - ``zscore``: over the whole image (as ``NormalizeIntensity``).

    A threshold rather than MONAI's ``nonzero=True``: raw MR background is noise, rarely exactly zero, and
    the zeros of skull-stripped images fall below the threshold anyway.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, normalisation: Mapping[str, Any] | Plan) -> None:
        if isinstance(normalisation, Plan):
            normalisation = normalisation.normalisation
        self.normalisation = check_normalisation(normalisation)

    def __call__(self, img: Any) -> Any:
        x = convert_to_tensor(img, dtype=torch.float32, track_meta=False)
        norm = self.normalisation
        if norm["kind"] == "clip_zscore":
            low, high = norm["clip"]
            out = (x.clamp(low, high) - norm["mean"]) / norm["std"]
        else:
            values = x
            if norm["kind"] == "zscore_foreground":
                mask = x > otsu_threshold(x)
                if mask.sum() >= 0.01 * x.numel() and float(x[mask].std()) > 0:
                    values = x[mask]
            mean = values.mean()
            std = values.std(unbiased=False)
            out = (x - mean) / (std if float(std) > 0 else 1.0)
        return convert_to_dst_type(out, img, dtype=torch.float32)[0]


class PlannedNormalized(MapTransform):
    """Dictionary version of :class:`PlannedNormalize`, in place of ``NormalizeIntensityd``:
    ``{"_target_": "custom.data.plan.PlannedNormalized", "keys": "image", "normalisation": ...}``."""

    backend = PlannedNormalize.backend

    def __init__(
        self, keys: KeysCollection, normalisation: Mapping[str, Any] | Plan, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normaliser = PlannedNormalize(normalisation)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normaliser(d[key])
        return d


# --------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m custom.data.plan --datalist D [...]``: print the plan (and write it with ``--out``);
    ``--measure-memory``: re-measure the memory constants. Problems end with one ``error: ...`` line."""
    parser = argparse.ArgumentParser(prog="python -m custom.data.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--datalist", help="Decathlon-style datalist JSON")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=None, help="2 (default) or 3")
    parser.add_argument("--memory-gb", type=float, default=DEFAULT_MEMORY_GB, help="memory budget of a training step")
    parser.add_argument("--out", help="write the plan here as JSON")
    parser.add_argument("--cache", help="fingerprint cache (default: fingerprint.json beside --out, else none)")
    parser.add_argument("--axcodes", help="orientation (default RA in 2D, RAS in 3D)")
    parser.add_argument("--unlabelled-key", default="unlabeled")
    parser.add_argument("--max-unlabelled", type=int, default=MAX_UNLABELLED)
    parser.add_argument("--pixdim", type=float, nargs="+", help="keep this spacing")
    parser.add_argument("--roi-size", type=int, nargs="+", help="keep this patch")
    parser.add_argument("--modality", choices=("CT", "MR"))
    parser.add_argument("--normalisation", choices=NORMALISATION_KINDS, help="keep this normalisation kind")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--pretrain-batch-size", type=int)
    parser.add_argument("--unlabelled-batch-size", type=int)
    parser.add_argument("--measure-memory", action="store_true", help="re-measure the student's memory constants")
    args = parser.parse_args(argv)

    if args.measure_memory:
        for dims in [args.spatial_dims] if args.spatial_dims else [2, 3]:
            print(f"{dims}D student, peak memory of a training step:")
            model, _ = measure_memory(dims)
            print(f"    {dims}: {model!r},")
        return
    if not args.datalist:
        parser.error("--datalist is required (or --measure-memory)")
    cache = args.cache or (str(Path(args.out).parent / "fingerprint.json") if args.out else None)
    try:
        plan = make_plan(
            args.datalist,
            spatial_dims=args.spatial_dims or 2,
            memory_budget_gb=args.memory_gb,
            cache=cache,
            axcodes=args.axcodes,
            unlabelled_key=args.unlabelled_key,
            max_unlabelled=args.max_unlabelled,
            out=args.out,
            pixdim=args.pixdim,
            roi_size=args.roi_size,
            modality=args.modality,
            normalisation={"kind": args.normalisation} if args.normalisation else None,
            batch_size=args.batch_size,
            pretrain_batch_size=args.pretrain_batch_size,
            unlabelled_batch_size=args.unlabelled_batch_size,
        )
    except DatalistError as err:
        raise SystemExit(f"error: {err}") from None
    print(plan.describe())
    if args.out:
        print(f"plan written to {args.out}")


if __name__ == "__main__":
    main()
