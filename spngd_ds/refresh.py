"""Taking refreshed statistics and re-inverting them on their owner (rules 5, 6 and 13).

Once the due statistics have reached their owners (:mod:`spngd_ds.stat_exchange`), the owner

1. normalises each one from its global sum and sample count, and takes it unless it is non-finite
   or an outlier (:class:`~spngd_ds.safety.OutlierGuard`): :func:`take_refreshes`, whose refresh
   schedule (rule 6) then decides the statistic's next refresh;
2. inverts the damped statistics it took: :func:`invert_refreshed`.

A statistic not taken keeps its previous value and inverse and is retried at the next step.
"""

from __future__ import annotations

import logging
import math

import torch

from spngd_ds.blocks import Block, UnitwiseBlock
from spngd_ds.blocks.base import InversionJob, Statistic, all_finite, run_inversions
from spngd_ds.metrics import StepMetrics
from spngd_ds.safety import OutlierGuard
from spngd_ds.staleness import change_figures, ratio_from

logger = logging.getLogger("spngd_ds")

#: an owned due statistic with its global sample count
Owned = tuple[Block, Statistic, float]


def take_refreshes(
    step: int,
    mine: list[Owned],
    sums: list[torch.Tensor | None],
    prescale: bool,
    outliers: OutlierGuard,
    log: StepMetrics,
    never_captured: set[str],
) -> dict[str, set[str]]:
    """Normalise and accept or reject the owned due statistics.

    Normalise the owned due statistics ``mine`` ((block, statistic, global count)) from their
    global ``sums`` (packed upper triangles already unpacked; ``None``: no rank captured it) and
    take each one that is finite and no outlier (rule 6 decides its next refresh); returns block
    name -> the statistics refreshed. ``prescale``: the sums arrived divided by their count (fp16
    wire) and are multiplied back. Finiteness, relative changes and noise figures of all of them
    are read back in one host synchronisation. A block none of whose ranks captured the statistic is
    warned of once (its name joins ``never_captured``) unless it was ever refreshed; ``log`` counts
    non-finite and rejected ones.
    """
    values: list[tuple[Block, Statistic, float, torch.Tensor]] = []
    for (b, s, count), total in zip(mine, sums, strict=True):
        if count <= 0 or total is None:
            _warn_never_captured(b, step, never_captured)
            s.schedule.postpone(step)
            continue
        total = total.to(b.dtype) * (count if prescale else 1.0)
        values.append((b, s, count, b.normalise(s.name, total, count)))
    if not values:
        return {}
    figures = []
    for _, s, _, value in values:
        pending = s.schedule.rho_pending
        rho = pending[0] if pending is not None else value.new_zeros(2, dtype=torch.float64)
        # ||X|| of the value taken (the finiteness test below): the noted figures' own when they are of it
        norm = (
            rho[:1]
            if pending is not None and pending[1] is value
            else torch.linalg.vector_norm(value).to(torch.float64).reshape(1)
        )
        figures.append(torch.cat([norm, rho, change_figures(s.value, value).to(rho.device)]))
    read = torch.stack(figures).tolist()  # (K, 5): ||X||, ρ's ||X|| and (Σ tr)², ||X_old||, ||X - X_old||
    refreshed: dict[str, set[str]] = {}
    for (b, s, count, value), (fro, rho_fro, trace2, old_norm, diff_norm) in zip(values, read, strict=True):
        if s.schedule.rho_pending is not None:
            s.schedule.settle_rho([rho_fro, trace2])
        if not math.isfinite(fro) and not all_finite(value):  # an infinite norm may be an overflow
            log.nonfinite_stats += 1
            logger.warning("SPNGD: non-finite %s of %s at step %d ignored", s.name, b.name, step)
            s.schedule.postpone(step)
            continue
        ratio = ratio_from([old_norm, diff_norm], s.value, value)
        verdict = outliers.judge(id(s), ratio, fro, old_norm, s.rejections) if s.value is not None else "accept"
        if verdict == "reject":
            s.rejections += 1
            log.rejected_stats += 1
            logger.warning(
                "SPNGD: %s of %s changed by a factor %.3g at step %d: rejected as an outlier",
                s.name,
                b.name,
                ratio,
                step,
            )
            s.schedule.postpone(step)
            continue
        if verdict != "accept":
            logger.warning(
                "SPNGD: %s of %s changed by a factor %.3g at step %d: accepted (%s)",
                s.name,
                b.name,
                ratio,
                step,
                "back to a scale it had before"
                if verdict == "recover"
                else f"after {s.rejections} rejections in a row",
            )
        outliers.accepted(id(s), fro)
        s.value = value
        s.rejections = 0
        s.refreshes += 1
        s.schedule.observe(step, ratio, samples=count)
        refreshed.setdefault(b.name, set()).add(s.name)
    return refreshed


def _warn_never_captured(block: Block, step: int, warned: set[str]) -> None:
    """Warn once per layer (names in ``warned``) that has curvature statistics none ever captured."""
    if block.name in warned or any(s.refreshes for s in block.stats.values()):
        return
    warned.add(block.name)
    logger.warning(
        "SPNGD: no statistics of %s were captured at step %d (its forward did not run in training mode "
        "with autograd): it takes the first-order update until they are",
        block.name,
        step,
    )


def invert_refreshed(
    step: int, blocks: dict[str, Block], refreshed: dict[str, set[str]], damping: float, log: StepMetrics
) -> None:
    """Re-invert the refreshed statistics of ``blocks``.

    Re-invert the statistics ``refreshed`` (block name -> names) of ``blocks`` damped by λ =
    ``damping``: every block's matrices in batches by size and their outcome read back at once
    (:func:`~spngd_ds.blocks.base.run_inversions`). A failed inversion keeps the previous inverse
    (the plain gradient when there is none) and is retried at the next step; ``log`` counts the
    failures.
    """
    jobs: list[tuple[str, InversionJob]] = []
    for name, names in refreshed.items():
        job = blocks[name].inversion_job(damping, names)
        if job is not None:
            jobs.append((name, job))
    for (name, _), report in zip(jobs, run_inversions([j for _, j in jobs]), strict=True):
        block = blocks[name]
        if isinstance(block, UnitwiseBlock):
            log.bn_channel_failures += block.failed_channels
        for failed in report.failed:
            if not isinstance(block, UnitwiseBlock):  # a unit-wise block counts its channels above
                log.inversion_failures += 1
                logger.warning("SPNGD: inversion of %s.%s failed; plain gradient this step", name, failed)
            block.stats[failed].schedule.postpone(step)
