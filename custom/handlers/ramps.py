"""Time-dependent schedules of stage 2 as Ignite handlers: the gate's cut and the unsupervised weight.

Each schedule has one meaning and the name it is handed to the stage 2 iteration under
(:attr:`~custom.engines.uncol.SemiSupervisedIteration.SCHEDULES`): ``entropy_threshold`` (nats, read by
``gate="entropy"``), ``keep_fraction`` (the fraction of each pseudo-class kept, read by
``gate="quantile"``) and ``unsup_weight``. A :class:`ScheduleHandler` hands ``schedule(t)`` to the
iteration at the start of every iteration (``t`` counts completed iterations); the iteration uses it
and puts it in its output, where the stats handlers log it.
"""

from __future__ import annotations

import math
from typing import Protocol

from ignite.engine import Engine, Events


def sigmoid_rampup(t: float, length: float) -> float:
    """The sigmoid-shaped ramp-up of Laine & Aila (used by Mean Teacher and UA-MT): ``exp(-5 (1 - t/L)^2)``,
    from about 0.007 at ``t = 0`` to 1 at ``t >= L``."""
    if length <= 0:
        return 1.0
    x = min(max(t, 0.0), length) / length
    return math.exp(-5.0 * (1.0 - x) ** 2)


class ThresholdSchedule:
    """Entropy threshold ``tau(t) = (start + (end - start) * rampup(t)) * ln(C)`` (UA-MT's schedule with the
    defaults 0.75 -> 1.0); ``ramped=False`` keeps it fixed at ``start * ln(C)``.

    ``ln(C)`` is the largest possible entropy of C classes, so the threshold is a fraction of it.
    """

    name = "entropy_threshold"

    def __init__(
        self, num_classes: int, ramp_iters: int, start: float = 0.75, end: float = 1.0, ramped: bool = True
    ) -> None:
        self.max_entropy = math.log(num_classes)
        self.ramp_iters, self.start, self.end, self.ramped = ramp_iters, start, end, ramped

    def __call__(self, t: int) -> float:
        if not self.ramped:
            return self.start * self.max_entropy
        return (self.start + (self.end - self.start) * sigmoid_rampup(t, self.ramp_iters)) * self.max_entropy


class KeptFractionSchedule:
    """Fraction of each pseudo-class's voxels a quantile gate keeps: ``start + (end - start) * rampup(t)``.

    ``start < end`` starts strict and relaxes as the teachers improve; ``start > end`` tightens over
    training (the paper's "gradually increases confidence requirements")."""

    name = "keep_fraction"

    def __init__(self, ramp_iters: int, start: float = 0.5, end: float = 0.8) -> None:
        for name, value in (("start", start), ("end", end)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"kept fraction {name} must be in (0, 1], got {value}")
        self.ramp_iters, self.start, self.end = ramp_iters, start, end

    def __call__(self, t: int) -> float:
        return self.start + (self.end - self.start) * sigmoid_rampup(t, self.ramp_iters)


class Schedule(Protocol):
    """A value over training: ``schedule(t)`` at ``t`` completed iterations, handed over as ``name``."""

    name: str

    def __call__(self, t: int) -> float: ...


def gate_schedule(
    gate: str,
    num_classes: int,
    ramp_iters: int,
    ramped: bool = True,
    keep_start: float = 0.5,
    keep_end: float = 0.8,
) -> ThresholdSchedule | KeptFractionSchedule:
    """The schedule the gate reads: the kept fraction (``keep_start`` -> ``keep_end``) for
    ``gate="quantile"``, the entropy threshold (ramped unless ``ramped`` is False) otherwise."""
    if gate == "quantile":
        return KeptFractionSchedule(ramp_iters, keep_start, keep_end)
    return ThresholdSchedule(num_classes, ramp_iters, ramped=ramped)


class WeightSchedule:
    """Unsupervised loss weight ``lambda_u(t) = max_weight * rampup(t)``."""

    name = "unsup_weight"

    def __init__(self, max_weight: float, ramp_iters: int) -> None:
        self.max_weight, self.ramp_iters = max_weight, ramp_iters

    def __call__(self, t: int) -> float:
        return self.max_weight * sigmoid_rampup(t, self.ramp_iters)


class ScheduleTarget(Protocol):
    """What takes scheduled values: the stage 2 iteration (``SemiSupervisedIteration.set_schedule``)."""

    def set_schedule(self, name: str, value: float) -> None: ...


class ScheduleHandler:
    """Before each iteration, hand ``schedule(completed iterations)`` to the stage 2 ``iteration`` under
    the schedule's name (``name`` overrides it). The first value is handed over at once, so that a
    name the iteration does not take stops the run while the configuration is read, not at its first
    step. Without ``iteration`` the value goes to ``engine.state.<name>`` (an engine of one's own; the
    stage 2 iteration reads a value there that it was not handed, as configurations before 0.8 did).
    """

    def __init__(self, schedule: Schedule, iteration: ScheduleTarget | None = None, name: str | None = None) -> None:
        self.schedule = schedule
        self.iteration = iteration
        self.name = name or schedule.name
        if iteration is not None:
            try:
                iteration.set_schedule(self.name, float(schedule(0)))
            except ValueError as err:  # a config's mistake: one line, not a traceback through the parser
                raise SystemExit(f"error: ScheduleHandler: {err}") from None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        value = float(self.schedule(engine.state.iteration - 1))
        if self.iteration is not None:
            self.iteration.set_schedule(self.name, value)
        else:
            setattr(engine.state, self.name, value)
