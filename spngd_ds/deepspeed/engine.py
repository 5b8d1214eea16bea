"""Wiring SP-NGD into a DeepSpeed engine.

Wiring SP-NGD into a DeepSpeed engine (DESIGN.md §3): the path object, the factors the capture
hooks need, and the engine's ``step`` at the gradient-accumulation boundary.

- ZeRO stage 0: :class:`~spngd_ds.paths.fast.FastPath`. The engine's gradient all-reduce is
  switched off (SP-NGD reduces to owners itself); DeepSpeed's engine calls SP-NGD's step (directly
  at fp32, through its bf16 wrapper otherwise).
- ZeRO 1-3: :class:`~spngd_ds.paths.compatible.CompatiblePath`, called by DeepSpeed's step on
  its flat partitions, where it routes this rank's gradient fragments to owners and back.

Either way a step SP-NGD skips is reported to the engine as an overflow (counted in
``engine.skipped_steps``, learning-rate scheduler not advanced), and a step DeepSpeed skips (fp16
overflow) discards SP-NGD's statistics of that step; ``max_consecutive_skips`` skipped steps in a
row raise on every rank (rule 13), naming the loss ``engine.backward`` last saw at an applied step.
"""

from __future__ import annotations

import logging
from typing import Any

from spngd_ds.deepspeed.agreement import check_rank_agreement
from spngd_ds.deepspeed.agreement import enabled as agreement_enabled
from spngd_ds.deepspeed.partitions import local_fragment
from spngd_ds.optimizer import SPNGD
from spngd_ds.paths.compatible import CompatiblePath, loss_scale
from spngd_ds.paths.fast import FastPath

logger = logging.getLogger("spngd_ds")


def attach(engine: Any, opt: SPNGD) -> None:
    """Install SP-NGD's path and hooks on ``engine`` (called by :func:`spngd_ds.initialize`)."""
    stage = int(engine.zero_optimization_stage())
    opt.capture.grad_scale = lambda: engine.gradient_accumulation_steps() / loss_scale(engine)
    opt.capture.forwards_per_step = int(engine.gradient_accumulation_steps())
    if stage == 0:
        engine.enable_backward_allreduce = False
        opt.path = FastPath(overflow_target=engine.optimizer)
        step = _fast_step(engine, opt)
    else:
        path = CompatiblePath(engine, opt, local_fragment)
        opt.path = path
        step = _compatible_step(engine, opt, path)

    def checked_step(*args: Any, **kwargs: Any) -> Any:
        boundary = engine.is_gradient_accumulation_boundary()
        result = step(*args, **kwargs)
        if boundary and stage < 3:  # ZeRO-3 ranks hold different shards of the module's tensors
            check_rank_agreement(opt, engine.module.parameters(), opt.comm.device)
        return result

    engine.step = checked_step if agreement_enabled() else step
    _observe_losses(engine, opt)
    from spngd_ds.deepspeed.checkpoint import wrap_checkpointing

    wrap_checkpointing(engine, opt)


def _observe_losses(engine: Any, opt: SPNGD) -> None:
    """Make ``engine.backward`` report the loss to SP-NGD.

    ``engine.backward(loss)`` hands the loss to :meth:`SPNGD.observe_loss` (kept as a tensor, read
    only by the error that stops a run whose steps are all skipped).
    """
    backward = engine.backward

    def observed_backward(loss: Any, *args: Any, **kwargs: Any) -> Any:
        opt.observe_loss(loss)
        return backward(loss, *args, **kwargs)

    engine.backward = observed_backward


def _fast_step(engine: Any, opt: SPNGD) -> Any:
    original = engine.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if not engine.is_gradient_accumulation_boundary():
            return original(*args, **kwargs)
        opt.path.before_engine_step(opt)
        result = original(*args, **kwargs)
        opt.path.after_engine_step(opt)  # a step DeepSpeed skipped (overflow) is skipped there
        return result

    return step


def _compatible_step(engine: Any, opt: SPNGD, path: CompatiblePath) -> Any:
    original = engine.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if not engine.is_gradient_accumulation_boundary():
            return original(*args, **kwargs)
        result = original(*args, **kwargs)
        path.after_engine_step(opt)
        return result

    return step
