"""Training patches of one size from images of any size, cut on the student's token grid.

Batches need samples of one shape; real images come in many shapes (rarely square or cubic). Each
training sample is padded to at least ``roi_size`` (MONAI's ``SpatialPadd``) and cropped to exactly
``roi_size`` here. The crop starts on a multiple of the student's patch size (16), so maps that live
on the token grid (the cached teacher targets of stage 1) are cut by the same box exactly. Samples
already of size ``roi_size`` pass unchanged (small datasets train on whole images).

Stage 2's generalized teacher sees 2D slices. Given only the patch, it would encode each slice's
patch-sized crop (3 x 3 in-plane tiles of a 160x160 slice are 9 encodings of one slice, each without
the anatomy around it). With ``context_key`` the crop also keeps the patch's *context*: the image cut
only along the slice axis (3D: the whole slices the patch spans) or not at all (2D: the whole image),
and where the patch starts in it, so the teacher can encode whole slices once and cut its masks to
the patch (:meth:`custom.engines.uncol.SemiSupervisedIteration.teacher_probs`). Contexts differ in
size between images: :class:`ContextCollate` batches them as a list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, list_data_collate
from monai.transforms import MapTransform, Randomizable

from custom.networks.student import PATCH_SIZE


def tile_starts(size: int, roi: int) -> list[int]:
    """Starts of the fixed tiles of length ``roi`` covering ``size`` voxels along one axis: ``0, roi,
    2 roi, ...`` and the last flush with the far edge (``RandGridCropd(tiles=True)`` draws among them)."""
    span = size - roi
    return list(range(0, span, roi)) + [span]


class RandGridCropd(Randomizable, MapTransform):
    """Crop ``keys`` to ``roi_size`` and ``grid_keys`` (maps at 1/``grid`` resolution) by the same box.

    Where the box goes:

    - ``label_key`` given: with probability ``pos / (pos + neg)`` it is centred (as far as the image
      allows) on a voxel of a foreground class drawn uniformly among the classes present, so small
      structures are seen as often as large ones (MONAI's class-balanced crops); else anywhere.
    - ``tiles`` True: at one of the fixed tiles that cover the image (starts ``0, roi, 2 roi, ...`` and
      the last flush with the far edge), so an image yields few distinct crops (stage 2's generalized
      teacher caches its output per distinct crop).
    - otherwise anywhere, on the grid.

    Args:
        keys: image-resolution keys to crop (image, label); the first one gives the spatial shape.
        roi_size: patch size, multiples of ``grid``.
        grid_keys: keys of maps on the token grid.
        label_key: class-index label steering the crop to foreground.
        pos: weight of foreground-centred crops.
        neg: weight of crops anywhere.
        tiles: crop at fixed tiles (see above).
        grid: the token size.
        allow_missing_keys: skip keys a sample lacks.
        context_key: also store the first key's context under this key (see the module docstring) and
            the crop's start (voxels, ``(D,)`` long) under ``<context_key>_start``; ``None``: off.
        context_axis: the axis (0-based, spatial) along which the context is cut like the patch: the
            teacher's slice axis. Ignored for 2D images, whose context is the whole image.
    """

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        grid_keys: KeysCollection = (),
        label_key: str | None = None,
        pos: float = 1.0,
        neg: float = 1.0,
        tiles: bool = False,
        grid: int = PATCH_SIZE,
        allow_missing_keys: bool = True,
        context_key: str | None = None,
        context_axis: int = 2,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.roi_size = tuple(int(r) for r in roi_size)
        if any(r <= 0 or r % grid for r in self.roi_size):
            raise ValueError(f"roi_size {list(self.roi_size)} must be positive multiples of {grid}")
        self.grid_keys = [grid_keys] if isinstance(grid_keys, str) else list(grid_keys)
        self.label_key = label_key
        self.pos_ratio = pos / (pos + neg) if pos + neg > 0 else 0.0
        self.tiles = tiles
        self.grid = grid
        self.context_key = context_key
        self.context_axis = context_axis
        self._start: tuple[int, ...] = ()

    def randomize(self, shape: Sequence[int], label: torch.Tensor | None = None) -> None:
        if self.tiles:
            self._start = tuple(
                int(self.R.choice(tile_starts(s, r))) for s, r in zip(shape, self.roi_size, strict=True)
            )
            return
        span = [s - r for s, r in zip(shape, self.roi_size, strict=True)]
        centre = self._foreground_voxel(label) if label is not None else None
        if centre is None:
            self._start = tuple(self.grid * int(self.R.randint(m // self.grid + 1)) for m in span)
            return
        self._start = tuple(
            self.grid * (min(max(c - r // 2, 0), m) // self.grid)
            for c, r, m in zip(centre, self.roi_size, span, strict=True)
        )

    def _foreground_voxel(self, label: torch.Tensor) -> tuple[int, ...] | None:
        if self.R.rand() >= self.pos_ratio:
            return None
        lbl = torch.as_tensor(label)[0]
        classes = [int(c) for c in torch.unique(lbl) if c > 0]
        if not classes:
            return None
        where = torch.nonzero(lbl == classes[self.R.randint(len(classes))])
        return tuple(int(v) for v in where[self.R.randint(len(where))])

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        first = next(self.key_iterator(d))
        shape = tuple(d[first].shape[1:])
        if shape == self.roi_size:
            self._start = (0,) * len(shape)
            self._keep_context(d, d[first])
            return d
        fits = len(shape) == len(self.roi_size) and all(
            s >= r and s % self.grid == 0 for s, r in zip(shape, self.roi_size, strict=True)
        )
        if not fits:
            raise ValueError(
                f"sample of spatial shape {list(shape)} cannot be cut to roi_size {list(self.roi_size)}: "
                f"pad it to at least roi_size and to a multiple of {self.grid} first"
            )
        self.randomize(shape, d.get(self.label_key) if self.label_key else None)
        box = tuple(slice(s, s + r) for s, r in zip(self._start, self.roi_size, strict=True))
        self._keep_context(d, d[first], box)
        for key in self.key_iterator(d):
            d[key] = d[key][(slice(None), *box)]
        cells = tuple(slice(b.start // self.grid, b.stop // self.grid) for b in box)
        for key in self.grid_keys:
            if key in d:
                d[key] = d[key][(slice(None), *cells)]
        return d

    def _keep_context(self, d: dict, image: torch.Tensor, box: tuple[slice, ...] | None = None) -> None:
        """Store ``image``'s context of the crop ``box`` (``None``: the whole image is the patch)."""
        if self.context_key is None:
            return
        # a plain tensor: the batch carries it as a list, and only the teacher reads it
        context = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        if box is not None and len(box) == 3:
            along = [slice(None)] * 3
            along[self.context_axis] = box[self.context_axis]
            context = context[(slice(None), *along)]
        d[self.context_key] = context
        d[f"{self.context_key}_start"] = torch.tensor(self._start, dtype=torch.long)

    @property
    def last_start(self) -> tuple[int, ...]:
        """Start of the last crop (voxels), for tests and logs."""
        return self._start


class ContextCollate:
    """``collate_fn`` for batches whose ``keys`` hold tensors of different shapes (crop contexts): those
    stay a list of the samples' tensors, everything else is collated by MONAI's ``list_data_collate``."""

    def __init__(self, keys: KeysCollection | None = ("image_context",)) -> None:
        self.keys = [keys] if isinstance(keys, str) else list(keys or ())

    def __call__(self, samples: list[dict]) -> dict:
        rest = [{k: v for k, v in s.items() if k not in self.keys} for s in samples]
        batch = list_data_collate(rest)
        for key in self.keys:
            if all(key in s for s in samples):
                batch[key] = [s[key] for s in samples]
        return batch
