"""Time-dependent schedules of stage 2 (gate threshold, unsupervised weight) as Ignite handlers.

A :class:`ScheduleHandler` writes ``schedule(t)`` to ``engine.state.<name>`` at the start of every
iteration (``t`` counts completed iterations), where the iteration function reads it and the
stats handlers log it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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

    def __init__(self, ramp_iters: int, start: float = 0.5, end: float = 0.8) -> None:
        for name, value in (("start", start), ("end", end)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"kept fraction {name} must be in (0, 1], got {value}")
        self.ramp_iters, self.start, self.end = ramp_iters, start, end

    def __call__(self, t: int) -> float:
        return self.start + (self.end - self.start) * sigmoid_rampup(t, self.ramp_iters)


def gate_schedule(
    gate: str,
    num_classes: int,
    ramp_iters: int,
    ramped: bool = True,
    keep_start: float = 0.5,
    keep_end: float = 0.8,
) -> Callable[[int], float]:
    """The threshold schedule the gate reads: a kept fraction for ``gate="quantile"``, an entropy otherwise."""
    if gate == "quantile":
        return KeptFractionSchedule(ramp_iters, keep_start, keep_end)
    return ThresholdSchedule(num_classes, ramp_iters, ramped=ramped)


class WeightSchedule:
    """Unsupervised loss weight ``lambda_u(t) = max_weight * rampup(t)``."""

    def __init__(self, max_weight: float, ramp_iters: int) -> None:
        self.max_weight, self.ramp_iters = max_weight, ramp_iters

    def __call__(self, t: int) -> float:
        return self.max_weight * sigmoid_rampup(t, self.ramp_iters)


class ScheduleHandler:
    """Set ``engine.state.<name> = schedule(completed iterations)`` before each iteration."""

    def __init__(self, name: str, schedule: Callable[[int], float]) -> None:
        self.name = name
        self.schedule = schedule

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        setattr(engine.state, self.name, float(self.schedule(engine.state.iteration - 1)))
