"""A warning when stage 2's pseudo-labels stop supervising a class the labelled data have.

If neither teacher predicts a class on the unlabelled images, every kept pseudo-label there says
"not this class", and the pseudo-label loss teaches its absence against the few labelled images
that teach it: a student that knew the class can unlearn it. On Colin27 (seed 2, 3 labelled slices)
the stage 1 student predicted none of the caudate on the unlabelled slices, LiteMedSAM got no
caudate box, and every UnCoL arm ended with caudate Dice 0 (bundle/docs/results.md). No gate can
choose a class neither teacher proposes, so the run says so while it trains.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


class PseudoLabelCoverage:
    """At every epoch's end, warn (once per class) about each foreground class that the labelled
    batches held and the kept pseudo-labels of the epoch did not; the counts are the stage 2
    iteration's (``kept_class_voxels``, ``labelled_class_voxels``), reset at every epoch's start.
    Nothing is checked while the pseudo-label weight is 0 (``engine.state.unsup_weight``).

    Args:
        iteration: stage 2's ``SemiSupervisedIteration``.
        class_names: names of the foreground classes, in label order (class 1 first).
    """

    def __init__(self, iteration, class_names: Sequence[str]) -> None:
        self.iteration = iteration
        self.class_names = list(class_names)
        self.warned: set[int] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def reset(self, engine: Engine | None = None) -> None:
        self.iteration.kept_class_voxels = self.iteration.labelled_class_voxels = None

    def missing(self) -> list[int]:
        """Foreground classes in the labelled batches and in none of the kept pseudo-labels."""
        kept, labelled = self.iteration.kept_class_voxels, self.iteration.labelled_class_voxels
        if kept is None or labelled is None:
            return []
        return [c for c in range(1, len(kept)) if kept[c] == 0 and labelled[c] > 0]

    def __call__(self, engine: Engine) -> None:
        if float(getattr(engine.state, "unsup_weight", 1.0)) == 0.0:
            return
        for c in self.missing():
            if c in self.warned:
                continue
            self.warned.add(c)
            name = self.class_names[c - 1] if c - 1 < len(self.class_names) else f"class {c}"
            logger.warning(
                f"stage 2, epoch {engine.state.epoch}: the kept pseudo-labels hold no voxel of {name!r} "
                f"(the labelled batches held {int(self.iteration.labelled_class_voxels[c])}): neither "
                "teacher predicts it on the unlabelled images, so the pseudo-label loss teaches its "
                "absence and the student can unlearn it; more labelled images with it, or a smaller "
                "max_unsup_weight, keep it (bundle/docs/results.md, Colin27 seed 2)"
            )
