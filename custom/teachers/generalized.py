"""The generalized teacher: a frozen, promptable SAM-family foundation model.

For 2D images (or 3D volumes, slice by slice) plus per-class prompts it returns

1. ``features``: intermediate image-encoder features at the configured stage/block indices
   (the visual distillation path's targets), as ``(B, C_l, h_l, w_l)`` maps;
2. ``fusion``: the image tokens after the mask decoder's two-way transformer has attended to each
   class's prompt, ``(B, C, 256, h, w)`` (the semantic path's target; zeros where it abstains);
3. ``probs``: a ``(B, 1 + C, H, W)`` class-probability map on the input grid (stage 2's pseudo-labels).

The encoder sees the image resized so its longest side is the model's input size and padded
bottom/right to a square, so its maps cover that padded square. ``features`` and ``fusion`` are
cropped to the image's own region and resampled (exact area weights, the region's edge may fall
inside a map cell) so that they cover exactly the image, at about the encoder's resolution:
``(64, 64)`` for a square image with LiteMedSAM (returned unchanged), ``(64, 48)`` for a 64x48 one,
``(54, 64)`` for 176x208. Pooling them to the student's token grid therefore puts each target on
the tokens of the structure it describes. ``embedding`` stays the full padded map, which the mask
decoder needs.

``probs`` is composed from the per-class mask probabilities ``p_c`` in painter's order: starting
from certain background, classes are laid on from the largest predicted mask to the smallest, each
taking share ``p_c`` of what lies below, ``q <- (1 - p_c) q + p_c e_c``. The result sums to one and a
structure nested in another (a lesion in its organ) wins over its container.

Several prompts per class (``box_mode="component"``, one box per connected component, see
:mod:`custom.teachers.prompts`): every (image, class, component) prompt goes through the mask decoder
in the same batched call; a class's mask probability is the union of its components' masks, taken as
the elementwise maximum ``p_c = max_j p_cj``, and its fusion features are the mean over its prompted
components (each component's image tokens weigh the same, whatever its size).

Abstention: a class without a prompt (absent from the label map the prompts came from, or filtered
out) gets zero fusion features and its ``valid`` flag is False. What its probability becomes is
``abstain``:

- ``"zero"`` (default): ``p_c = 0``. Outside the prompted masks the teacher then reports near-certain
  background, also where the unprompted class may lie (low entropy: an entropy gate trusts it there).
- ``"uniform"``: the teacher claims nothing about an unprompted class. Outside the prompted masks
  (pixels where no prompted class's mask probability exceeds 0.5) the background probability of the
  painter's composition, ``q_0``, is shared equally between background and the ``U`` unprompted
  classes, ``q_0 / (1 + U)`` each (prompted classes keep their share): where ``q_0`` is near one that
  is the maximal entropy ``ln(1 + U)`` over the affected classes, so an entropy gate prefers the other
  teacher there. Inside a prompted mask nothing changes (the unprompted classes stay at 0). Near a
  mask's edge a prompted class with ``p_c > q_0 / (1 + U)`` becomes the argmax, so the teacher's hard
  mask reaches slightly further out (to ``p_c`` about ``1 / (2 + U)``) than with ``"zero"``.

An image (or slice) with no prompt at all gets the uniform distribution ``1 / (1 + C)`` everywhere
in either mode, the maximal entropy ``ln(1 + C)``, so an entropy gate always prefers the other teacher
there.

The teacher is frozen: eval mode for good, no parameter requires grad, and it computes under
``torch.inference_mode`` in float32 (never under CPU autocast: bf16 is many times slower there).
Outputs are cloned out of inference mode so losses may use them as targets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.profiler import record_function

from custom.teachers.cache import EncoderCache, fingerprint, image_key
from custom.teachers.foundation import build_foundation_model, file_sha256
from custom.teachers.mask_decoder import decode_masks
from custom.teachers.prompts import BOX_MODES, Prompts, prompts_from_labels

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

#: encoder stage/block indices whose outputs feed the visual path, per model
DEFAULT_FEATURE_INDICES = {
    "litemedsam": (1, 2, 3),
    "sam_vit_b": (2, 5, 8),
    "medsam": (2, 5, 8),
    "sam_vit_l": (5, 11, 17),
    "sam_vit_h": (7, 15, 23),
}

logger = logging.getLogger(__name__)


@dataclass
class TeacherOutput:
    features: dict[str, torch.Tensor]
    embedding: torch.Tensor
    probs: torch.Tensor
    valid: torch.Tensor
    fusion: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    #: the mask decoder's per-class logits before temperature, sigmoid and the painter's composition,
    #: ``(B, C, H, W)`` (2D) / ``(B, C, *S)``; ``-inf`` for an unprompted class
    mask_logits: torch.Tensor | None = None


ABSTAIN_MODES = ("zero", "uniform")


def mask_areas(mask_probs: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` sizes of ``(B, C, *S)`` masks that set the painter's order: pixels above 0.5, ties broken
    softly by the mean probability."""
    return (mask_probs > 0.5).flatten(2).sum(-1).float() + mask_probs.flatten(2).mean(-1)


