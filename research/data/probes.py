"""Probe datasets shaped like users' data, for the plan-versus-defaults comparison (research/bench/plan_probe.py).

- ``ct2d``: CT-like 2D slices of 160x120 at 0.75 mm, a binary task (the organ, lesions included). The
  embedded phantoms' intensities are mapped monotonically onto Hounsfield units: air around the body at
  about -1000, soft tissue about 40, the organ 60-110, and a bone rim at about +900 around the body. A
  z-score over the whole image is dominated by air and bone; the soft-tissue contrast that separates the
  organ is a few per cent of it.
- ``aniso3d``: 3D volumes of 96x80x10 at 0.8x0.8x5 mm (thick slices, fewer than the bundle's default
  patch depth of 64), binary as well (the phantoms' lesions, 1.5-4 mm across, vanish between 5 mm slices).

Both write every training case labelled (``datalist_full.json``); :func:`split_datalist` then picks the
labelled subset of a split seed, so the labelled cases vary as well as the training seed. The same
arguments give byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from custom.data.phantoms import PhantomConfig, generate_dataset

#: phantom value of the soft tissue (custom.data.phantoms draws it from 0.36..0.44) and its HU
TISSUE_VALUE, TISSUE_HU = 0.4, 40.0
#: HU per phantom unit above the tissue level (organ 0.52-0.62 -> about 90-130 HU)
HU_PER_UNIT = 400.0
BONE_HU = 900.0
AIR_HU = -1000.0

PROBE_DATA = {
    "ct2d": {"spatial_dims": 2, "shape": (160, 120), "spacing": (0.75, 0.75), "num_train": 40},
    "aniso3d": {"spatial_dims": 3, "shape": (96, 80, 10), "spacing": (0.8, 0.8, 5.0), "num_train": 20},
}


def to_hounsfield(image: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Map a phantom image onto a CT-like Hounsfield scale (monotone below the bone rim it adds)."""
    below = AIR_HU + (image / TISSUE_VALUE) * (TISSUE_HU - AIR_HU)
    above = TISSUE_HU + (image - TISSUE_VALUE) * HU_PER_UNIT
    hu = np.where(image < TISSUE_VALUE, below, above)
    body = ndimage.binary_fill_holes(ndimage.gaussian_filter(image, 1.0) > TISSUE_VALUE / 2)
    rim_voxels = max(1, round(3.0 / min(spacing)))  # a 3 mm bone rim inside the body outline
    rim = body & ~ndimage.binary_erosion(body, iterations=rim_voxels)
    hu[rim] = BONE_HU + 0.1 * (hu[rim] - TISSUE_HU)
    return hu.astype(np.float32)


def write_probe(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write probe ``name`` (:data:`PROBE_DATA`) under ``out_dir``; returns ``datalist_full.json``."""
    spec = PROBE_DATA[name]
    out = Path(out_dir)
    full = out / "datalist_full.json"
    if full.is_file():
        return full
    cfg = PhantomConfig(
        spatial_dims=spec["spatial_dims"],
        shape=spec["shape"],
        spacing=spec["spacing"],
        num_train=spec["num_train"],
        num_validation=8 if spec["spatial_dims"] == 2 else 4,
        num_test=16 if spec["spatial_dims"] == 2 else 8,
        labelled_fraction=1.0,
        seed=seed,
    )
    datalist = json.loads(generate_dataset(out, cfg).read_text())
    entries = [e for split in ("training", "validation", "test") for e in datalist[split]]
    for entry in entries:
        if name == "ct2d":
            path = out / entry["image"]
            img = nib.load(path)
            nib.save(nib.Nifti1Image(to_hounsfield(np.asarray(img.dataobj), spec["spacing"]), img.affine), path)
        path = out / entry["label"]
        lab = nib.load(path)
        binary = (np.asarray(lab.dataobj) > 0).astype(np.uint8)  # the organ with its lesions
        nib.save(nib.Nifti1Image(binary, lab.affine), path)
    datalist["labels"] = {"0": "background", "1": "organ"}
    (out / "datalist.json").unlink()
    full.write_text(json.dumps(datalist, indent=2))
    return full


def split_datalist(full: str | Path, num_labelled: int, split_seed: int) -> Path:
    """A datalist beside ``full`` whose ``training`` holds ``num_labelled`` cases drawn by ``split_seed``,
    the other training cases moved to ``unlabeled`` (images only); validation and test unchanged."""
    full = Path(full)
    datalist = json.loads(full.read_text())
    pool = sorted(datalist["training"], key=lambda e: e["image"])
    chosen = set(np.random.default_rng([split_seed, 1]).choice(len(pool), num_labelled, replace=False).tolist())
    datalist["training"] = [e for i, e in enumerate(pool) if i in chosen]
    datalist["unlabeled"] = [{"image": e["image"]} for i, e in enumerate(pool) if i not in chosen]
    datalist["split_seed"] = split_seed
    path = full.with_name(f"datalist_split{split_seed}.json")
    path.write_text(json.dumps(datalist, indent=2))
    return path
