"""Rule 6: stale statistics with an adaptive refresh interval per statistic.

Each statistic X (A or G of a Kronecker block, F of a unit-wise block) owns one
:class:`RefreshSchedule`. When X is refreshed at step ``t`` its relative change
``r = ||X_new - X_old||_F / ||X_old||_F`` decides the next interval: below the threshold the
interval grows by one (up to ``max_interval``), otherwise it resets to 1. X is next due at
``t + interval``. Between refreshes X is neither captured, communicated nor re-inverted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def relative_change(old: torch.Tensor | None, new: torch.Tensor) -> float:
    """``||new - old||_F / ||old||_F``; ``inf`` when there is no (or a zero) old value."""
    if old is None:
        return math.inf
    denom = float(torch.linalg.vector_norm(old.double()))
    if denom == 0.0 or not math.isfinite(denom):
        return math.inf
    return float(torch.linalg.vector_norm((new - old).double())) / denom


@dataclass
class RefreshSchedule:
    """The refresh interval of one statistic.

    Attributes:
        threshold: rule 6's threshold, or ``None`` to refresh every step (``staleness=None``).
        max_interval: the largest interval in steps.
        interval: the current interval Δ_X in steps (starts at 1).
        next_step: the step index at which X is next due (starts at 0: due at the first step).
    """

    threshold: float | None
    max_interval: int = 1
    interval: int = 1
    next_step: int = 0

    def is_due(self, step: int) -> bool:
        """Whether the statistic is captured, communicated and re-inverted at ``step``."""
        return step >= self.next_step

    def observe(self, step: int, ratio: float) -> None:
        """Record a refresh at ``step`` whose relative change was ``ratio`` and set the next one."""
        if self.threshold is None:
            self.interval = 1
        elif ratio < self.threshold:
            self.interval = min(self.interval + 1, self.max_interval)
        else:
            self.interval = 1
        self.next_step = step + self.interval

    def postpone(self, step: int) -> None:
        """A refresh at ``step`` was lost (e.g. non-finite statistics): try again next step."""
        self.next_step = step + 1

    def state(self) -> tuple[int, int]:
        """``(interval, next_step)``: what every rank must agree on."""
        return self.interval, self.next_step

    def load(self, state: tuple[int, int]) -> None:
        """Inverse of :meth:`state`."""
        self.interval, self.next_step = int(state[0]), int(state[1])
