"""The generalized teacher's distillation targets as a MONAI transform, so MONAI caches them.

Placed after the deterministic preprocessing and before the random augmentation, the targets are
computed once per un-augmented image (CacheDataset keeps them in memory for the run; the teacher's
encoder cache keeps the encoder outputs on disk across runs), and spatial augmentations that act
the same on any grid (flips, 90-degree rotations) are applied to image, label and targets alike.
Targets are area-pooled to the student's token grid (input size / 16), which keeps them small.
"""

from __future__ import annotations

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom.losses.distillation import pool_to_grid
from custom.networks.student import PATCH_SIZE
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
    """

    def __init__(
        self,
        teacher: GeneralizedTeacher,
        keys: KeysCollection = "image",
        label_key: str = "label",
        prefix: str = "teacher_",
        with_fusion: bool = True,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__(keys)
        self.teacher = teacher
        self.label_key = label_key
        self.prefix = prefix
        self.with_fusion = with_fusion
        self.dtype = dtype

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).float()[None]
            label = torch.as_tensor(d[self.label_key])[None] if self.label_key in d else None
            grid = [s // PATCH_SIZE for s in image.shape[2:]]
            out = self.teacher(image, labels=label, with_fusion=self.with_fusion)
            for name, value in distillation_targets(out, grid).items():
                d[self.prefix + name] = value[0] if name == VALID_KEY else value[0].to(self.dtype)
        return d
