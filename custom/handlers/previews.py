"""PNG previews of inference results: a slice of each input with its segmentation overlaid and,
when asked, the student's entropy map beside it (where the model is unsure)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)

#: overlay colours of the first foreground classes (RGBA); :func:`class_colours` extends them
CLASS_COLOURS = [(1.0, 0.85, 0.1, 1.0), (0.9, 0.1, 0.1, 1.0), (0.1, 0.6, 1.0, 1.0), (0.2, 0.9, 0.3, 1.0)]


def class_colours(num_foreground: int) -> list[tuple[float, float, float, float]]:
    """One distinct overlay colour per foreground class, for any number of classes: the four above,
    then hues spread by the golden angle (no two classes share a colour)."""
    import colorsys

    colours = list(CLASS_COLOURS[:num_foreground])
    for k in range(len(colours), num_foreground):
        hue = (0.11 + 0.618034 * k) % 1.0
        colours.append((*colorsys.hsv_to_rgb(hue, 0.85, 0.95), 1.0))
    return colours


def _name(item: dict, key: str) -> str:
    meta = getattr(item[key], "meta", {}) or {}
    source = str(meta.get("filename_or_obj", "case"))
    base = Path(source.rstrip("/")).name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def _plane(x: np.ndarray, axis: int, index: int | None) -> np.ndarray:
    """``(*S)`` -> the 2D plane: the array itself in 2D, else slice ``index`` (middle) along ``axis``."""
    if x.ndim == 2:
        return x
    index = x.shape[axis] // 2 if index is None else min(max(index, 0), x.shape[axis] - 1)
    return np.take(x, index, axis=axis)


class SegmentationPreview:
    """Write ``<output_dir>/<case>_preview.png`` for every inferred case.

    Args:
        output_dir: folder of the PNGs.
        image_key: the input image in the engine's (decollated, post-processed) output; shown in the
            network's space, as the prediction is when ``pred_key`` is read before inversion.
        pred_key: class indices ``(1, *S)`` or class probabilities ``(C, *S)`` (argmaxed here).
        prob_key: class probabilities ``(C, *S)`` for the entropy panel; ``None``: no entropy panel.
        slice_index: 3D only, the slice along ``axis`` (default: the middle one).
        axis: 3D only, the spatial axis to slice (default: the last, axial for RAS volumes).
    """

    def __init__(
        self,
        output_dir: str | Path,
        image_key: str = "image",
        pred_key: str = "pred",
        prob_key: str | None = None,
        slice_index: int | None = None,
        axis: int = -1,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.pred_key = pred_key
        self.prob_key = prob_key
        self.slice_index = slice_index
        self.axis = axis
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in outputs:
            self.write(item)

    def write(self, item: dict) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        image = torch.as_tensor(item[self.image_key]).detach().cpu().float()[0].numpy()
        pred = torch.as_tensor(item[self.pred_key]).detach().cpu()
        labels = (pred.argmax(0) if pred.shape[0] > 1 else pred[0]).numpy().astype(int)
        if labels.shape != image.shape:
            raise ValueError(f"preview: image shape {image.shape} and prediction shape {labels.shape} differ")
        axis = self.axis % image.ndim
        planes = [_plane(image, axis, self.slice_index).T, _plane(labels, axis, self.slice_index).T]
        panels = 1
        if self.prob_key is not None:
            probs = torch.as_tensor(item[self.prob_key]).detach().cpu().float().clamp_min(1e-8)
            entropy = (-(probs * probs.log()).sum(0)).numpy()
            planes.append(_plane(entropy, axis, self.slice_index).T)
            panels = 2
            max_entropy = math.log(probs.shape[0])
        fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4.5), squeeze=False)
        ax = axes[0, 0]
        ax.imshow(planes[0], cmap="gray", origin="lower")
        n_fg = int(labels.max()) if labels.size else 0
        colours = [(0, 0, 0, 0), *class_colours(max(n_fg, 1))]
        ax.imshow(np.ma.masked_equal(planes[1], 0), cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1,
                  alpha=0.45, origin="lower", interpolation="nearest")  # fmt: skip
        ax.set_title("segmentation")
        ax.axis("off")
        if panels == 2:
            im = axes[0, 1].imshow(planes[2], cmap="magma", vmin=0.0, vmax=max_entropy, origin="lower")
            axes[0, 1].set_title("entropy (nats)")
            axes[0, 1].axis("off")
            fig.colorbar(im, ax=axes[0, 1], fraction=0.046)
        name = _name(item, self.pred_key)
        fig.suptitle(name)
        fig.tight_layout()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"{name}_preview.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        self.written.append(path)
        return path
