"""Sending the A factors to their owners while the backward runs (docs/design.md §3, "Overlap").

A (the input covariance of a Linear/Conv2d) is complete once the forwards that capture it have run:
after the ``k``-th forward of a step, ``k = min(stat_micro_batches, gradient_accumulation_steps)``.
At that moment :func:`send_factors_early` takes every due A's local sum and starts its exchange to
the owners (the reduce-scatter of :meth:`~spngd_ds.comm.Communicator.to_owners_async`), so that the
largest statistics travel behind the backward (and the remaining micro-batches) instead of inside
the optimizer step; the step then only waits for it and runs the small all-to-all of the parts
that straddle the equal shards. G and BatchNorm's F need the backward and still travel in the step.

Not used (the step sends A as before) when ``overlap_statistics`` is false, or "auto" on the
CPU without later micro-batches in the step to hide behind (:func:`worth_sending_early`); with
one rank (nothing to hide), with ``comm_dtype: fp16`` (fp16 statistics are pre-scaled by the
global sample count, known only at the step), or when the forward that completes A cannot be
known (``stat_micro_batches: null`` without an engine that says how many forwards a step has).
"""

from __future__ import annotations

import torch

from spngd_ds.paths.base import StepOptimizer
from spngd_ds.stat_exchange import EarlyFactors, pack_statistics


def can_send_early(opt: StepOptimizer) -> bool:
    """Whether this run may send A factors behind the backward.

    See the module docstring: ``overlap_statistics`` true or "auto", more than one rank, and
    statistics not on an fp16 wire. Whether a given step does is :func:`worth_sending_early`.
    """
    mode = opt.config.overlap_statistics
    return mode in (True, "auto") and opt.comm.world_size > 1 and opt.config.comm_dtype != "fp16"


def worth_sending_early(opt: StepOptimizer) -> bool:
    """Whether this step sends its A factors behind the backward.

    Whether this step starts its A exchange when A is complete. ``True``: always. "auto": on an
    accelerator always (its communicator has a stream of its own), and on the CPU only when
    forwards of this step follow the one that completed A (gradient accumulation with
    ``stat_micro_batches`` below ``gradient_accumulation_steps``). On the CPU gloo runs the exchange
    on the cores the backward computes on: with one micro-batch a step it hid nothing and made the
    step 3-5% slower (bench/overlap.py); with 16 and ``stat_micro_batches: 1`` the other 15
    micro-batches cover it and the step is about 1% faster (bench/step_time.py --regime accum
    --overlap_variant).
    """
    mode = opt.config.overlap_statistics
    if mode is True or opt.comm.device.type != "cpu":
        return True
    last, forwards = opt.capture.last_factor_forward(), opt.capture.forwards_per_step
    return last is not None and forwards is not None and last < forwards


@torch.no_grad()
def send_factors_early(opt: StepOptimizer) -> EarlyFactors | None:
    """Start the exchange of every due A factor to its owner.

    Take every due A's local sum and start its exchange to the owners; later forwards of this
    step capture no A. A collective (an asynchronous reduce-scatter per bucket): every rank calls
    it after the same forward. ``None`` when no A is due this step.
    """
    step = opt.step_count
    stats = [(b, s) for b in opt.blocks.values() for s in b.stats.values() if s.name == "A" and s.schedule.is_due(step)]
    if not stats:
        return None
    local = [s.take_local() for _, s in stats]
    packed, layout, wire = pack_statistics(
        opt.comm, opt.assignment, opt.config.comm_dtype, stats, [total for total, _ in local]
    )
    before = opt.comm.bytes_sent
    pending = opt.comm.to_owners_async(layout, packed, wire)
    opt.stop_capturing("A")
    opt.stats_log.factors_sent_early += len(stats)
    return EarlyFactors(stats, [count for _, count in local], pending, opt.comm.bytes_sent - before)
