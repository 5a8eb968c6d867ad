"""Fill the generalized teacher's encoder cache before stage 2's first step, with a progress bar.

Without it the first epoch pays for every image the teacher has not seen yet, silently: a 3D dataset
can spend hours there on CPU (every distinct slice is one encoder pass; bundle/docs/teachers.md, teacher
cache).
:class:`TeacherCacheWarmUp` goes through the unlabelled images once, after the same deterministic
preprocessing as training, cuts each one into the fixed tiles its random crops are drawn from
(``RandGridCropd(tiles=True)``; in 3D only the in-plane tiles matter, since the teacher sees slices),
and encodes every slice crop the cache lacks. With ``whole_slices`` (stage 2 gives the teacher each
patch's whole slices, ``RandGridCropd(context_key=...)``) it encodes every whole slice (2D: image)
instead, once, whichever tiles are drawn from it. Training then starts with a warm cache, and what the
warm-up cost is logged once. Under torchrun each rank takes its share of the images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from itertools import product

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from tqdm import tqdm

from custom.data.crops import tile_starts
from custom.teachers.cache import image_key
from custom.teachers.generalized import GeneralizedTeacher

logger = logging.getLogger(__name__)


class TeacherCacheWarmUp:
    """Encode every distinct unlabelled slice crop into the generalized teacher's cache at ``STARTED``.

    Args:
        teacher: stage 2's generalized teacher (``None``, or one without a cache: nothing to do).
        datalist: the unlabelled items (``{"image": path}``).
        transform: the deterministic preprocessing of the unlabelled stream (it must end where the
            random crop starts, so that the crops and the cache keys are the ones training makes).
        roi_size: the training patch size.
        whole_slices: encode whole slices (2D: whole images) rather than tile crops.
        enabled: ``False`` leaves the cache to fill during the first epoch.
        progress: show a progress bar (rank 0 only).
    """

    def __init__(
        self,
        teacher: GeneralizedTeacher | None,
        datalist: Sequence[dict],
        transform: Callable[[dict], dict],
        roi_size: Sequence[int],
        whole_slices: bool = False,
        enabled: bool = True,
        progress: bool = True,
    ) -> None:
        self.teacher = teacher
        self.datalist = list(datalist)
        self.transform = transform
        self.roi_size = tuple(int(r) for r in roi_size)
        self.whole_slices = whole_slices
        self.enabled = enabled
        self.progress = progress
        self.summary: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def crops(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The fixed-tile crops of one ``(C, *spatial)`` image as the teacher sees them: ``(N, C, H, W)``
        slices (2D: one per tile; 3D: every slice of each in-plane tile, along the teacher's slice axis);
        with ``whole_slices`` one entry, the whole image or all of the volume's slices."""
        spatial = image.shape[1:]
        if len(spatial) != len(self.roi_size):
            raise ValueError(f"unlabelled image of spatial shape {list(spatial)} for roi_size {list(self.roi_size)}")
        volume = len(spatial) == 3
        if self.whole_slices:
            return [self.teacher.to_slices(image[None]) if volume else image[None]]
        axes_starts = []
        for axis, (size, roi) in enumerate(zip(spatial, self.roi_size, strict=True)):
            if volume and axis == self.teacher.slice_axis:
                axes_starts.append([None])  # every slice: the crop along this axis only picks some of them
            else:
                axes_starts.append(tile_starts(size, roi))
        out = []
        for starts in product(*axes_starts):
            box = tuple(
                slice(None) if s is None else slice(s, s + r) for s, r in zip(starts, self.roi_size, strict=True)
            )
            crop = image[(slice(None), *box)]
            out.append(self.teacher.to_slices(crop[None]) if volume else crop[None])
        return out

    def __call__(self, engine: Engine) -> None:
        teacher = self.teacher
        if not self.enabled or teacher is None or teacher.cache is None:
            return
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        items = self.datalist[rank::world]
        device = next(teacher.parameters()).device
        seen: set[str] = set()
        cached = encoded = 0
        start = time.perf_counter()
        bar = tqdm(items, desc="teacher cache warm-up", unit="image", disable=not self.progress or rank != 0)
        for item in bar:
            image = self.transform(dict(item))["image"]
            image = (image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)).float()
            for slices in self.crops(image):
                keys = [image_key(s) for s in slices]
                new = [j for j, k in enumerate(keys) if k not in seen]
                seen.update(keys)
                todo = [j for j in new if keys[j] not in teacher.cache]
                cached += len(new) - len(todo)
                for k in range(0, len(todo), teacher.slice_batch):
                    chunk = todo[k : k + teacher.slice_batch]
                    teacher.encode(slices[chunk].to(device), features=False)
                    encoded += len(chunk)
            bar.set_postfix(encoded=encoded, cached=cached)
        seconds = time.perf_counter() - start
        self.summary = {"images": len(items), "slice_crops": len(seen), "cached": cached, "encoded": encoded}
        self.summary |= {"seconds": round(seconds, 1), "cache_gb": round(teacher.cache.size_bytes / 1e9, 3)}
        per_slice = f" ({seconds / encoded:.2f} s per encoded crop)" if encoded else ""
        logger.info(
            f"teacher cache warm-up: {len(items)} unlabelled images, {len(seen)} distinct slice crops, "
            f"{cached} already cached, {encoded} encoded in {seconds:.0f} s{per_slice}; "
            f"{teacher.cache.directory} holds {teacher.cache.size_bytes / 1e9:.2f} GB"
        )
