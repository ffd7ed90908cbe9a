"""Multi-phase learning-rate schedules measured in iterations.

Real recipes are rarely "warmup + one cosine": e.g. warmup to 5e-5, cosine to 1e-5
over phase 1, linear to 6e-6 over phase 2, then hold.  Megatron's
``OptimizerParamScheduler`` has a single decay segment, so a schedule here is
warmup followed by any number of phases, each starting where the previous ended.

The schedule is a pure function of the iteration: it has no state to save or
load, so resuming from a checkpoint at iteration N reproduces the uninterrupted
run's lr exactly by calling ``lr_at(N)`` / ``apply(optimizer, N)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

from megavlm.config.lr import DECAY_STYLES, LRPhase



def _check_lr(value: Any, field: str) -> float:
    # YAML 1.1 reads "5e-5" (no dot) as a string; say so here rather than fail in a comparison.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{field}: {value!r} is not a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{field}: {value!r} must be a finite number >= 0")
    return float(value)


def _check_iters(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: {value!r} is not an integer")
    if value < 0:
        raise ValueError(f"{field}: {value!r} must be >= 0")
    return value


def _interpolate(start: float, end: float, progress: float, decay: str) -> float:
    """lr at ``progress`` in [0, 1) of a segment from ``start`` to ``end``.

    Written as ``start * w + end * (1 - w)`` so the endpoints and the cosine midpoint
    (w == 0.5) come out exact rather than off by an ulp.
    """
    if decay == "constant":
        return start
    if decay == "linear":
        w = 1.0 - progress
    else:  # cosine
        w = 0.5 * (1.0 + math.cos(math.pi * progress))
    return start * w + end * (1.0 - w)


class LRSchedule:
    """Linear warmup from ``warmup_init_lr`` to ``lr`` over ``warmup_iters``, then ``phases``.

    Iterations are 0-based step indices: ``lr_at(0) == warmup_init_lr`` and
    ``lr_at(warmup_iters) == lr`` (the first phase starts at ``lr``).  After the last
    phase the schedule holds ``min_lr``, which defaults to the last phase's ``end_lr``
    (or ``lr`` with no phases) so the curve is continuous.

    ``name`` prefixes field names in validation errors (``train.lr_phases[1].decay``)
    so a bad config value is reported where the user wrote it.
    """

    __slots__ = ("lr", "warmup_iters", "warmup_init_lr", "phases", "min_lr")

    def __init__(
        self,
        *,
        lr: float,
        warmup_iters: int,
        warmup_init_lr: float = 0.0,
        phases: Sequence[LRPhase] = (),
        min_lr: float | None = None,
        name: str = "train",
    ) -> None:
        self.lr = _check_lr(lr, f"{name}.lr")
        self.warmup_iters = _check_iters(warmup_iters, f"{name}.warmup_iters")
        self.warmup_init_lr = _check_lr(warmup_init_lr, f"{name}.warmup_init_lr")
        for i, phase in enumerate(phases):
            field = f"{name}.lr_phases[{i}]"
            if not isinstance(phase, LRPhase):
                raise ValueError(f"{field}: {phase!r} is not an LRPhase")
            _check_iters(phase.iters, f"{field}.iters")
            _check_lr(phase.end_lr, f"{field}.end_lr")
            if phase.decay not in DECAY_STYLES:
                raise ValueError(
                    f"{field}.decay: {phase.decay!r} is not one of {', '.join(DECAY_STYLES)}"
                )
        self.phases: tuple[LRPhase, ...] = tuple(phases)
        if min_lr is None:
            self.min_lr = float(self.phases[-1].end_lr) if self.phases else self.lr
        else:
            self.min_lr = _check_lr(min_lr, f"{name}.min_lr")

    @classmethod
    def single(
        cls,
        lr: float,
        warmup_iters: int,
        decay_iters: int,
        min_lr: float,
        decay: str = "cosine",
        *,
        warmup_init_lr: float = 0.0,
        name: str = "train",
    ) -> LRSchedule:
        """The common warmup + one decay case.

        Unlike Megatron's ``lr_decay_iters``, ``decay_iters`` counts from the end of
        warmup: the lr reaches ``min_lr`` at iteration ``warmup_iters + decay_iters``.
        """
        return cls(
            lr=lr,
            warmup_iters=warmup_iters,
            warmup_init_lr=warmup_init_lr,
            phases=[LRPhase(iters=decay_iters, end_lr=min_lr, decay=decay)],
            name=name,
        )

    def lr_at(self, iteration: int) -> float:
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        if iteration < self.warmup_iters:
            progress = iteration / self.warmup_iters
            return self.warmup_init_lr * (1.0 - progress) + self.lr * progress
        offset = iteration - self.warmup_iters
        start = self.lr
        for phase in self.phases:
            if offset < phase.iters:
                return _interpolate(start, phase.end_lr, offset / phase.iters, phase.decay)
            offset -= phase.iters
            start = phase.end_lr
        return self.min_lr

    def apply(self, optimizer: Any, iteration: int) -> float:
        """Set every param group's lr to ``lr_at(iteration) * group.get("lr_mult", 1.0)``.

        Works with torch optimizers and megatron-core's ``MegatronOptimizer`` /
        ``ChainedOptimizer`` (both expose ``param_groups``).  Per-group ``max_lr`` /
        ``min_lr`` overrides that megatron-core puts in param groups are not consulted:
        ``lr_mult`` is the only per-group knob.  Returns the unscaled lr, for logging.
        """
        lr = self.lr_at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr
