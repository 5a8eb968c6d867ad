"""Real labelled MRI benchmark: deep grey nuclei on 2D axial slices of Debian's ``mricron-data`` templates.

Two tasks, same classes (1 caudate, 2 lentiform nucleus = putamen + globus pallidus, 3 thalamus;
left and right merged):

- ``colin27``: the Colin27 single-subject human T1 (``ch2.nii.gz``, 181x217x181 at 1 mm) with the AAL
  atlas (``aal.nii.gz``); classes are chosen by the region names in ``aal.nii.txt``.
- ``macaque``: the INIA19 rhesus macaque T1 brain template (``inia19-t1-brain.nii.gz``, 168x206x128 at
  0.5 mm, kept at 0.5 mm) with its NeuroMaps label map. The package ships no names file for it; the
  names come from the INIA19 distribution's ``inia19-NeuroMaps.txt`` (read from ``--source`` when it
  is there, else from the table :data:`NEUROMAPS_NAMES` below) and are checked against the label map
  itself (hemisphere sides, presence, relative positions of the nuclei).

Every axial slice through the nuclei (plus a margin) becomes one 2D case on the native in-plane grid,
with mild Rician noise and a smooth bias field drawn per slice. Colin27: one contiguous slab of
slices is the test split, another the validation split; macaque: single evaluation slices
interleaved through the nuclei, alternately test and validation (its band where all three lie is
too short for two slabs and their gaps: see :data:`TASKS`). The slices next to every evaluation
slice (the task's ``gap_mm`` either side) are dropped, so no training slice is a near-copy of an
evaluation slice. The placement follows each class's pixel mass along z (:func:`plan_slices`), so
that the training pool keeps at least ``TRAIN_SHARE_MIN`` of every class's pixels, including slices
where the class is as large as in the test split. ``research/real_data.md`` describes the data,
the split rule, its licences and how to
train the bundle on it.

The same parameters and source files give byte-identical outputs. Run
``python -m research.data.real_brain --help`` for the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from custom.data.datalist import write_datalist

CLASS_NAMES = {"0": "background", "1": "caudate", "2": "lentiform", "3": "thalamus"}
DATALIST_NAME = "datalist.json"
PACKAGE = "mricron-data"
SYSTEM_TEMPLATES = Path("/usr/share/mricron/templates")
#: environment variable naming a folder with the templates (checked after an explicit ``source``)
SOURCE_ENV = "UNCOL_MRICRON_TEMPLATES"
#: bump when the preparation changes, so existing outputs are regenerated
FORMAT_VERSION = 4

#: slices are kept from the first to the last one holding a class, widened by this much either side
MARGIN_MM = 3.0
#: slices this close to a test or validation slice (either side) are used nowhere (at least one slice);
#: a task may set its own (``Task.gap_mm``)
GAP_MM = 1.0
#: a class counts as present in a slice from this area on (5 px at 1 mm, 20 px at 0.5 mm)
MIN_AREA_MM2 = 5.0
#: Rician noise: standard deviation of each quadrature channel, as a fraction of the white-matter level
NOISE_FRACTION = 0.03
#: peak relative amplitude of the smooth multiplicative bias field
BIAS_AMPLITUDE = 0.08
#: slab thicknesses, as fractions of the longest run of slices holding all classes (rounded half up)
TEST_FRACTION = 0.25
VALIDATION_FRACTION = 0.15
#: neither slab is thinner than this
MIN_SLAB_SLICES = 3
#: interleaved layout: training slices between the gaps of two neighbouring evaluation slices (with one
#: gap slice, two keep the pool's share of every class at TRAIN_SHARE_MIN), and the fewest slices in
#: each split
INTERLEAVED_TRAIN_SLICES = 2
MIN_INTERLEAVED_SLICES = 3
#: every class keeps at least this share of its pixels (over the kept slices) in the training pool
TRAIN_SHARE_MIN = 0.40
#: ... and at least LARGE_SLICES_MIN pool slices where it covers LARGE_FRACTION of its median test-slab area
LARGE_SLICES_MIN = 3
LARGE_FRACTION = 0.5
#: each slab holds every class's core: a median area of at least this fraction of the class's median
#: area over the kept slices that hold it
CORE_FRACTION = 0.5

#: NeuroMaps labels used here, left hemisphere, as named in the INIA19 distribution's
#: ``inia19-NeuroMaps.txt`` (``value name R G B A`` lines); the right hemisphere's twin of each is
#: ``value + 1000`` named ``r_<name>``. Only the structures this module selects are listed.
NEUROMAPS_NAMES = {
    82: "caudate_nucleus",
    98: "putamen",
    161: "lateral_medullary_lamina",
    162: "lateral_globus_pallidus",
    168: "medial_medullary_lamina",
    489: "inner_portion_of_the_medial_globus_pallidus",
    490: "outer_portion_of_the_medial_globus_pallidus",
    87: "external_medullary_lamina",
    92: "medial_pulvinar_nucleus",
    95: "inferior_pulvinar_nucleus",
    96: "lateral_pulvinar_nucleus",
    101: "reticular_nucleus_of_the_thalamus",
    116: "ventral_nucleus_of_the_medial_geniculate_body",
    117: "suprageniculate_nucleus",
    130: "lateral_geniculate_nucleus",
    134: "internal_medullary_lamina",
    136: "lateral_dorsal_nucleus",
    137: "oral_pulvinar_nucleus",
    152: "pregeniculate_nucleus",
    165: "anteroventral_nucleus_of_the_thalamus",
    177: "anteromedial_nucleus_of_the_thalamus",
    178: "anterodorsal_nucleus_of_the_thalamus",
    186: "medial_part_of_the_ventral_lateral_nucleus",
    273: "reuniens_nucleus",
    285: "ventral_posteroinferior_nucleus",
    287: "paracentral_nucleus",
    321: "parafascicular_nucleus",
    323: "principal_part_of_the_ventral_posteromedial_nucleus",
    324: "parvicellular_part_of_the_ventral_posteromedial_nucleus",
    325: "medial_dorsal_nucleus",
    326: "centromedian_nucleus",
    327: "central_lateral_nucleus",
    328: "subparafascicular_nucleus",
    433: "limitans_nucleus",
    497: "thalamus",
    499: "ventral_anterior_nucleus",
}


@dataclass(frozen=True)
class Task:
    """One benchmark task: which template files, how its atlas names regions, which regions make a class."""

    key: str
    image: str
    labels: str
    names_file: str
    #: class value -> region names without hemisphere (both hemispheres are taken)
    classes: dict[int, tuple[str, ...]]
    description: str
    #: (test, validation) slab thickness in slices; None: TEST_FRACTION / VALIDATION_FRACTION of the run
    slab_slices: tuple[int, int] | None = None
    #: weight of the validation share against the test share when placing the slabs
    validation_weight: float = 2.0
    #: "slabs": one contiguous test and one validation slab; "interleaved": single evaluation slices
    #: through the nuclei, ``INTERLEAVED_TRAIN_SLICES`` training slices between the gaps of two of
    #: them, alternately test and validation
    layout: str = "slabs"
    #: anatomy left out either side of an evaluation slice
    gap_mm: float = GAP_MM


TASKS = {
    "colin27": Task(
        key="colin27",
        image="ch2.nii.gz",
        labels="aal.nii.gz",
        names_file="aal.nii.txt",
        classes={1: ("Caudate",), 2: ("Putamen", "Pallidum"), 3: ("Thalamus",)},
        description="Colin27 human T1 (ch2) with AAL deep grey nuclei, axial 2D slices at 1 mm",
    ),
    "macaque": Task(
        key="macaque",
        image="inia19-t1-brain.nii.gz",
        labels="inia19-NeuroMaps.nii.gz",
        names_file="inia19-NeuroMaps.txt",
        classes={
            1: ("caudate_nucleus",),
            2: tuple(NEUROMAPS_NAMES[v] for v in (98, 161, 162, 168, 489, 490)),
            3: tuple(
                NEUROMAPS_NAMES[v]
                for v in (87, 92, 95, 96, 101, 116, 117, 130, 134, 136, 137, 152, 165, 177, 178, 186, 273)
                + (285, 287, 321, 323, 324, 325, 326, 327, 328, 433, 497, 499)
            ),
        },
        description="INIA19 rhesus macaque T1 with NeuroMaps deep grey nuclei, axial 2D slices at 0.5 mm",
        # the three nuclei overlap in one short axial band (k57-73, 8.5 mm; caudate large above it,
        # lentiform below): two 3-slice slabs and their gaps took 12 of its 17 slices, so training
        # never saw the held-out levels and full supervision lost them (results.md). Single evaluation
        # slices interleaved with training slices leave the pool every level of the band. The gap is
        # Colin27's 1 mm scaled to the brain: a rhesus brain is about 2.5 times smaller along each axis
        # (about 90 ml against 1,300), so 0.5 mm (one slice) here; the nearest training slice is 1 mm
        # away, about 2.5 mm of human anatomy (Colin27: 2 mm).
        layout="interleaved",
        gap_mm=0.5,
        validation_weight=1.0,
    ),
}
#: per-task stream index of the noise generator, so the two tasks never share noise
_TASK_STREAM = {"colin27": 0, "macaque": 1}


def _fail(message: str) -> SystemExit:
    return SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------------------------
# source files


def cache_dir() -> Path:
    """Where a fetched copy of the package's templates is kept (``$XDG_CACHE_HOME/uncol-monai/mricron-data``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "uncol-monai" / PACKAGE


def _run(command: list[str], cwd: str) -> None:
    """Run one step of fetching the package; a failure ends the run with one line saying what to do."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise _fail(f"cannot run {' '.join(command)} ({err}); pass --source DIR with the templates") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise _fail(
            f"{' '.join(command)} failed ({detail[-1] if detail else f'exit {done.returncode}'}); "
            f"install {PACKAGE} (apt-get install {PACKAGE}) or pass --source DIR with the templates"
        )


def fetch_templates(target: Path | None = None) -> Path:
    """Download ``mricron-data`` with ``apt-get download`` into a temporary folder, unpack it with
    ``dpkg -x`` and keep its templates (and the package's copyright file) under ``target``; return the
    templates folder. Ends the run with one ``error: ...`` line when that is not possible."""
    target = Path(target) if target is not None else cache_dir()
    templates = target / "templates"
    if (templates / TASKS["colin27"].image).is_file():
        return templates
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _run(["apt-get", "download", PACKAGE], tmp)
        except SystemExit:
            if os.geteuid() != 0:
                raise
            _run(["apt-get", "update", "-qq"], tmp)  # a new machine may have no package lists yet
            _run(["apt-get", "download", PACKAGE], tmp)
        debs = sorted(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise _fail(f"apt-get download {PACKAGE} left no .deb file in {tmp}")
        _run(["dpkg", "-x", str(debs[-1]), str(Path(tmp) / "x")], tmp)
        unpacked = Path(tmp) / "x" / "usr" / "share"
        if not (unpacked / "mricron" / "templates" / TASKS["colin27"].image).is_file():
            raise _fail(f"{debs[-1].name} holds no usr/share/mricron/templates/{TASKS['colin27'].image}")
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="templates.", dir=target))
        shutil.copytree(unpacked / "mricron" / "templates", staging, dirs_exist_ok=True)
        copyright_file = unpacked / "doc" / PACKAGE / "copyright"
        if copyright_file.is_file():
            shutil.copy(copyright_file, target / "copyright")
        (target / "package.txt").write_text(debs[-1].name + "\n")
        if templates.exists():
            shutil.rmtree(templates)
        staging.rename(templates)
    return templates


def resolve_source(source: str | Path | None, task: Task) -> Path:
    """The folder holding ``task``'s templates: ``source``, else ``$UNCOL_MRICRON_TEMPLATES``, else
    ``/usr/share/mricron/templates``, else the cached (fetched on first use) copy of the package."""
    if source is None:
        source = os.environ.get(SOURCE_ENV) or None
    if source is None:
        source = SYSTEM_TEMPLATES if (SYSTEM_TEMPLATES / task.image).is_file() else fetch_templates()
    source = Path(source)
    missing = [name for name in (task.image, task.labels) if not (source / name).is_file()]
    if task.key == "colin27" and not (source / task.names_file).is_file():
        missing.append(task.names_file)
    if missing:
        raise _fail(f"{source}: missing {', '.join(missing)} (the {PACKAGE} templates folder is needed)")
    return source


def package_version(source: Path) -> str | None:
    """The ``mricron-data`` version the templates come from, where it can be told."""
    marker = source.parent / "package.txt"
    if marker.is_file():
        parts = marker.read_text().strip().split("_")  # mricron-data_1.2.20211006+dfsg-4_all.deb
        return f"{parts[0]} {parts[1]}" if len(parts) == 3 else None
    if source.resolve() == SYSTEM_TEMPLATES.resolve():
        try:
            done = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", PACKAGE], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return f"{PACKAGE} {done.stdout.strip()}" if done.returncode == 0 and done.stdout.strip() else None
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# region names


def read_names(path: Path) -> dict[int, str]:
    """``value name ...`` lines (AAL's ``aal.nii.txt``, INIA19's ``inia19-NeuroMaps.txt``) -> {value: name}."""
    names: dict[int, str] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            names[int(parts[0])] = parts[1]
        except (ValueError, IndexError):
            raise _fail(f"{path}:{number}: expected 'value name ...', got {line.strip()!r}") from None
    return names


def _split_hemisphere(name: str) -> tuple[str, str] | None:
    """``Caudate_L`` / ``l_caudate_nucleus`` -> (``Caudate`` / ``caudate_nucleus``, ``L``); None if unsided."""
    if name.endswith(("_L", "_R")):
        return name[:-2], name[-1]
    if name.startswith(("l_", "r_")):
        return name[2:], name[0].upper()
    return None


def region_names(task: Task, source: Path) -> tuple[dict[int, str], str]:
    """{label value: region name} for ``task`` and where the names come from."""
    names_path = source / task.names_file
    if task.key == "colin27":
        return read_names(names_path), task.names_file
    builtin = {v: f"l_{n}" for v, n in NEUROMAPS_NAMES.items()}
    builtin |= {v + 1000: f"r_{n}" for v, n in NEUROMAPS_NAMES.items()}
    if not names_path.is_file():
        return builtin, "built-in table (from INIA19's inia19-NeuroMaps.txt)"
    names = read_names(names_path)
    wrong = {v: (n, names.get(v)) for v, n in builtin.items() if names.get(v) != n}
    if wrong:
        v, (want, got) = next(iter(wrong.items()))
        raise _fail(f"{names_path}: label {v} is {got!r}, expected {want!r} ({len(wrong)} labels disagree)")
    return names, task.names_file


def class_values(task: Task, names: dict[int, str]) -> dict[int, dict[str, list[int]]]:
    """{class: {"L": [label values], "R": [...]}} chosen by region name, both hemispheres required."""
    by_region: dict[str, dict[str, int]] = {}
    for value, name in names.items():
        sided = _split_hemisphere(name)
        if sided:
            by_region.setdefault(sided[0], {})[sided[1]] = value
    chosen: dict[int, dict[str, list[int]]] = {}
    for cls, regions in task.classes.items():
        chosen[cls] = {"L": [], "R": []}
        for region in regions:
            sides = by_region.get(region, {})
            if set(sides) != {"L", "R"}:
                raise _fail(f"{task.names_file}: no left and right '{region}' region (class {CLASS_NAMES[str(cls)]})")
            for side, value in sides.items():
                chosen[cls][side].append(value)
    return chosen


def check_anatomy(labels: np.ndarray, affine: np.ndarray, chosen: dict[int, dict[str, list[int]]]) -> dict:
    """Check that the chosen labels look like the nuclei they are named for (so a renumbered atlas or a
    wrong names file stops here): every region is in the volume, left-named ones lie left of the
    midline (RAS x < 0) and right-named ones right of it, the caudate is medial to the lentiform
    nucleus and the thalamus posterior to it. Returns per-class volumes and centroids (mm)."""
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    summary: dict = {}
    centroid: dict[tuple[int, str], np.ndarray] = {}
    for cls, sides in chosen.items():
        for side, values in sides.items():
            for value in values:
                if not (labels == value).any():
                    raise _fail(f"label {value} ({CLASS_NAMES[str(cls)]}, side {side}) is not in the atlas volume")
            mask = np.isin(labels, values)
            centre = nib.affines.apply_affine(affine, np.argwhere(mask).mean(0))
            if (centre[0] < 0) != (side == "L"):
                raise _fail(f"class {CLASS_NAMES[str(cls)]}: {side} regions lie at x = {centre[0]:.1f} mm (wrong side)")
            centroid[cls, side] = centre
            summary[f"{CLASS_NAMES[str(cls)]}_{side}"] = {
                "volume_mm3": round(float(mask.sum()) * voxel_mm3, 1),
                "centroid_mm": [round(float(c), 1) for c in centre],
            }
    for side in ("L", "R"):
        if abs(centroid[1, side][0]) >= abs(centroid[2, side][0]):
            raise _fail(f"side {side}: the caudate is not medial to the lentiform nucleus")
        if centroid[3, side][1] >= centroid[2, side][1]:
            raise _fail(f"side {side}: the thalamus is not posterior to the lentiform nucleus")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# slices and splits


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (start, stop) index pairs of the runs of True in a 1D bool array."""
    runs, start = [], None
    for i, flag in enumerate(list(flags) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def _slab_size(fraction: float, length: int) -> int:
    """``fraction`` of ``length`` slices, rounded half up, at least ``MIN_SLAB_SLICES``."""
    return max(MIN_SLAB_SLICES, int(math.floor(fraction * length + 0.5)))


def gap_slices(slice_mm: float, gap_mm: float = GAP_MM) -> int:
    """Slices either side of an evaluation slice left out: at least ``gap_mm`` of anatomy (for 1 mm:
    1 slice at 1 mm, 2 at 0.5 mm), at least one."""
    return max(1, math.ceil(gap_mm / slice_mm - 1e-6))


def _layout(lo: int, hi: int, test: list[int], validation: list[int], gap: int) -> tuple[list[int], list[int]]:
    """(gap slices, training pool) of the kept slices ``lo..hi`` once the evaluation slices are taken out."""
    held = set(test) | set(validation)
    near = {z + d for z in held for d in range(-gap, gap + 1)}
    gaps = sorted(z for z in near - held if lo <= z <= hi)
    pool = [z for z in range(lo, hi + 1) if z not in near]
    return gaps, pool


def plan_slices(
    area: np.ndarray,
    slice_mm: float,
    min_pixels: float,
    slab_slices: tuple[int, int] | None = None,
    validation_weight: float = 2.0,
    layout: str = "slabs",
    gap_mm: float = GAP_MM,
) -> dict:
    """Split axial slice indices into test, validation, gap and training pool by each class's pixel mass.

    ``area[z, k]``: pixels of class ``k + 1`` in slice ``z``; a class is present in a slice from
    ``min_pixels`` on. Slices from the first to the last one with any class present, widened by
    ``MARGIN_MM``, are kept; a class's share in a set of slices is its pixels there over its pixels in
    all kept slices. The test slab (``TEST_FRACTION`` of the longest run of slices holding all
    classes, at least ``MIN_SLAB_SLICES``) and the validation slab (``VALIDATION_FRACTION``), or
    ``slab_slices`` (test, validation) slices, are contiguous runs of slices each holding every class
    and each class's core (median area at least ``CORE_FRACTION`` of the class's median area over the
    kept slices that hold it), ``gap_slices`` apart at least; the slices
    within ``gap_slices`` of either slab are gaps, used nowhere; all other kept slices are the
    training pool. Of all such placements, those where every class keeps at least
    ``TRAIN_SHARE_MIN`` of its pixels in the training pool and at least ``LARGE_SLICES_MIN`` pool
    slices with ``LARGE_FRACTION`` of its median test-slab area are admissible; among them the one
    with the largest ``min(smallest class share in test, validation_weight * smallest class share in
    validation)`` is taken, ties going to the larger smallest training share, then to the lower slices.

    ``layout="interleaved"``: instead of two slabs, the evaluation slices are every
    ``2 * gap + 1 + INTERLEAVED_TRAIN_SLICES``-th slice (at each offset) among the slices holding any
    class, alternately test and validation (either first), so each has its gaps and training slices
    on either side and the splits sample every level of the nuclei (a class is scored on the slices
    that hold it); offsets and orders are ranked by the same constraints and key, with at least
    ``MIN_INTERLEAVED_SLICES`` slices in each split.
    """
    area = np.asarray(area, dtype=np.float64)
    present = area >= min_pixels
    nz = area.shape[0]
    any_class = np.flatnonzero(present.any(1))
    if len(any_class) == 0:
        raise _fail("no slice holds any of the classes")
    margin = int(round(MARGIN_MM / slice_mm))
    lo, hi = max(0, int(any_class[0]) - margin), min(nz - 1, int(any_class[-1]) + margin)
    every = present.all(1)
    runs = _runs(every)
    if not runs:
        raise _fail("no slice holds all classes, so a test slab cannot contain every class")
    f0, f1 = max(runs, key=lambda r: (r[1] - r[0], -r[0]))
    length = f1 - f0 + 1
    gap = gap_slices(slice_mm, gap_mm)
    n_test, n_val = slab_slices or (_slab_size(TEST_FRACTION, length), _slab_size(VALIDATION_FRACTION, length))
    total = area[lo : hi + 1].sum(0)
    core = CORE_FRACTION * np.array([np.median(col[col >= min_pixels]) for col in area[lo : hi + 1].T])

    def starts(n: int) -> list[int]:
        return [s for s in range(lo, hi - n + 2) if every[s : s + n].all()]

    def scored_median(zs: list[int]) -> np.ndarray:
        """Each class's median area over the slices of ``zs`` that hold it (where it is scored), 0 if none."""
        return np.array([np.median(a[a >= min_pixels]) if (a >= min_pixels).any() else 0.0 for a in area[zs].T])

    def candidates():
        """(test, validation) placements, lower slices first (the order ties are broken in)."""
        if layout == "interleaved":
            period = 2 * gap + 1 + INTERLEAVED_TRAIN_SLICES
            for offset in range(period):
                held = [z for z in range(lo, hi + 1) if present[z].any() and (z - lo) % period == offset]
                yield held[0::2], held[1::2]
                yield held[1::2], held[0::2]
            return
        for t0 in starts(n_test):
            for v0 in starts(n_val):
                if v0 >= t0 + n_test + gap or v0 + n_val + gap <= t0:
                    yield list(range(t0, t0 + n_test)), list(range(v0, v0 + n_val))

    fewest = MIN_INTERLEAVED_SLICES if layout == "interleaved" else MIN_SLAB_SLICES
    best = None
    for test, validation in candidates():
        if min(len(test), len(validation)) < fewest:
            continue
        test_share, test_median = area[test].sum(0) / total, scored_median(test)
        gaps, pool = _layout(lo, hi, test, validation, gap)
        train_share = area[pool].sum(0) / total
        large = LARGE_FRACTION * test_median
        if (train_share < TRAIN_SHARE_MIN).any() or ((area[pool] >= large).sum(0) < LARGE_SLICES_MIN).any():
            continue
        if (test_median < core).any() or (scored_median(validation) < core).any():
            continue
        val_share = area[validation].sum(0) / total
        key = (min(float(test_share.min()), validation_weight * float(val_share.min())), float(train_share.min()))
        if best is None or key > best[0]:
            best = (key, test, validation, gaps, pool)
    if best is None:
        what = (
            f"interleaved test and validation slices (at least {fewest} each"
            if layout == "interleaved"
            else f"a {n_test}-slice test and a {n_val}-slice validation slab (each slice with every class"
        )
        raise _fail(
            f"no placement of {what}, "
            f"{gap} gap slice{'s' if gap > 1 else ''} either side) leaves every class "
            f"{TRAIN_SHARE_MIN:.0%} of its pixels and "
            f"{LARGE_SLICES_MIN} large slices in training, and both evaluation splits every class's core"
        )
    (score, _), test, validation, gaps, pool = best
    return {
        "test": test,
        "validation": validation,
        "gap": gaps,
        "pool": pool,
        "used": [lo, hi],
        "all_classes": [[int(a), int(b)] for a, b in runs],
        "score": round(score, 4),
        "layout": layout,
        "gap_slices": gap,
    }


def split_stats(area: np.ndarray, splits: dict[str, list[int]], used: list[int], min_pixels: float) -> dict:
    """Per split: its slice count and, per class, the slices where the class is present (``min_pixels``
    on), its pixels, their share of the class's pixels in the kept slices ``used`` and the median
    area of the slices where it is present."""
    area = np.asarray(area, dtype=np.int64)
    total = area[used[0] : used[1] + 1].sum(0)
    stats: dict = {}
    for name, zs in splits.items():
        sub = area[sorted(zs)].reshape(len(zs), area.shape[1])
        entry: dict = {"slices": len(zs)}
        for k in range(area.shape[1]):
            col = sub[:, k]
            here = col[col >= min_pixels]
            entry[CLASS_NAMES[str(k + 1)]] = {
                "slices": int(len(here)),
                "pixels": int(col.sum()),
                "share": round(float(col.sum()) / float(total[k]), 4),
                "median_px": int(np.median(here)) if len(here) else 0,
            }
        stats[name] = entry
    return stats


def format_stats(stats: dict) -> str:
    """``split_stats`` as a text table: per split its slices; per class the slices holding it, its share
    of the class's pixels and its median area (px) in those slices."""
    classes = [CLASS_NAMES[str(k)] for k in range(1, len(CLASS_NAMES))]
    rows = [f"{'split':<11}{'slices':>6}" + "".join(f"  {c + ': slices  share  median':>30}" for c in classes)]
    for name, entry in stats.items():
        cells = "".join(
            f"  {entry[c]['slices']:>15} {100 * entry[c]['share']:>5.1f} % {entry[c]['median_px']:>7}" for c in classes
        )
        rows.append(f"{name:<11}{entry['slices']:>6}{cells}")
    return "\n".join(rows)


def choose_labelled(pool: list[int], present: np.ndarray, fraction: float, rng: np.random.Generator) -> list[int]:
    """``fraction`` of the training pool (at least 1 slice), spread evenly over the pool's slices that
    hold any class, with a seeded offset; a class none of them holds is brought in by swapping the
    pick nearest to a slice that holds it (when that loses no other class)."""
    n = max(1, int(round(fraction * len(pool))))
    candidates = [z for z in pool if present[z].any()] or list(pool)
    n = min(n, len(candidates))
    offset = rng.uniform(0, 1)
    picks = sorted({candidates[min(len(candidates) - 1, int((i + offset) * len(candidates) / n))] for i in range(n)})

    def covered(zs: list[int]) -> set[int]:
        return {k for z in zs for k in np.flatnonzero(present[z])}

    for k in range(present.shape[1]):
        if k in covered(picks):
            continue
        swaps = [
            (abs(c - p), c, p)
            for c in candidates
            if present[c, k] and c not in picks
            for p in picks
            if covered([q for q in picks if q != p] + [c]) >= covered(picks) | {k}
        ]
        if swaps:
            _, c, p = min(swaps)
            picks = sorted([q for q in picks if q != p] + [c])
    return picks


# ----------------------------------------------------------------------------------------------------------------
# images


def white_matter_level(image: np.ndarray, labels: np.ndarray) -> float:
    """Reference white-matter intensity: the 90th percentile of the template inside the atlas' brain
    mask (labelled voxels, closed and hole-filled, which adds the white matter AAL leaves unlabelled)."""
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(labels > 0, iterations=3))
    return float(np.percentile(image[brain], 90))


def bias_field(shape: tuple[int, int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Smooth multiplicative field ``1 + amplitude * f``, ``f`` in [-1, 1] from a few low-frequency cosines."""
    u = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"))
    field = np.zeros(shape)
    for _ in range(3):
        k = rng.uniform(0.3, 1.0, size=2) * rng.choice([-1, 1], size=2)
        field += np.cos(math.pi * np.tensordot(k, u, axes=1) + rng.uniform(0, 2 * math.pi))
    field /= np.abs(field).max() + 1e-9
    return 1.0 + amplitude * field


def degrade(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A slice (white matter at about 1.0) times a bias field, with Rician noise (magnitude of a complex
    signal with Gaussian noise of ``NOISE_FRACTION`` in each channel)."""
    signal = clean * bias_field(clean.shape, rng, BIAS_AMPLITUDE)
    real = signal + rng.normal(0, NOISE_FRACTION, clean.shape)
    imag = rng.normal(0, NOISE_FRACTION, clean.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def slice_affine(volume_affine: np.ndarray, z: int) -> np.ndarray:
    """4x4 affine of axial slice ``z`` as a 2D image: the volume's in-plane axes and spacing, and the
    slice's own position (its first voxel's world coordinates) as translation."""
    affine = np.array(volume_affine, dtype=float)
    affine[:3, 3] = nib.affines.apply_affine(volume_affine, [0, 0, z])
    return affine


def _save(data: np.ndarray, affine: np.ndarray, path: Path, descrip: str) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = descrip.encode()[:79]
    nib.save(img, path)


# ----------------------------------------------------------------------------------------------------------------
# dataset


def _generator(task: Task, labelled_fraction: float, seed: int, digests: dict[str, str]) -> dict:
    return {
        "task": task.key,
        "labelled_fraction": labelled_fraction,
        "seed": seed,
        "format_version": FORMAT_VERSION,
        "margin_mm": MARGIN_MM,
        "gap_mm": task.gap_mm,
        "layout": task.layout,
        "min_area_mm2": MIN_AREA_MM2,
        "noise_fraction": NOISE_FRACTION,
        "bias_amplitude": BIAS_AMPLITUDE,
        "test_fraction": TEST_FRACTION,
        "validation_fraction": VALIDATION_FRACTION,
        "min_slab_slices": MIN_SLAB_SLICES,
        "interleaved_train_slices": INTERLEAVED_TRAIN_SLICES,
        "min_interleaved_slices": MIN_INTERLEAVED_SLICES,
        "train_share_min": TRAIN_SHARE_MIN,
        "large_slices_min": LARGE_SLICES_MIN,
        "large_fraction": LARGE_FRACTION,
        "slab_slices": list(task.slab_slices) if task.slab_slices else None,
        "validation_weight": task.validation_weight,
        "core_fraction": CORE_FRACTION,
        "source_sha256": digests,
    }


def _remove_previous(out: Path) -> None:
    """Delete the files an earlier real_brain datalist in ``out`` names (and their hidden labels)."""
    path = out / DATALIST_NAME
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(old, dict) or "source_sha256" not in (old.get("generator") or {}):
        return
    for key in ("training", "unlabeled", "validation", "test"):
        for entry in old.get(key) or []:
            if not isinstance(entry, dict):
                continue
            hidden = str(entry.get("image", "")).replace("images", "labels")
            for rel in {entry.get("image"), entry.get("label"), hidden}:
                if rel and ".." not in Path(rel).parts and (out / rel).is_file():
                    (out / rel).unlink()


def _validate(task: str, labelled_fraction: float, seed: int) -> Task:
    if task not in TASKS:
        raise _fail(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not 0.0 < labelled_fraction <= 1.0:
        raise _fail(f"labelled_fraction must be in (0, 1], got {labelled_fraction}")
    if int(seed) != seed or seed < 0:
        raise _fail(f"seed must be a whole number >= 0, got {seed}")
    return TASKS[task]


def prepare(
    out_dir: str | Path,
    task: str = "colin27",
    source: str | Path | None = None,
    labelled_fraction: float = 0.1,
    seed: int = 0,
) -> Path:
    """Write ``task``'s 2D slices, labels and ``datalist.json`` under ``out_dir``; return the datalist path.

    Nothing is rewritten when ``out_dir`` already holds a datalist made with the same parameters from
    the same source files (compared by SHA-256). Datalist keys: ``training`` (labelled image/label
    pairs), ``unlabeled`` (images only; their hidden labels are in ``labelsTr/`` under the same name),
    ``validation`` and ``test`` (pairs; test files in ``imagesTs/``, ``labelsTs/``), ``labels``,
    ``name``, ``description``, ``generator`` (the parameters), ``slices`` (slice index of every case
    per split) and ``source``. Paths are relative to ``out_dir``.
    """
    spec = _validate(task, labelled_fraction, seed)
    src = resolve_source(source, spec)
    names, names_from = region_names(spec, src)
    digest_files = [spec.image, spec.labels] + ([spec.names_file] if (src / spec.names_file).is_file() else [])
    digests = {name: _sha256(src / name) for name in digest_files}
    wanted = _generator(spec, float(labelled_fraction), int(seed), digests)
    out = Path(out_dir)
    path = out / DATALIST_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            splits = ("training", "unlabeled", "validation", "test")
            files = [out / e[k] for s in splits for e in old[s] for k in e]
            if old.get("generator") == wanted and all(f.is_file() for f in files):
                return path
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    return _write(out, spec, src, names, names_from, wanted)


def _write(out: Path, spec: Task, src: Path, names: dict[int, str], names_from: str, generator: dict) -> Path:
    image_nii, label_nii = nib.load(src / spec.image), nib.load(src / spec.labels)
    affine = image_nii.affine
    if image_nii.shape != label_nii.shape or not np.allclose(affine, label_nii.affine, atol=1e-3):
        raise _fail(f"{spec.image} and {spec.labels} are not on the same grid")
    rotation = affine[:3, :3]
    if not (np.allclose(rotation, np.diag(np.diag(rotation))) and (np.diag(rotation) > 0).all()):
        raise _fail(f"{spec.image}: expected an axis-aligned RAS grid, got affine {affine.tolist()}")
    image = np.asanyarray(image_nii.dataobj).astype(np.float64)
    atlas = np.asanyarray(label_nii.dataobj).astype(np.int32)
    chosen = class_values(spec, names)
    anatomy = check_anatomy(atlas, affine, chosen)

    label = np.zeros(atlas.shape, np.uint8)
    for cls, sides in chosen.items():
        label[np.isin(atlas, sides["L"] + sides["R"])] = cls
    spacing = [float(s) for s in np.diag(rotation)]
    min_pixels = MIN_AREA_MM2 / (spacing[0] * spacing[1])
    area = np.stack([(label == c).sum((0, 1)) for c in sorted(chosen)], 1)
    present = area >= min_pixels
    plan = plan_slices(area, spacing[2], min_pixels, spec.slab_slices, spec.validation_weight, spec.layout, spec.gap_mm)
    seed = generator["seed"]
    labelled = choose_labelled(
        plan["pool"], present, generator["labelled_fraction"], np.random.default_rng([seed, _TASK_STREAM[spec.key], 0])
    )
    image /= white_matter_level(image, atlas)

    _remove_previous(out)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    prefix = {"colin27": "colin27", "macaque": "inia19"}[spec.key]
    splits: dict[str, list[dict]] = {"training": [], "unlabeled": [], "validation": [], "test": []}
    slices: dict[str, list[int]] = {key: [] for key in splits}
    membership = [("test", z) for z in plan["test"]] + [("validation", z) for z in plan["validation"]]
    membership += [("training" if z in labelled else "unlabeled", z) for z in plan["pool"]]
    for key, z in sorted(membership, key=lambda m: m[1]):
        rng = np.random.default_rng([seed, _TASK_STREAM[spec.key], 1, z])  # per-slice stream
        noisy = degrade(image[:, :, z], rng)
        name = f"{prefix}_z{z:03d}.nii.gz"
        img_dir, lbl_dir = ("imagesTs", "labelsTs") if key == "test" else ("imagesTr", "labelsTr")
        a = slice_affine(affine, z)
        _save(noisy, a, out / img_dir / name, f"UnCoL real_brain {spec.key} z={z} seed={seed}")
        _save(label[:, :, z], a, out / lbl_dir / name, f"UnCoL real_brain {spec.key} labels z={z}")
        entry = {"image": f"{img_dir}/{name}", "label": f"{lbl_dir}/{name}"}
        splits[key].append(entry if key != "unlabeled" else {"image": entry["image"]})
        slices[key].append(int(z))

    def span(zs: list[int]) -> list[int]:
        return [int(min(zs)), int(max(zs))] if zs else []

    def where(zs: list[int]) -> list[int]:
        """A slab as its first and last slice, interleaved slices one by one."""
        return span(zs) if spec.layout == "slabs" else [int(z) for z in zs]

    stats = split_stats(
        area,
        {
            "test": plan["test"],
            "validation": plan["validation"],
            "gap": plan["gap"],
            "pool": plan["pool"],
            "training": slices["training"],
            "unlabeled": slices["unlabeled"],
        },
        plan["used"],
        min_pixels,
    )

    datalist = {
        "name": f"UnCoL real brain nuclei 2D ({spec.key})",
        "description": (
            f"{spec.description}; classes by region name ({names_from}); {len(splits['test'])} test slices "
            f"z {where(plan['test'])}, {len(splits['validation'])} validation z {where(plan['validation'])}, "
            f"gap slices {plan['gap']} unused; Rician noise {NOISE_FRACTION:g} and bias field "
            f"{BIAS_AMPLITUDE:g} per slice. Made by research.data.real_brain from Debian's {PACKAGE} templates; "
            "see research/real_data.md for licences and attribution."
        ),
        "labels": CLASS_NAMES,
        "modality": {"0": "MRI T1"},
        "tensorImageSize": "2D",
        "generator": generator,
        "source": {
            "package": package_version(src) or PACKAGE,
            "image": spec.image,
            "labels": spec.labels,
            "names": names_from,
            "label_values": {CLASS_NAMES[str(c)]: sorted(s["L"] + s["R"]) for c, s in chosen.items()},
            "anatomy": anatomy,
            "spacing_mm": spacing,
            "shape": [int(n) for n in image.shape[:2]],
        },
        "slabs": {
            "used": plan["used"],
            "layout": plan["layout"],
            "test": where(plan["test"]),
            "validation": where(plan["validation"]),
            "gap": plan["gap"],
            "gap_slices": plan["gap_slices"],
            "slice_mm": spacing[2],
            "all_classes": plan["all_classes"],
            "score": plan["score"],
        },
        "split_stats": stats,
        "slices": slices,
        "numTraining": len(splits["training"]),
        "numUnlabeled": len(splits["unlabeled"]),
        **splits,
    }
    return write_datalist(out, datalist, DATALIST_NAME)


#: what a split record keeps of the datalist's ``source`` (no machine paths, no per-file lists)
RECORD_SOURCE = ("package", "image", "labels", "names", "anatomy", "spacing_mm", "shape")


def split_record(datalist: dict) -> dict:
    """The part of a prepared datalist that describes the split, as ``research/results/real/split_<task>.json``
    keeps it: the parameters and the source files' SHA-256 (``generator``), the source's anatomy, the
    slabs, each split's slice indices and ``split_stats``. research/real_data.md's tables are generated
    from it, and the tests check that a fresh preparation gives it again."""
    task = datalist["generator"]["task"]
    return {
        "command": f"python -m research.data.real_brain <out_dir> --task {task} "
        f"--record research/results/real/split_{task}.json",
        "generator": datalist["generator"],
        "source": {k: datalist["source"][k] for k in RECORD_SOURCE},
        "slabs": datalist["slabs"],
        "slices": datalist["slices"],
        "split_stats": datalist["split_stats"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write images, labels and datalist.json into")
    parser.add_argument("--task", choices=sorted(TASKS), default="colin27")
    parser.add_argument(
        "--source",
        default=None,
        help=f"folder with the {PACKAGE} templates (default: ${SOURCE_ENV}, {SYSTEM_TEMPLATES}, or fetch the package)",
    )
    parser.add_argument("--labelled-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", default=None, help="also write the split's record (split_record) here")
    args = parser.parse_args(argv)
    path = prepare(args.out_dir, args.task, args.source, args.labelled_fraction, args.seed)
    d = json.loads(path.read_text())
    if args.record:
        Path(args.record).write_text(json.dumps(split_record(d), indent=2) + "\n")
    counts = ", ".join(f"{k} {len(d[k])}" for k in ("training", "unlabeled", "validation", "test"))
    print(f"wrote {path} ({counts})")
    slabs = d["slabs"]
    print(f"test z {slabs['test']}, validation z {slabs['validation']}, gap {slabs['gap']}, kept z {slabs['used']}")
    print(format_stats(d["split_stats"]))


if __name__ == "__main__":
    main()
