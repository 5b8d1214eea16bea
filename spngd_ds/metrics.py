"""The figures SP-NGD reports for logging (W&B) and tests: counters and the step-time split."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class StepMetrics:
    """Counters (cumulative since construction) and timers (seconds, last step only).

    Counters: ``inversion_failures`` (factor inversions that fell back to the plain gradient),
    ``nonfinite_stats`` (statistics whose refresh was rejected for NaN/Inf), ``skipped_steps``
    (steps skipped for non-finite gradients or an fp16 overflow), ``bn_channel_failures``,
    ``rejected_stats`` (finite refreshes rejected as outliers: relative change above 1e6),
    ``factors_sent_early`` (A factors whose exchange ran behind the backward, spngd_ds.paths.overlap).

    Timers: on the CPU, the wall time of each part. On an accelerator (``device``) the host only
    queues kernels, so its wall time is launch time; with ``sync_timing`` true each timed part is
    bracketed by a synchronisation of the device, and the timers hold device time (the price:
    two synchronisations per timed part, so leave it off where the step's speed matters).
    """

    inversion_failures: int = 0
    nonfinite_stats: int = 0
    rejected_stats: int = 0
    skipped_steps: int = 0
    bn_channel_failures: int = 0
    factors_sent_early: int = 0
    timers: dict[str, float] = field(default_factory=dict)
    #: where the step's kernels run (the parameters' device); None: the CPU
    device: torch.device | None = None
    #: on an accelerator: synchronise around each timed part, so that timers hold device time
    sync_timing: bool = False

    def _synchronize(self) -> None:
        if self.sync_timing and self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Add the time of the ``with`` body to ``timers[name]``.

        Wall time on the CPU, device time on an accelerator with ``sync_timing`` (see the class
        docstring).
        """
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.timers[name] = self.timers.get(name, 0.0) + time.perf_counter() - start

    def reset_timers(self) -> None:
        """Forget the accumulated times."""
        self.timers = {}
