"""Embedded dataset: deterministic synthetic "abdominal" phantoms in 2D or 3D, written as NIfTI.

Each case is a body section holding one target **organ** (class 1) with zero to two **lesions**
(class 2) inside it, plus unlabelled look-alikes: an elongated organ-like structure with the
organ's intensity, and lesion-like blobs outside the organ. Organ, look-alike and lesion
intensities overlap once the smooth bias field, partial-volume blur and noise are applied, so the
classes are separable only by shape and context, and label scarcity costs Dice.

The same seed and parameters give byte-identical files (nibabel writes gzip with mtime 0).
Run ``python -m custom.data.phantoms --help`` for the command line.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from custom.data.datalist import write_datalist

CLASS_NAMES = {"0": "background", "1": "organ", "2": "lesion"}
DATALIST_NAME = "datalist.json"


def embedded_classes() -> list[str]:
    """The phantoms' class names by label value, background first (their datalist's ``labels``)."""
    return [CLASS_NAMES[str(v)] for v in range(len(CLASS_NAMES))]


@dataclass
class PhantomConfig:
    """Parameters of the embedded dataset (documented in ``bundle/docs/README.md``)."""

    spatial_dims: int = 2
    #: image size in voxels; ``None`` picks 128x128 (2D) or 160x160x96 (3D: larger than train_3d.json's
    #: 96x96x64 roi_size, so training samples patches, as on clinical volumes)
    shape: tuple[int, ...] | None = None
    #: voxel size in mm; ``None`` picks 1x1 (2D) or 1.25x1.25x2.0 (3D, anisotropic)
    spacing: tuple[float, ...] | None = None
    num_train: int = 60
    num_validation: int = 8
    num_test: int = 16
    #: fraction of the training cases that keep their labels; the rest go to ``unlabeled``
    labelled_fraction: float = 0.1
    seed: int = 0
    #: standard deviation of the additive Gaussian noise (image intensities are about 0..1)
    noise_std: float = 0.06
    #: peak relative amplitude of the multiplicative smooth bias field
    bias_amplitude: float = 0.25
    #: probability that a case has no lesion at all
    p_no_lesion: float = 0.15

    def resolved(self) -> PhantomConfig:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}.")
        shape = self.shape or ((128, 128) if self.spatial_dims == 2 else (160, 160, 96))
        spacing = self.spacing or ((1.0, 1.0) if self.spatial_dims == 2 else (1.25, 1.25, 2.0))
        if len(shape) != self.spatial_dims or len(spacing) != self.spatial_dims:
            raise ValueError(f"shape {shape} and spacing {spacing} must have {self.spatial_dims} entries.")
        if any(int(n) != n or n < 8 for n in shape) or any(not s > 0 for s in spacing):
            raise ValueError(
                f"shape {tuple(shape)} needs whole sizes >= 8 and spacing {tuple(spacing)} positive values."
            )
        if not 0.0 < self.labelled_fraction <= 1.0:
            raise ValueError(f"labelled_fraction must be in (0, 1], got {self.labelled_fraction}.")
        if self.num_train < 1 or self.num_validation < 0 or self.num_test < 0:
            raise ValueError("num_train must be >= 1 and num_validation, num_test >= 0.")
        if round(self.labelled_fraction * self.num_train) < 1:
            raise ValueError(
                f"labelled_fraction {self.labelled_fraction:g} of {self.num_train} training cases leaves no labelled "
                f"case (use at least {1 / self.num_train:.3g})"
            )
        return PhantomConfig(**{**asdict(self), "shape": tuple(shape), "spacing": tuple(float(s) for s in spacing)})

    @property
    def num_labelled(self) -> int:
        return int(round(self.labelled_fraction * self.num_train))


def _random_rotation(rng: np.random.Generator, dims: int) -> np.ndarray:
    if dims == 2:
        a = rng.uniform(0, 2 * math.pi)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _blob(
    coords: np.ndarray, centre: np.ndarray, radii: np.ndarray, rng: np.random.Generator, wobble: float
) -> np.ndarray:
    """Deformed ellipsoid: a rotated ellipsoid whose radius varies smoothly with direction."""
    dims = len(centre)
    rot = _random_rotation(rng, dims)
    local = np.tensordot(rot.T, coords - centre.reshape((dims,) + (1,) * dims), axes=1)
    scaled = local / radii.reshape((dims,) + (1,) * dims)
    norm = np.sqrt((scaled**2).sum(0)) + 1e-6
    direction = scaled / norm
    modulation = np.ones_like(norm)
    for freq in (1, 2, 3):
        w = rng.normal(size=dims)
        w /= np.linalg.norm(w)
        proj = np.tensordot(w, direction, axes=1)
        modulation += rng.uniform(0, wobble / freq) * np.cos(math.pi * freq * proj + rng.uniform(0, 2 * math.pi))
    return norm <= modulation


def _bias_field(coords: np.ndarray, extent: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Smooth multiplicative field made of a few low-frequency cosines over the field of view."""
    dims = coords.shape[0]
    u = coords / extent.reshape((dims,) + (1,) * dims)
    field_ = np.zeros(coords.shape[1:])
    for _ in range(4):
        k = rng.uniform(0.3, 1.2, size=dims) * rng.choice([-1, 1], size=dims)
        field_ += np.cos(math.pi * np.tensordot(k, u, axes=1) + rng.uniform(0, 2 * math.pi))
    field_ /= np.abs(field_).max() + 1e-6
    return 1.0 + amplitude * field_


