"""The learning-rate phase as configured (``train.lr_phases``).

It is data the config owns; ``training.lr_schedule`` turns phases into an lr per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

DECAY_STYLES = ("cosine", "linear", "constant")


@dataclass(frozen=True, kw_only=True, slots=True)
class LRPhase:
    """One decay segment: go from the previous phase's end lr to ``end_lr`` over ``iters``.

    ``constant`` holds the start lr for the whole phase and jumps to ``end_lr`` after it
    (a step schedule).
    """

    iters: int
    end_lr: float
    decay: str = "cosine"