def compose_class_probs(
    mask_probs: torch.Tensor, valid: torch.Tensor, abstain: str = "zero", areas: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, C, *S)`` per-class mask probabilities and ``(B, C)`` validity -> ``(B, 1 + C, *S)``.

    Painter's order composition (see module docstring); images with no valid class get the uniform map.
    ``abstain``: what an invalid class gets, ``"zero"`` probability or, outside the valid classes' masks,
    an equal share of the background's (``"uniform"``, see the module docstring). ``areas``: the
    :func:`mask_areas` that order the classes, when the masks are a window of larger ones (the order is
    the whole masks'); by default those of ``mask_probs``.
    """
    if abstain not in ABSTAIN_MODES:
        raise ValueError(f"abstain must be one of {ABSTAIN_MODES}, got {abstain!r}")
    b, c = mask_probs.shape[:2]
    spatial = mask_probs.shape[2:]
    out = torch.zeros((b, c + 1, *spatial), dtype=mask_probs.dtype, device=mask_probs.device)
    out[:, 0] = 1.0
    area = mask_areas(mask_probs) if areas is None else areas
    for i in range(b):
        order = [int(k) for k in torch.argsort(area[i], descending=True) if valid[i, k]]
        if not order:
            out[i] = 1.0 / (c + 1)
            continue
        for k in order:
            p = mask_probs[i, k]
            out[i] = out[i] * (1 - p)
            out[i, k + 1] += p
        if abstain == "uniform" and len(order) < c:
            _share_background(out[i], mask_probs[i], valid[i])
    return out


def _share_background(probs: torch.Tensor, mask_probs: torch.Tensor, valid: torch.Tensor) -> None:
    """In place, for one image: outside the valid classes' masks (``p_c > 0.5``) the background share is
    split equally between background and the invalid classes (``abstain="uniform"``)."""
    valid = valid.to(mask_probs.device)
    inside = (mask_probs[valid] > 0.5).any(0)
    unprompted = torch.nonzero(~valid, as_tuple=True)[0] + 1
    share = torch.where(inside, probs[0], probs[0] / (1 + len(unprompted)))
    probs[0] = share
    probs[unprompted] = torch.where(inside, probs[unprompted], share)


class GeneralizedTeacher(nn.Module):
    """Frozen SAM-family model wrapped for UnCoL (see module docstring).

    Args:
        model_name: ``litemedsam`` (default, packaged weights), ``sam_vit_b``, ``sam_vit_l``,
            ``sam_vit_h`` or ``medsam`` (official checkpoints by path).
        checkpoint: checkpoint file; optional for ``litemedsam``.
        num_classes: classes including background.
        feature_indices: encoder stages (TinyViT) or blocks (ViT) whose outputs are returned;
            ``None`` picks the model's default.
        prompt_type: ``box``, ``point`` or ``box+point``.
        box_jitter: fraction of the box size each edge may move when boxes come from labels.
        slice_axis: for 3D input ``(B, 1, X, Y, Z)``, the spatial axis (0, 1, 2) to slice along.
        slice_batch: images (2D images or slices of volumes) per encoder call and, in 3D, per teacher pass.
        cache_dir: folder of the encoder-output cache (image embeddings); ``None`` disables caching.
        seed: seed of the prompt jitter / point sampling generator.
        box_mode: ``class`` (one prompt per class, default) or ``component`` (one per 2D connected
            component of each class; see :mod:`custom.teachers.prompts`).
        min_component_size: component mode: components with fewer pixels get no prompt.
        max_components: component mode: at most this many prompts (the largest components) per class.
        prompt_min_confidence: when prompts are made from class probabilities, a region (class or
            component) gets a prompt only if its class's mean probability over it is at least this (0: off).
        abstain: an unprompted class's probability: ``zero`` (default) or ``uniform`` (outside the prompted
            masks it shares the background's probability equally; see the module docstring).
        cache_budget_gb: most gigabytes ``cache_dir`` may hold (least recently used entries go first;
            see :mod:`custom.teachers.cache`); ``None``: no limit.

    ``mask_temperature`` (1 here; a scalar or one value per foreground class) divides the mask decoder's
    logits before the sigmoid: :class:`~custom.handlers.calibration.TeacherCalibration` fits it.
    """

    def __init__(
        self,
        model_name: str = "litemedsam",
        checkpoint: str | Path | None = None,
        num_classes: int = 3,
        feature_indices: Sequence[int] | None = None,
        prompt_type: str = "box",
        box_jitter: float = 0.0,
        slice_axis: int = 2,
        slice_batch: int = 8,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        box_mode: str = "class",
        min_component_size: int = 4,
        max_components: int = 4,
        prompt_min_confidence: float = 0.0,
        abstain: str = "zero",
        cache_budget_gb: float | None = None,
    ) -> None:
        super().__init__()
        if prompt_type not in ("box", "point", "box+point"):
            raise ValueError(f"prompt_type must be 'box', 'point' or 'box+point', got {prompt_type!r}")
        if box_mode not in BOX_MODES:
            raise ValueError(f"box_mode must be one of {BOX_MODES}, got {box_mode!r}")
        if abstain not in ABSTAIN_MODES:
            raise ValueError(f"abstain must be one of {ABSTAIN_MODES}, got {abstain!r}")
        if max_components < 1:
            raise ValueError(f"max_components must be at least 1, got {max_components}")
        self.model, self.spec, self.checkpoint = build_foundation_model(model_name, checkpoint)
        self.model.requires_grad_(False)
        self.model.eval()
        self.num_classes = num_classes
        self.feature_indices = tuple(feature_indices or DEFAULT_FEATURE_INDICES[model_name])
        self.prompt_type = prompt_type
        self.box_jitter = box_jitter
        self.slice_axis = slice_axis
        self.slice_batch = slice_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.box_mode = box_mode
        self.min_component_size = min_component_size
        self.max_components = max_components
        self.prompt_min_confidence = prompt_min_confidence
        self.abstain = abstain
        self.mask_temperature: float | torch.Tensor = 1.0
        stages = getattr(self.model.image_encoder, self.spec.feature_modules)
        bad = [i for i in self.feature_indices if not 0 <= i < len(stages)]
        if bad:
            raise ValueError(f"feature_indices {bad} out of range for {model_name} ({len(stages)} stages/blocks)")
        self.cache: EncoderCache | None = None
        if cache_dir is not None:
            self.cache = EncoderCache(cache_dir, fingerprint(**self.encoder_identity), budget_gb=cache_budget_gb)
        self._captured: dict[str, torch.Tensor] = {}
        for i in self.feature_indices:
            stages[i].register_forward_hook(self._capture(f"enc{i}"))

    @property
    def encoder_identity(self) -> dict:
        """What the encoder's output depends on (the cache's namespace is its fingerprint)."""
        if not hasattr(self, "_encoder_identity"):
            self._encoder_identity = {
                "model": self.spec.name,
                "checkpoint_sha256": file_sha256(self.checkpoint),
                "image_size": self.spec.image_size,
                "normalization": self.spec.normalization,
            }
        return self._encoder_identity

    # -- frozen for good ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> GeneralizedTeacher:
        return super().train(False)

    @property
    def feature_names(self) -> list[str]:
        return [f"enc{i}" for i in self.feature_indices]

    @property
    def feature_channels(self) -> dict[str, int]:
        """Channels of each returned encoder feature, found once by a shape-only pass of the encoder: its
        weights swapped for meta tensors, so nothing is computed (a real pass costs seconds on a CPU, in
        every process that builds the projections; bundle/docs/teachers.md)."""
        if not hasattr(self, "_feature_channels"):
            encoder = self.model.image_encoder
            tensors = chain(encoder.named_parameters(), encoder.named_buffers())
            shapes_only = {name: torch.empty_like(t, device="meta") for name, t in tensors}
            blank = torch.empty(1, 3, self.spec.image_size, self.spec.image_size, device="meta")
            self._captured.clear()
            with torch.inference_mode():
                functional_call(encoder, shapes_only, (blank,))
            self._feature_channels = {k: self._as_map(self._captured[k]).shape[1] for k in self.feature_names}
            self._captured.clear()
        return self._feature_channels

    def _capture(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            self._captured[name] = output

        return hook

    # -- the model's input contract -------------------------------------------------------------
    def _resized_size(self, h: int, w: int) -> tuple[int, int]:
        scale = self.spec.image_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def crop_to_image(self, maps: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """``(..., h, w)`` maps over the encoder's padded square -> maps over the image's region only.

        An ``(H, W)`` image fills ``[0, nh / s) x [0, nw / s)`` of the padded ``s x s`` input (see
        :meth:`preprocess`), i.e. ``h * nh / s`` rows and ``w * nw / s`` columns of the map, fractional in
        general. That box is resampled onto ``round(h * nh / s) x round(w * nw / s)`` cells, each the exact
        area average of the map cells (or fractions of cells) it covers; an axis whose box is a whole
        number of cells is sliced. A square image's maps are returned unchanged.
        """
        size = self.spec.image_size
        nh, nw = self._resized_size(*image_hw)
        if (nh, nw) == (size, size):
            return maps
        h, w = maps.shape[-2:]
        extent_h, extent_w = h * nh / size, w * nw / size
        out_h, out_w = max(1, int(extent_h + 0.5)), max(1, int(extent_w + 0.5))
        if extent_h == out_h:
            maps = maps[..., :out_h, :]
        else:
            maps = _area_weights(extent_h, h, out_h).to(maps) @ maps
        if extent_w == out_w:
            maps = maps[..., :out_w]
        else:
            maps = maps @ _area_weights(extent_w, w, out_w).to(maps).T
        return maps

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 1 or 3, H, W)`` any intensities -> the encoder's normalised, resized, padded RGB input."""
        n, ch, h, w = images.shape
        x = images.float()
        lo = x.flatten(1).min(1).values.view(n, 1, 1, 1)
        hi = x.flatten(1).max(1).values.view(n, 1, 1, 1)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)  # per-image min-max to [0, 1]
        if ch == 1:
            x = x.expand(n, 3, h, w)
        if self.spec.normalization == "sam":
            mean = torch.tensor(SAM_PIXEL_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(SAM_PIXEL_STD, device=x.device).view(1, 3, 1, 1)
            x = (x * 255.0 - mean) / std
        nh, nw = self._resized_size(h, w)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False, antialias=nh < h)
        size = self.spec.image_size
        return F.pad(x, (0, size - nw, 0, size - nh))

    def postprocess(self, low_res: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Mask logits at the decoder's resolution -> logits on the original ``(H, W)`` grid."""
        s = self.spec.image_size
        # LiteMedSAM's masks already come at its input size (256); SAM's (256) are upsampled to 1024
        x = low_res
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, (s, s), mode="bilinear", align_corners=False)
        nh, nw = self._resized_size(*size)
        x = x[..., :nh, :nw]
        return F.interpolate(x, size, mode="bilinear", align_corners=False)

    # -- encoder (cached) -----------------------------------------------------------------------
    def _encode_uncached(self, images: torch.Tensor, features: bool = True) -> list[dict[str, torch.Tensor]]:
        """Encoder outputs per image, at most ``slice_batch`` images per encoder call (its activations
        are the teacher's memory peak)."""
        entries = []
        for start in range(0, len(images), self.slice_batch):
            self._captured.clear()
            embedding = self.model.image_encoder(self.preprocess(images[start : start + self.slice_batch]))
            feats = {name: self._as_map(self._captured[name]) for name in self.feature_names} if features else {}
            for j in range(len(embedding)):
                entries.append({"embedding": embedding[j], **{k: v[j] for k, v in feats.items()}})
        return entries

    @staticmethod
    def _as_map(x: torch.Tensor) -> torch.Tensor:
        """Encoder stage output -> ``(N, C, h, w)``: ViT blocks give ``(N, h, w, C)``, TinyViT ``(N, h*w, C)``."""
        if x.ndim == 4:
            return x.permute(0, 3, 1, 2)
        n, tokens, c = x.shape
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(f"cannot fold {tokens} tokens into a square grid")
        return x.transpose(1, 2).reshape(n, c, side, side)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, features: bool = True) -> dict[str, torch.Tensor]:
        """Image embedding (and, with ``features``, the intermediate encoder features) of ``(N, 1, H, W)``
        images; an image repeated in the batch (a volume's blank padding slices) is encoded once. The
        cache holds embeddings only (all the mask decoder reads): a call without features is served from
        it and fills it; one with features (stage 1's targets, which have their own cache) runs the
        encoder and rounds the embedding as the cache would, so that both calls agree."""
        keys = [image_key(img) for img in images]
        entries: list[dict | None] = [None] * len(images)
        if self.cache is not None and not features:
            entries = [self.cache.get(k) for k in keys]
        first = {keys[j]: j for j in reversed(range(len(keys))) if entries[j] is None}
        if first:
            unique = sorted(first.values())
            fresh = dict(zip(unique, self._encode_uncached(images[unique], features), strict=True))
            if self.cache is not None:
                for j, entry in fresh.items():
                    if features:  # not stored: the embedding rounded as the cache stores it
                        entry["embedding"] = entry["embedding"].to(self.cache.storage_dtype).float()
                    else:
                        fresh[j] = self.cache.put(keys[j], entry)
            for j in range(len(entries)):
                if entries[j] is None:
                    entries[j] = fresh[first[keys[j]]]
        device = images.device
        return {k: torch.stack([e[k] for e in entries]).to(device) for k in entries[0]}

    # -- prompts and mask decoder ---------------------------------------------------------------
    def make_prompts(self, labels: torch.Tensor) -> Prompts:
        """Prompts from ``(B, [1,] H, W)`` class indices or ``(B, K, H, W)`` one-hot maps / class
        probabilities (only probabilities let ``prompt_min_confidence`` filter anything)."""
        with record_function("teacher/prompts"):
            return prompts_from_labels(
                labels,
                self.num_classes,
                box_jitter=self.box_jitter,
                with_boxes="box" in self.prompt_type,
                with_points="point" in self.prompt_type,
                generator=self.generator,
                box_mode=self.box_mode,
                min_component_size=self.min_component_size,
                max_components=self.max_components,
                min_confidence=self.prompt_min_confidence,
            )

    @property
    def prompt_identity(self) -> dict | None:
        """What prompts made from a label depend on, or ``None`` where they are random (box jitter, points)."""
        if self.box_jitter > 0 or "point" in self.prompt_type:
            return None
        return {
            "num_classes": self.num_classes,
            "prompt_type": self.prompt_type,
            "box_mode": self.box_mode,
            "min_component_size": self.min_component_size,
            "max_components": self.max_components,
            "min_confidence": self.prompt_min_confidence,
        }

    def tempered(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """Mask probabilities ``sigmoid(logit / mask_temperature)`` of ``(B, C, *S)`` logits."""
        t = self.mask_temperature
        if isinstance(t, torch.Tensor):  # one temperature per foreground class
            t = t.to(mask_logits).view(1, -1, *[1] * (mask_logits.ndim - 2))
        return torch.sigmoid(mask_logits / t)

    @torch.inference_mode()
    def decode(
        self, embedding: torch.Tensor, prompts: Prompts, size: tuple[int, int], with_fusion: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-class mask probabilities ``(B, C, H, W)`` (:meth:`tempered` logits of :meth:`decode_logits`)
        and fusion features ``(B, C, 256, h, w)``."""
        mask_logits, fusion = self.decode_logits(embedding, prompts, size, with_fusion)
        return self.tempered(mask_logits), fusion

    @torch.inference_mode()
    def decode_logits(
        self, embedding: torch.Tensor, prompts: Prompts, size: tuple[int, int], with_fusion: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-class mask logits ``(B, C, H, W)`` (``-inf`` where a class has no prompt) and fusion
        features ``(B, C, 256, h, w)`` over the image's region (:meth:`crop_to_image`); every prompt of the
        batch (each valid (image, class), or each used (image, class, component) slot) goes through the
        mask decoder in one call. With several components a class's mask logit is their elementwise
        maximum (the sigmoid's order is the logits') and its fusion features their mean."""
        b, c = prompts.valid.shape
        h, w = size
        mask_logits = embedding.new_full((b, c, h, w), float("-inf"))
        fusion = embedding.new_zeros(b, c, *embedding.shape[1:]) if with_fusion else None
        index = tuple(i.to(embedding.device) for i in prompts.prompt_index())
        images, classes = index[:2]
        if images.numel() == 0:
            return mask_logits, None if fusion is None else self.crop_to_image(fusion, size)
        nh, nw = self._resized_size(h, w)
        scale = torch.tensor([nw / w, nh / h], device=embedding.device)
        boxes = None if prompts.boxes is None else prompts.boxes.to(embedding)[index] * scale.repeat(2)
        points = None
        if prompts.points is not None:
            coords = (prompts.points.to(embedding)[index] * scale)[:, None]
            points = (coords, torch.ones(len(images), 1, device=embedding.device))
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=None)
        pe = self.model.prompt_encoder.get_dense_pe()
        low_res, image_tokens = decode_masks(self.model.mask_decoder, embedding, pe, sparse, dense, images)
        logits = self.postprocess(low_res, size)[:, 0]
        tokens = None if fusion is None else image_tokens.transpose(1, 2).reshape(len(images), *embedding.shape[1:])
        if prompts.components is None:
            mask_logits[images, classes] = logits
            if fusion is not None:
                fusion[images, classes] = tokens
        else:  # union of each class's component masks, mean of their fusion features
            flat = images * c + classes
            per_pixel = flat[:, None].expand(-1, h * w)
            mask_logits.view(b * c, h * w).scatter_reduce_(0, per_pixel, logits.flatten(1), "amax")
            if fusion is not None:
                fusion.view(b * c, *fusion.shape[2:]).index_add_(0, flat, tokens)
                counts = torch.bincount(flat, minlength=b * c).clamp_min(1).to(fusion)
                fusion /= counts.view(b, c, *[1] * (fusion.ndim - 2))
        if fusion is not None:
            fusion = self.crop_to_image(fusion, size)
        return mask_logits, fusion

    # -- the whole teacher ----------------------------------------------------------------------
    def _forward_2d(
        self, images: torch.Tensor, prompts: Prompts, with_fusion: bool, with_features: bool = True
    ) -> TeacherOutput:
        size = tuple(images.shape[-2:])
        with record_function("teacher/encode"):
            enc = self.encode(images, features=with_features)
        embedding = enc.pop("embedding")
        with record_function("teacher/decode"):
            mask_logits, fusion = self.decode_logits(embedding, prompts, size, with_fusion)
        with record_function("teacher/compose"):
            probs = compose_class_probs(self.tempered(mask_logits), prompts.valid, self.abstain)
        return TeacherOutput(
            features={k: self.crop_to_image(v, size) for k, v in enc.items()},
            embedding=embedding,
            probs=probs,
            valid=prompts.valid,
            fusion=fusion,
            mask_logits=mask_logits,
        )

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        prompts: Prompts | None = None,
        with_fusion: bool = True,
        with_features: bool = True,
    ) -> TeacherOutput:
        """Run the teacher on ``(B, 1, H, W)`` images or ``(B, 1, X, Y, Z)`` volumes.

        Prompts come from ``prompts`` (2D only) or are made from ``labels`` (class indices, one-hot maps or
        class probabilities, same spatial shape as ``images``); with neither, the teacher abstains everywhere.
        ``with_fusion`` / ``with_features``: compute the fusion features / the intermediate encoder
        features (stage 1's targets); without features the encoder cache can serve the call.
        """
        no_cpu_autocast = torch.autocast("cpu", enabled=False) if images.device.type == "cpu" else nullcontext()
        with no_cpu_autocast, torch.inference_mode():
            if images.ndim == 4:
                if prompts is None:
                    prompts = self._prompts_or_abstain(labels, images)
                out = self._forward_2d(images, prompts, with_fusion, with_features)
            elif images.ndim == 5:
                if prompts is not None:
                    raise ValueError("3D input takes labels, from which per-slice prompts are made")
                out = self._forward_3d(images, labels, with_fusion, with_features)
            else:
                raise ValueError(f"expected (B, 1, H, W) or (B, 1, X, Y, Z) input, got {tuple(images.shape)}")
        return _clone_out_of_inference(out)

    def _prompts_or_abstain(self, labels: torch.Tensor | None, images: torch.Tensor) -> Prompts:
        if labels is not None:
            return self.make_prompts(labels)
        return Prompts(torch.zeros(len(images), self.num_classes - 1, dtype=torch.bool, device=images.device))

    def to_slices(self, volumes: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` -> ``(B * S, C, H, W)``: the 2D slices along ``slice_axis``, volume by volume."""
        slices = volumes.movedim(2 + self.slice_axis, 1)  # (B, S, C, H, W)
        return slices.reshape(-1, *slices.shape[2:])

    def from_slices(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """Inverse of :meth:`to_slices` for per-slice maps ``(B * S, ..., h, w)`` (the last two dims are
        the slice's spatial dims): the slice axis goes back among the spatial dims."""
        x = x.reshape(batch, -1, *x.shape[1:])
        return x.movedim(1, x.ndim - 3 + self.slice_axis)

    def _forward_3d(
        self, volumes: torch.Tensor, labels: torch.Tensor | None, with_fusion: bool, with_features: bool = True
    ) -> TeacherOutput:
        """Slice-wise along ``slice_axis``: slices are batched through the 2D path and restacked."""
        b = volumes.shape[0]
        flat = self.to_slices(volumes)
        flat_labels = None if labels is None else self.to_slices(labels)
        parts: list[TeacherOutput] = []
        for start in range(0, len(flat), self.slice_batch):
            chunk = flat[start : start + self.slice_batch]
            chunk_labels = None if flat_labels is None else flat_labels[start : start + self.slice_batch]
            prompts = self._prompts_or_abstain(chunk_labels, chunk)
            parts.append(self._forward_2d(chunk, prompts, with_fusion, with_features))

        def restack(tensors: list[torch.Tensor]) -> torch.Tensor:
            return self.from_slices(torch.cat(tensors), b)

        return TeacherOutput(
            features={k: restack([p.features[k] for p in parts]) for k in parts[0].features},
            embedding=restack([p.embedding for p in parts]),
            probs=restack([p.probs for p in parts]),
            valid=torch.cat([p.valid for p in parts]).reshape(b, len(flat) // b, -1),
            fusion=restack([p.fusion for p in parts]) if with_fusion else None,
            mask_logits=restack([p.mask_logits for p in parts]),
        )


def _area_weights(extent: float, n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` weights resampling the span ``[0, extent)`` of ``n_in`` unit cells onto ``n_out``
    equal cells: row ``i`` holds the overlap of output cell ``i`` with each input cell over its length
    (exact area averaging; rows sum to one)."""
    edges = torch.linspace(0.0, extent, n_out + 1, dtype=torch.float64)
    lo, hi = edges[:-1, None], edges[1:, None]
    cells = torch.arange(n_in, dtype=torch.float64)[None]
    overlap = (torch.minimum(hi, cells + 1) - torch.maximum(lo, cells)).clamp_min(0)
    return (overlap / (hi - lo)).float()


def _clone_out_of_inference(out: TeacherOutput) -> TeacherOutput:
    def clone(x):
        return None if x is None else x.clone()

    return TeacherOutput(
        features={k: v.clone() for k, v in out.features.items()},
        embedding=out.embedding.clone(),
        probs=out.probs.clone(),
        valid=out.valid.clone(),
        fusion=clone(out.fusion),
        mask_logits=clone(out.mask_logits),
    )
