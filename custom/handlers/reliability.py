"""Which teacher teaches which class: each teacher's Dice per class on labelled images (``teachers="by_class"``).

The per-voxel entropy rule trusts whichever teacher is more certain, and LiteMedSAM's sigmoid masks are
certain nearly everywhere, right or wrong. :class:`TeacherReliability` measures instead how well each
teacher segments each foreground class on labelled images (the validation split, as temperature
calibration does): the EMA teacher's argmax, and the generalized teacher's, prompted by the EMA
teacher's boxes as in training. The better one *owns* the class, and the gate
(:class:`~custom.losses.pseudo_label.EntropyGate` with ``teachers="by_class"``) takes that class from it.
It measures at the start of stage 2 and every ``interval`` epochs (the EMA teacher improves), after the
calibration handler when both are attached (the generalized teacher's composition uses its temperature).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine, Events

from custom.handlers.calibration import compose_masks, load_cases, teacher_outputs

logger = logging.getLogger(__name__)


def class_dice(predictions: Sequence[torch.Tensor], truths: Sequence[torch.Tensor], num_classes: int) -> list[float]:
    """Dice of each foreground class ``1 .. num_classes - 1`` over all the cases' voxels pooled (class
    maps of any shape, one prediction per truth); NaN for a class in neither."""
    overlap = torch.zeros(num_classes, dtype=torch.float64)
    sizes = torch.zeros(num_classes, dtype=torch.float64)
    for pred, truth in zip(predictions, truths, strict=True):
        pred, truth = pred.reshape(-1).long(), truth.reshape(-1).long()
        overlap += torch.bincount(truth[pred == truth], minlength=num_classes).double()
        sizes += torch.bincount(pred, minlength=num_classes).double() + torch.bincount(truth, minlength=num_classes)
    dice = 2 * overlap / sizes
    return [float(d) for d in dice[1:]]


def owners_from_dice(specialized: Sequence[float], generalized: Sequence[float]) -> torch.Tensor:
    """``(C - 1,)`` bool: True where the generalized teacher's Dice is higher (ties and unseen classes go to
    the EMA teacher, the one trained on this task's labels)."""
    return torch.tensor([g > s for s, g in zip(specialized, generalized, strict=True)], dtype=torch.bool)


class TeacherReliability:
    """Measure both teachers' Dice per class on labelled images and set each class's owner on the stage-2
    iteration (see the module docstring). Attaches only when the iteration's gate is ``teachers="by_class"``.

    Args:
        iteration: the :class:`~custom.engines.uncol.SemiSupervisedIteration` (its ``teachers``, its
            ``gate.teachers``; the owners go to its ``set_class_owners``).
        dataset: labelled cases (dicts with ``image`` and ``label``, deterministic transforms), e.g. the
            validation split; at most ``max_cases`` are used.
        inferer: runs the EMA teacher on a whole image (the validation's sliding-window inferer).
        interval: epochs between measurements.
    """

    def __init__(
        self, iteration, dataset: Sequence[dict], inferer: Callable, interval: int = 1, max_cases: int = 8
    ) -> None:
        self.iteration = iteration
        self.dataset = dataset
        self.inferer = inferer
        self.interval = interval
        self.max_cases = max_cases
        self.records: list[dict] = []
        self._cases: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def attach(self, engine: Engine) -> None:
        if self.iteration.gate.teachers != "by_class":
            return
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def measure(self, device: torch.device) -> dict:
        """Each teacher's Dice per foreground class at its current temperature, and the owners."""
        if self._cases is None:
            self._cases = load_cases(self.dataset, self.max_cases)
        out = teacher_outputs(self.iteration, self._cases, self.inferer, device)
        num_classes = out["spec_logits"][0].shape[1]
        teacher = self.iteration.teachers.generalized
        gen_probs = compose_masks(teacher, out["masks"], out["valids"], teacher.mask_temperature)
        spec = class_dice([x.argmax(1) for x in out["spec_logits"]], out["truths"], num_classes)
        gen = class_dice([x.argmax(1) for x in gen_probs], out["truths"], num_classes)
        owners = owners_from_dice(spec, gen)
        return {
            "specialized": [round(d, 4) for d in spec],
            "generalized": [round(d, 4) for d in gen],
            "owners": ["generalized" if o else "specialized" for o in owners.tolist()],
            "_owners": owners,
        }

    def __call__(self, engine: Engine) -> None:
        if self.records and self.records[-1]["iteration"] == engine.state.iteration:
            return
        record = self.measure(getattr(engine.state, "device", None) or torch.device("cpu"))
        self.iteration.set_class_owners(record.pop("_owners"))
        record = {"iteration": engine.state.iteration, "epoch": engine.state.epoch, **record}
        self.records.append(record)
        engine.state.reliability = record
        logger.info(
            "teacher reliability at iteration %d: Dice per class EMA %s, generalized %s; owners %s",
            engine.state.iteration,
            record["specialized"],
            record["generalized"],
            record["owners"],
        )
