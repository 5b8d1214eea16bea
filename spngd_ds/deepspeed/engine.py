"""Wiring SP-NGD into a DeepSpeed engine.

docs/design.md §3: the path object, the factors the capture hooks need, and the engine's ``step`` at
the gradient-accumulation boundary.

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
from collections.abc import Callable
from typing import Any

import torch

from spngd_ds.deepspeed.agreement import check_rank_agreement
from spngd_ds.deepspeed.agreement import enabled as agreement_enabled
from spngd_ds.deepspeed.engine_api import DeepSpeedEngineAPI
from spngd_ds.deepspeed.partitions import local_fragment
from spngd_ds.optimizer import SPNGD
from spngd_ds.paths.compatible import CompatiblePath, loss_scale
from spngd_ds.paths.fast import FastPath

logger = logging.getLogger("spngd_ds")


def attach(engine: DeepSpeedEngineAPI, opt: SPNGD) -> None:
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

    def checked_step(*args: Any, **kwargs: Any) -> object:
        boundary = engine.is_gradient_accumulation_boundary()
        result = step(*args, **kwargs)
        if boundary and stage < 3:  # ZeRO-3 ranks hold different shards of the module's tensors
            check_rank_agreement(opt, engine.module.parameters(), opt.comm.device)
        return result

    engine.step = checked_step if agreement_enabled() else step  # type: ignore[method-assign]
    _observe_losses(engine, opt)
    from spngd_ds.deepspeed.checkpoint import wrap_checkpointing

    wrap_checkpointing(engine, opt)


def _observe_losses(engine: DeepSpeedEngineAPI, opt: SPNGD) -> None:
    """Make ``engine.backward`` report the loss to SP-NGD.

    ``engine.backward(loss)`` hands the loss to :meth:`SPNGD.observe_loss` (kept as a tensor, read
    only by the error that stops a run whose steps are all skipped).
    """
    backward = engine.backward

    def observed_backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> object:
        opt.observe_loss(loss)
        return backward(loss, *args, **kwargs)

    engine.backward = observed_backward  # type: ignore[method-assign]


def _fast_step(engine: DeepSpeedEngineAPI, opt: SPNGD) -> Callable[..., object]:
    """The engine's ``step`` with SP-NGD's skip detection around it at the boundary (fast path)."""
    original = engine.step

    def step(*args: Any, **kwargs: Any) -> object:
        if not engine.is_gradient_accumulation_boundary():
            return original(*args, **kwargs)
        opt.path.before_engine_step(opt)
        result = original(*args, **kwargs)
        opt.path.after_engine_step(opt)  # a step DeepSpeed skipped (overflow) is skipped there
        return result

    return step


def _compatible_step(engine: DeepSpeedEngineAPI, opt: SPNGD, path: CompatiblePath) -> Callable[..., object]:
    """The engine's ``step`` followed at the boundary by the compatible path's bookkeeping."""
    original = engine.step

    def step(*args: Any, **kwargs: Any) -> object:
        if not engine.is_gradient_accumulation_boundary():
            return original(*args, **kwargs)
        result = original(*args, **kwargs)
        path.after_engine_step(opt)
        return result

    return step
