"""The figures SP-NGD reports for logging (W&B) and tests: counters and the step-time split."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StepMetrics:
    """Counters (cumulative since construction) and timers (seconds, last step only).

    Counters: ``inversion_failures`` (factor inversions that fell back to the plain gradient),
    ``nonfinite_stats`` (statistics whose refresh was rejected for NaN/Inf), ``skipped_steps``
    (steps skipped for non-finite gradients or an fp16 overflow), ``bn_channel_failures``,
    ``rejected_stats`` (finite refreshes rejected as outliers: relative change above 1e6),
    ``factors_sent_early`` (A factors whose exchange ran behind the backward, spngd_ds.overlap).
    """

    inversion_failures: int = 0
    nonfinite_stats: int = 0
    rejected_stats: int = 0
    skipped_steps: int = 0
    bn_channel_failures: int = 0
    factors_sent_early: int = 0
    timers: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to ``timers[name]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timers[name] = self.timers.get(name, 0.0) + time.perf_counter() - start

    def reset_timers(self) -> None:
        self.timers = {}
