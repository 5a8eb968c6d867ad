"""The generalized teacher's distillation targets as a MONAI transform, so MONAI caches them.

Placed after the deterministic preprocessing and before the random augmentation, the targets are
computed once per un-augmented image (CacheDataset keeps them in memory for the run), and spatial
augmentations that act the same on any grid (flips, 90-degree rotations) are applied to image, label
and targets alike. Targets are area-pooled to the student's token grid (input size / 16), which keeps
them small: that is also what goes to the teacher's disk cache (keyed by image and label), so a
later run on the same data (another seed, another arm of a sweep) reads them instead of encoding.
"""

from __future__ import annotations

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom.losses.distillation import pool_to_grid
from custom.networks.student import PATCH_SIZE
from custom.teachers.cache import EncoderCache, fingerprint, image_key
from custom.teachers.generalized import GeneralizedTeacher, TeacherOutput

FUSION_KEY = "fusion"
VALID_KEY = "valid"


def distillation_targets(out: TeacherOutput, grid: list[int]) -> dict[str, torch.Tensor]:
    """Teacher output for a batch -> ``{feature name: (B, C, *grid)}``, ``fusion`` as ``(B, K*D, *grid)``
    (class and channel dims folded, so spatial transforms see channel-first maps), and ``valid`` ``(B, K)``."""
    targets = {name: pool_to_grid(f, grid) for name, f in out.features.items()}
    if out.fusion is not None:
        b, k, d = out.fusion.shape[:3]
        targets[FUSION_KEY] = pool_to_grid(out.fusion.flatten(0, 1), grid).reshape(b, k * d, *grid)
    valid = out.valid
    targets[VALID_KEY] = valid if valid.ndim == 2 else valid.any(1)  # 3D: a class counts if any slice has it
    return targets


def unfold_fusion(fusion: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, K*D, *grid)`` -> ``(B, K, D, *grid)``."""
    b, kd = fusion.shape[:2]
    return fusion.reshape(b, num_classes, kd // num_classes, *fusion.shape[2:])


class TeacherTargetsd(MapTransform):
    """Add ``<prefix><feature>``, ``<prefix>fusion`` and ``<prefix>valid`` computed by the teacher
    from the image, prompted by the label (one box per present class).

    Args:
        teacher: the generalized teacher.
        keys: the image key.
        label_key: the label the prompts come from.
        prefix: prefix of the added keys.
        with_fusion: compute the fusion features (needed by the semantic path only).
        dtype: storage dtype of the added maps (float16 halves the memory of the cached dataset).
        disk_cache: keep the targets in the teacher's cache folder (when it has one and its prompts are
            deterministic: no box jitter, no sampled points).
    """

    def __init__(
        self,
        teacher: GeneralizedTeacher,
        keys: KeysCollection = "image",
        label_key: str = "label",
        prefix: str = "teacher_",
        with_fusion: bool = True,
        dtype: torch.dtype = torch.float16,
        disk_cache: bool = True,
    ) -> None:
        super().__init__(keys)
        self.teacher = teacher
        self.label_key = label_key
        self.prefix = prefix
        self.with_fusion = with_fusion
        self.dtype = dtype
        self.cache: EncoderCache | None = None
        encoder_cache, prompts = teacher.cache, teacher.prompt_identity
        if disk_cache and encoder_cache is not None and prompts is not None:
            namespace = fingerprint(
                kind="stage1_targets",
                **teacher.encoder_identity,
                **prompts,
                feature_indices=teacher.feature_indices,
                with_fusion=with_fusion,
                grid=PATCH_SIZE,
                slice_axis=teacher.slice_axis,
            )
            budget = encoder_cache.budget_bytes
            self.cache = EncoderCache(
                encoder_cache.directory, namespace, dtype, None if budget is None else budget / 1e9
            )

    def targets(self, image: torch.Tensor, label: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``{name: map}`` of one channel-first image (no batch dim), from the disk cache if possible."""
        key = None if self.cache is None else image_key(image, *([] if label is None else [label]))
        if key is not None and (hit := self.cache.get(key)) is not None:
            return hit
        fresh = self._computed(image, label)
        return fresh if key is None else self.cache.put(key, fresh)

    def _computed(self, image: torch.Tensor, label: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The targets of one image; a volume goes through the teacher one token-deep block of slices
        at a time (the full-resolution features of every slice at once would grow with the volume:
        about 13 MB a slice with LiteMedSAM before pooling), which gives the same maps, since the
        teacher sees each slice alone and each grid cell pools one block."""
        axis = 1 + self.teacher.slice_axis
        depth = image.shape[axis] if image.ndim == 4 else 0
        if depth > PATCH_SIZE and depth % PATCH_SIZE == 0:
            blocks = []
            for z in range(0, depth, PATCH_SIZE):
                block_label = None if label is None else label.narrow(axis, z, PATCH_SIZE)
                blocks.append(self._computed(image.narrow(axis, z, PATCH_SIZE), block_label))
            valid = torch.stack([b.pop(VALID_KEY) for b in blocks]).any(0)
            return {name: torch.cat([b[name] for b in blocks], axis) for name in blocks[0]} | {VALID_KEY: valid}
        grid = [s // PATCH_SIZE for s in image.shape[1:]]
        out = self.teacher(image[None], labels=None if label is None else label[None], with_fusion=self.with_fusion)
        return {name: value[0] for name, value in distillation_targets(out, grid).items()}

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).float()
            label = torch.as_tensor(d[self.label_key]) if self.label_key in d else None
            for name, value in self.targets(image, label).items():
                d[self.prefix + name] = value if name == VALID_KEY else value.to(self.dtype)
        return d