def make_case(cfg: PhantomConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: returns ``(image float32, label uint8)`` of shape ``cfg.shape``."""
    dims = cfg.spatial_dims
    shape = np.array(cfg.shape)
    spacing = np.array(cfg.spacing)
    extent = shape * spacing  # field of view in mm
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    coords = np.stack(grids).astype(np.float32)
    centre_fov = extent / 2

    label = np.zeros(cfg.shape, np.uint8)
    tissue = rng.uniform(0.36, 0.44)
    organ_mean = rng.uniform(0.52, 0.62)
    image = np.zeros(cfg.shape, np.float32)

    body = _blob(coords, centre_fov + rng.uniform(-0.03, 0.03, dims) * extent, extent * 0.46, rng, 0.08)
    image[body] = tissue

    # target organ: large, roundish, anywhere in the body
    organ_r = extent * rng.uniform(0.16, 0.26) * rng.uniform(0.8, 1.2, dims)
    organ_c = centre_fov + rng.uniform(-0.12, 0.12, dims) * extent
    organ = _blob(coords, organ_c, organ_r, rng, 0.25) & body

    # look-alike: elongated, smaller, same intensity as the organ, placed away from it
    mimic_r = extent * rng.uniform(0.05, 0.08) * np.array([rng.uniform(2.0, 2.8)] + [1.0] * (dims - 1))
    direction = rng.normal(size=dims)
    direction /= np.linalg.norm(direction)
    mimic_c = organ_c + direction * (organ_r.max() + mimic_r.max() * 0.8)
    mimic = _blob(coords, mimic_c, mimic_r, rng, 0.15) & body & ~organ
    image[mimic] = organ_mean + rng.normal(0, 0.02)

    texture = ndimage.gaussian_filter(rng.normal(0, 1, cfg.shape), 2.0 / spacing.mean())
    image[organ] = organ_mean + 0.03 * texture[organ] / (texture.std() + 1e-6)
    label[organ] = 1

    # lesions: inside the organ, hypo- or hyper-intense with low contrast
    n_lesions = 0 if rng.random() < cfg.p_no_lesion else int(rng.integers(1, 3))
    organ_idx = np.argwhere(organ)
    for _ in range(n_lesions):
        if len(organ_idx) == 0:
            break
        centre_vox = organ_idx[rng.integers(len(organ_idx))]
        les_r = extent.min() * rng.uniform(0.03, 0.08) * rng.uniform(0.8, 1.25, dims)
        lesion = _blob(coords, centre_vox * spacing, les_r, rng, 0.3) & organ
        contrast = rng.uniform(0.08, 0.2) * rng.choice([-1.0, 1.0])
        image[lesion] = organ_mean + contrast
        label[lesion] = 2

    # lesion mimics outside the organ: same look, not labelled (context decides)
    body_idx = np.argwhere(body & ~organ)
    for _ in range(int(rng.integers(1, 4))):
        centre_vox = body_idx[rng.integers(len(body_idx))]
        r = extent.min() * rng.uniform(0.03, 0.07) * rng.uniform(0.8, 1.25, dims)
        blob = _blob(coords, centre_vox * spacing, r, rng, 0.3) & body & ~organ
        image[blob] = organ_mean + rng.uniform(0.08, 0.2) * rng.choice([-1.0, 1.0])

    image = ndimage.gaussian_filter(image, 0.7 / spacing)  # partial-volume blur
    image *= _bias_field(coords, extent, rng, cfg.bias_amplitude)
    image += rng.normal(0, cfg.noise_std, cfg.shape)
    return image.astype(np.float32), label


def affine_for(cfg: PhantomConfig) -> np.ndarray:
    """RAS affine with the configured spacing (2D images get a 4x4 affine, as NIfTI stores)."""
    affine = np.eye(4)
    for i, s in enumerate(cfg.spacing):
        affine[i, i] = s
    return affine


def generate_dataset(out_dir: str | Path, cfg: PhantomConfig | None = None, **overrides) -> Path:
    """Write images, labels and a Decathlon-style datalist under ``out_dir``; return the datalist path.

    Datalist keys: ``training`` (labelled image/label pairs), ``unlabeled`` (images only; their hidden
    labels stay in ``labelsTr/`` for diagnostics), ``validation`` and ``test`` (image/label pairs).
    Paths in the datalist are relative to ``out_dir``.
    """
    cfg = (cfg or PhantomConfig(**overrides)).resolved()
    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    affine = affine_for(cfg)
    splits: dict[str, list[dict]] = {"training": [], "unlabeled": [], "validation": [], "test": []}
    order = [("train", cfg.num_train), ("val", cfg.num_validation), ("test", cfg.num_test)]
    index = 0
    for split, count in order:
        for i in range(count):
            rng = np.random.default_rng([cfg.seed, index])  # per-case stream: counts don't shift cases
            index += 1
            image, label = make_case(cfg, rng)
            name = f"{split}_{i:03d}.nii.gz"
            img_dir, lbl_dir = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
            nib.save(nib.Nifti1Image(image, affine), out / img_dir / name)
            nib.save(nib.Nifti1Image(label, affine), out / lbl_dir / name)
            pair = {"image": f"{img_dir}/{name}", "label": f"{lbl_dir}/{name}"}
            if split == "train":
                key = "training" if i < cfg.num_labelled else "unlabeled"
                splits[key].append(pair if key == "training" else {"image": pair["image"]})
            else:
                splits["validation" if split == "val" else "test"].append(pair)
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    datalist = {
        "name": f"UnCoL phantom {cfg.spatial_dims}D",
        "description": "Synthetic organ + lesion phantoms generated by custom.data.phantoms",
        "labels": CLASS_NAMES,
        "modality": {"0": "synthetic"},
        "tensorImageSize": f"{cfg.spatial_dims}D",
        "generator": params,
        "numTraining": len(splits["training"]),
        "numUnlabeled": len(splits["unlabeled"]),
        **splits,
    }
    return write_datalist(out, datalist, DATALIST_NAME)


def hidden_label_items(datalist: str | Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` (all: None) ``unlabeled`` images of a generated datalist with the label the
    generator kept for each (``imagesTr/x`` -> ``labelsTr/x``): ground truth training never sees, for
    audits of the pseudo-labels."""
    path = Path(datalist)
    items = []
    for entry in json.loads(path.read_text())["unlabeled"][:limit]:
        image = (path.parent / entry["image"]).resolve()
        items.append({"image": str(image), "label": str(image.parent.parent / "labelsTr" / image.name)})
    return items


def ensure_dataset(out_dir: str | Path, **params) -> Path:
    """Generate the embedded dataset unless ``out_dir`` already holds one made with the same parameters;
    invalid parameters end the run with one message (this is what configs call)."""
    try:
        cfg = PhantomConfig(**params).resolved()
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: embedded data in {out_dir}: {err}") from None
    path = Path(out_dir) / DATALIST_NAME
    wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    if path.is_file():
        try:
            if json.loads(path.read_text()).get("generator") == wanted:
                return path
        except json.JSONDecodeError:
            pass
    return generate_dataset(out_dir, cfg)


#: a dataset shaped like a user's rather than like the embedded phantoms (non-square or non-cubic
#: images of mixed sizes, 4 classes, relative paths): the own-data tests and examples train on it
OWN_DATA_LABELS = {"0": "background", "1": "gm", "2": "wm_a", "3": "wm_b"}
OWN_DATA_COUNTS = {"training": 6, "unlabeled": 24, "validation": 4, "test": 8}


def make_own_data_case(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An image with three structures (classes 1-3, largest to smallest) at random places, as
    overlapping intensity levels under a smooth bias field and Gaussian noise."""
    label = np.zeros(shape, np.uint8)
    grid = np.indices(shape).astype(np.float32)
    for value, radius in ((1, 0.32), (2, 0.2), (3, 0.12)):
        centre = [rng.uniform(0.3, 0.7) * s for s in shape]
        dist = np.sqrt(sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, shape, strict=True)))
        label[dist < radius * rng.uniform(0.8, 1.2)] = value
    bias = 1.0 + 0.2 * np.sin(grid[0] / shape[0] * np.pi * rng.uniform(0.5, 1.5))
    image = label.astype(np.float32) * 0.3 * bias + rng.normal(0, 0.08, shape).astype(np.float32)
    return image, label


def write_own_data_example(
    root: Path,
    shapes: list[tuple[int, ...]],
    spacing: tuple[float, ...],
    counts: dict[str, int] | None = None,
    seed: int = 7,
) -> Path:
    """A Decathlon-style dataset under ``root`` (``counts`` cases per split, sizes cycling through
    ``shapes``) with a datalist of relative paths and 4 ``labels``; returns the datalist path."""
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, *([1.0] * (4 - len(spacing)))])
    splits: dict[str, list] = {key: [] for key in OWN_DATA_COUNTS}
    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    index = 0
    for split, count in (counts or OWN_DATA_COUNTS).items():
        for _ in range(count):
            image, label = make_own_data_case(shapes[index % len(shapes)], rng)
            name = f"case_{index:03d}.nii.gz"
            nib.save(nib.Nifti1Image(image, affine), root / "images" / name)
            nib.save(nib.Nifti1Image(label, affine), root / "labels" / name)
            entry = {"image": f"images/{name}", "label": f"labels/{name}"}
            splits[split].append({"image": entry["image"]} if split == "unlabeled" else entry)
            index += 1
    path = root / "datalist.json"
    path.write_text(json.dumps({"name": "own data example", "labels": OWN_DATA_LABELS, **splits}, indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write images, labels and datalist.json into")
    parser.add_argument("--spatial-dims", type=int, default=2, choices=(2, 3))
    parser.add_argument("--shape", type=int, nargs="+", default=None)
    parser.add_argument("--spacing", type=float, nargs="+", default=None)
    parser.add_argument("--num-train", type=int, default=60)
    parser.add_argument("--num-validation", type=int, default=8)
    parser.add_argument("--num-test", type=int, default=16)
    parser.add_argument("--labelled-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = generate_dataset(
        args.out_dir,
        PhantomConfig(
            spatial_dims=args.spatial_dims,
            shape=tuple(args.shape) if args.shape else None,
            spacing=tuple(args.spacing) if args.spacing else None,
            num_train=args.num_train,
            num_validation=args.num_validation,
            num_test=args.num_test,
            labelled_fraction=args.labelled_fraction,
            seed=args.seed,
        ),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
