"""A warning when stage 2's pseudo-labels stop supervising a class the labelled data have.

If neither teacher predicts a class on the unlabelled images, every kept pseudo-label there says
"not this class", and the pseudo-label loss teaches its absence against the few labelled images
that teach it: a student that knew the class can unlearn it (seen on a real-anatomy task with three
labelled slices, where every UnCoL arm lost a small nucleus; the project's research record,
research/results.md). No gate can choose a class neither teacher proposes, so the run says so while
it trains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


class CountsClasses(Protocol):
    """What the handler reads: the stage 2 iteration (``SemiSupervisedIteration``)."""

    @property
    def class_voxels(self) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...

    def reset_class_voxels(self) -> None: ...

    def scheduled(self, name: str, engine: Engine | None = None) -> float | None: ...


class PseudoLabelCoverage:
    """At every epoch's end, warn (once per class) about each foreground class that the labelled
    batches held and the kept pseudo-labels of the epoch did not; the counts are the stage 2
    iteration's ``class_voxels``, restarted at every epoch's start. Nothing is checked while the
    pseudo-label weight (the iteration's ``unsup_weight`` schedule) is 0.

    Args:
        iteration: stage 2's ``SemiSupervisedIteration``.
        class_names: names of the foreground classes, in label order (class 1 first).
    """

    def __init__(self, iteration: CountsClasses, class_names: Sequence[str]) -> None:
        self.iteration = iteration
        self.class_names = list(class_names)
        self.warned: set[int] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def reset(self, engine: Engine | None = None) -> None:
        self.iteration.reset_class_voxels()

    def missing(self) -> list[int]:
        """Foreground classes in the labelled batches and in none of the kept pseudo-labels."""
        kept, labelled = self.iteration.class_voxels
        if kept is None or labelled is None:
            return []
        return [c for c in range(1, len(kept)) if kept[c] == 0 and labelled[c] > 0]

    def __call__(self, engine: Engine) -> None:
        weight = self.iteration.scheduled("unsup_weight", engine)
        if weight is not None and weight == 0.0:
            return
        for c in self.missing():
            if c in self.warned:
                continue
            self.warned.add(c)
            name = self.class_names[c - 1] if c - 1 < len(self.class_names) else f"class {c}"
            labelled = int(self.iteration.class_voxels.labelled[c])
            logger.warning(
                f"stage 2, epoch {engine.state.epoch}: the kept pseudo-labels hold no voxel of {name!r} "
                f"(the labelled batches held {labelled}): neither teacher predicts it on the unlabelled "
                "images, so the pseudo-label loss teaches its absence and the student can unlearn it; more "
                "labelled images with it, a smaller max_unsup_weight or class_guard='prior' keep it "
                "(bundle/docs/gate.md)"
            )
