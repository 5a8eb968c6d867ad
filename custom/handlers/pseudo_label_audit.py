"""Audit stage 2's pseudo-labels against ground truth the training never sees.

On the embedded data the unlabelled images keep hidden labels (``labelsTr/``), so what the entropy
gate claims can be measured: are the voxels it keeps more often right than the ones it rejects, how
right is each teacher where it supplies the label, and how often are both teachers confidently wrong
(the case no entropy gate can catch). ``diagnostics.json`` (layered on ``train.json``) wires it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from custom.losses.pseudo_label import shannon_entropy

logger = logging.getLogger(__name__)


def _accuracy(pred: torch.Tensor, truth: torch.Tensor, weight: torch.Tensor) -> float | None:
    """Share of ``pred`` equal to ``truth``, each voxel counted by ``weight`` (a mask or the soft gate's
    weights); None where nothing is weighted."""
    weight = weight.float()
    total = float(weight.sum())
    return float(((pred == truth).float() * weight).sum()) / total if total > 0 else None


def soft_gate_confidence(probs: torch.Tensor) -> float:
    """The entropy under which the soft gate (weight 1 - H / ln C) gives a voxel more than half its weight:
    what "confident" means for its audit."""
    return 0.5 * math.log(probs.shape[1])


def audit_pseudo_labels(
    spec: torch.Tensor | None, gen: torch.Tensor | None, gated, truth: torch.Tensor, threshold: float
) -> dict[str, float | None]:
    """Scores of one gate decision ``gated`` (a :class:`~custom.losses.pseudo_label.GateResult`) made
    from class probabilities ``spec``/``gen`` ``(B, C, *S)``, against class indices ``truth`` ``(B, *S)``.

    ``*_fg`` scores count only voxels where the truth or the pseudo-label is foreground (the background
    otherwise dominates every accuracy). ``both_confidently_wrong`` is the fraction of voxels where both
    teachers are under the threshold and both wrong. Under the soft gate a voxel is kept by its weight and
    rejected by the rest (a hard gate's weights are 0 or 1), so ``kept`` is the mean weight.
    """
    pseudo = gated.pseudo_label.reshape(truth.shape)
    kept = gated.mask.reshape(truth.shape).float()
    rejected = 1.0 - kept
    fg = (truth > 0) | (pseudo > 0)
    out: dict[str, float | None] = {
        "threshold": threshold,
        "kept": float(kept.mean()),
        "kept_accuracy": _accuracy(pseudo, truth, kept),
        "rejected_accuracy": _accuracy(pseudo, truth, rejected),
        "kept_accuracy_fg": _accuracy(pseudo, truth, kept * fg),
        "rejected_accuracy_fg": _accuracy(pseudo, truth, rejected * fg),
    }
    from_gen = gated.from_generalized.reshape(truth.shape).bool()
    confident_wrong = []
    for name, probs, supplied in (("specialized", spec, ~from_gen), ("generalized", gen, from_gen)):
        if probs is None:
            continue
        pred = probs.argmax(1)
        confident = shannon_entropy(probs)[:, 0] < threshold
        teacher_fg = (truth > 0) | (pred > 0)
        out[f"{name}_accuracy_fg"] = _accuracy(pred, truth, teacher_fg)
        out[f"{name}_supplied_accuracy_fg"] = _accuracy(pred, truth, kept * (supplied & teacher_fg))
        out[f"{name}_confident_accuracy_fg"] = _accuracy(pred, truth, confident & teacher_fg)
        confident_wrong.append(confident & (pred != truth))
    if len(confident_wrong) == 2:
        both = confident_wrong[0] & confident_wrong[1]
        out["both_confidently_wrong"] = float(both.float().mean())
        out["both_confidently_wrong_fg"] = float((both & fg).sum() / fg.sum().clamp_min(1))
    return out


def load_cases(items: Sequence[dict], transform: Callable[[dict], dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 1, *S), labels (N, 1, *S))`` of image/label ``items`` after ``transform`` (the
    deterministic preprocessing the teachers' view gets; the images must come out the same size)."""
    cases = [transform(dict(item)) for item in items]
    images = torch.stack([torch.as_tensor(c["image"]).float() for c in cases])
    return images, torch.stack([torch.as_tensor(c["label"]) for c in cases])


class PseudoLabelAudit:
    """Every ``interval`` iterations, run stage 2's teachers and gate on a fixed set of unlabelled images
    and score them against their hidden labels; the records go to ``output_file`` (JSON lines) and
    ``self.records``. Training is unaffected: the audit uses no randomness and changes no counters.

    A record's ``threshold`` is the entropy under which a teacher counts as confident: the entropy
    gate's threshold, under the quantile gate the largest entropy it kept (its ``keep_fraction``
    is recorded too), under the soft gate the entropy of weight one half (:func:`soft_gate_confidence`).

    Args:
        iteration: the :class:`~custom.engines.uncol.SemiSupervisedIteration` being trained.
        images: ``(N, 1, *S)`` unlabelled images, preprocessed as the teachers' (weak) view.
        labels: ``(N, 1, *S)`` or ``(N, *S)`` their hidden class indices.
        interval: iterations between audits (also run once at the end).
        output_file: JSON-lines file; ``None`` keeps the records in memory only.
    """

    def __init__(
        self,
        iteration,
        images: torch.Tensor,
        labels: torch.Tensor,
        interval: int = 50,
        output_file: str | Path | None = None,
    ) -> None:
        self.iteration = iteration
        self.images = images
        self.labels = labels[:, 0] if labels.ndim == images.ndim else labels
        self.interval = interval
        self.output_file = Path(output_file) if output_file is not None else None
        self.records: list[dict] = []

    @classmethod
    def of_items(
        cls,
        iteration,
        items: Sequence[dict],
        transform: Callable[[dict], dict],
        interval: int = 50,
        output_file: str | Path | None = None,
    ) -> PseudoLabelAudit:
        """The audit of image/label ``items`` (:func:`load_cases`), as configs build it."""
        images, labels = load_cases(items, transform)
        return cls(iteration, images, labels, interval, output_file)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        if self.records and self.records[-1]["iteration"] == engine.state.iteration:
            return  # the last interval coincided with the end
        it = self.iteration
        spec, gen, gated = it.pseudo_labels(self.images.to(engine.state.device), engine)
        record: dict = {"iteration": engine.state.iteration}
        if it.gate_schedule == "keep_fraction":
            record["keep_fraction"] = it.gate_level(engine)
            threshold = float(gated.entropy[gated.mask.bool()].max()) if gated.mask.any() else 0.0
        elif it.gate.gate == "soft":
            threshold = soft_gate_confidence(spec if spec is not None else gen)
        else:
            threshold = it.gate_level(engine)
        labels = self.labels.to(engine.state.device).long()
        record.update(audit_pseudo_labels(spec, gen, gated, labels, threshold))
        self.records.append(record)
        if self.output_file is not None:
            self.output_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.output_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        logger.info(
            "pseudo-label audit at iteration %d: kept %.3f, accuracy on kept / rejected foreground %s / %s",
            engine.state.iteration,
            record["kept"],
            record["kept_accuracy_fg"],
            record["rejected_accuracy_fg"],
        )
