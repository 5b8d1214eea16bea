"""Wiring SP-NGD into a DeepSpeed engine (DESIGN.md §3): loss-scale and accumulation factors for
the hooks, the fast path at ZeRO stage 0, and the compatible path at ZeRO 1-3.

Compatible path, between ``engine.backward`` on the boundary micro-batch and DeepSpeed's step:
every rank reads the full averaged gradient of every parameter (``safe_get_full_grad`` is a
collective under ZeRO: all ranks, same order) and keeps those of the blocks it owns; statistics
are reduce-scattered to owners; owners precondition; the preconditioned gradients are gathered
from the owners; every rank writes them back (``safe_set_full_grad``, in the gradient-accumulation
dtype). DeepSpeed's step then calls SP-NGD in elementwise mode on its flat partitions (rule 7).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from spngd_ds.agreement import check_rank_agreement
from spngd_ds.agreement import enabled as agreement_enabled
from spngd_ds.optimizer import SPNGD
from spngd_ds.partitions import local_fragment, write_fragment

logger = logging.getLogger("spngd_ds")


def loss_scale(engine: Any) -> float:
    """The current fp16 loss scale (1 for fp32 and bf16)."""
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    for attr in ("loss_scale", "cur_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, int | float | torch.Tensor):
            return float(value)
    return 1.0


def attach(engine: Any, opt: SPNGD, cfg: dict[str, Any]) -> None:
    """Install SP-NGD's hooks on ``engine`` (called by :func:`spngd_ds.initialize`)."""
    stage = int(engine.zero_optimization_stage())
    opt.loss_scale_fn = lambda: loss_scale(engine)
    opt.capture.grad_scale = lambda: engine.gradient_accumulation_steps() / loss_scale(engine)
    opt.path = "fast" if stage == 0 else "compatible"
    if stage == 0:
        engine.enable_backward_allreduce = False
    else:
        opt.elementwise = True
    _wrap_step(engine, opt)
    from spngd_ds.checkpoint import wrap_checkpointing

    wrap_checkpointing(engine, opt)


def _wrap_step(engine: Any, opt: SPNGD) -> None:
    original = engine.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if not engine.is_gradient_accumulation_boundary():
            return original(*args, **kwargs)
        skipped_before = opt.stats_log.skipped_steps
        if not opt.elementwise:
            count_before = opt.step_count
            result = original(*args, **kwargs)
            if opt.step_count == count_before and opt.stats_log.skipped_steps == skipped_before:
                opt.skip_step("DeepSpeed skipped the step (overflow)")
            return result
        ok = precondition_full_grads(opt)
        opt.skip_elementwise = not ok
        calls_before = opt.elementwise_calls
        try:
            result = original(*args, **kwargs)
        finally:
            opt.skip_elementwise = False
        if ok and opt.elementwise_calls == calls_before:
            opt.skip_step("DeepSpeed skipped the step (fp16 overflow)")
        elif ok:
            rescale_full_weights(opt)
            opt.finish_step()
        return result

    def checked_step(*args: Any, **kwargs: Any) -> Any:
        boundary = engine.is_gradient_accumulation_boundary()
        result = step(*args, **kwargs)
        if boundary and int(engine.zero_optimization_stage()) < 3:  # ZeRO-3 ranks hold different shards
            check_rank_agreement(opt, engine.module.parameters(), opt.comm.device)
        return result

    engine.step = checked_step if agreement_enabled() else step


def _full_grad(p: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_grad

    g = safe_get_full_grad(p)
    if g is None:
        shape = getattr(p, "ds_shape", p.shape)
        return torch.zeros(shape, dtype=torch.float32, device=p.device)
    return g


def precondition_full_grads(opt: SPNGD) -> bool:
    """The compatible path's pre-step (module docstring). Runs on every rank; returns False when
    the step is skipped for a non-finite gradient (the statistics of the step are discarded)."""
    opt.stats_log.reset_timers()
    opt.comm.reset_bytes()
    rank = opt.comm.rank
    blocks = list(opt.blocks.values())
    kept: dict[str, list[torch.Tensor]] = {}
    dtypes: dict[int, torch.dtype] = {}
    with opt.stats_log.timer("comm"):
        for b in blocks:
            grads = []
            for p in b.params:
                g = _full_grad(p)
                dtypes[id(p)] = g.dtype
                grads.append(g.detach().clone() if opt.assignment[b.name] == rank else g)
            if opt.assignment[b.name] == rank:
                kept[b.name] = grads
    bad = any(not bool(torch.isfinite(g).all()) for gs in kept.values() for g in gs)
    if opt.comm.any_rank(bad):
        # leave the gradients as they are: an fp16 engine sees the overflow and skips its step; in
        # fp32/bf16 our elementwise step is told to do nothing
        opt.skip_step("non-finite gradient")
        return False
    opt.refresh_curvature()
    pending: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    loss_scale_now = opt.loss_scale_fn()
    with opt.stats_log.timer("precondition"):
        mine = [
            g.float() for b in opt.owned() for g in opt.precondition_block(b, kept[b.name])
        ]
    shapes: list[list[torch.Size]] = [[] for _ in range(opt.comm.world_size)]
    for b in blocks:
        shapes[opt.assignment[b.name]].extend(torch.Size(getattr(p, "ds_shape", p.shape)) for p in b.params)
    with opt.stats_log.timer("comm"):
        gathered = opt.comm.gather_from_owners(mine, shapes, torch.float32)
        cursor = [0] * opt.comm.world_size
        for b in blocks:
            owner = opt.assignment[b.name]
            for p in b.params:
                value = gathered[owner][cursor[owner]]
                cursor[owner] += 1
                pending.append((p, value))
    scale = loss_scale_now

    def write_pending() -> None:
        write_hp_grads(opt, pending, scale)
        opt.before_elementwise = write_pending if pending else None

    opt.before_elementwise = write_pending
    return True


def write_hp_grads(opt: SPNGD, pending: list[tuple[torch.nn.Parameter, torch.Tensor]], scale: float) -> None:
    """Write full preconditioned gradients into the flat fp32 gradient partitions that DeepSpeed's
    step is about to hand to SP-NGD (after DeepSpeed unscaled them, hence ``/ scale``).

    ``safe_set_full_grad`` writes copies that DeepSpeed 0.19.8 no longer reads once it has built its
    flat partition (measured: at ZeRO 1, 2 and 3 the write had no effect on the step), so we write
    where the step reads (see :mod:`spngd_ds.partitions`). ZeRO-3 calls the optimizer once per
    sub-group: entries whose partition is not being stepped now stay in ``pending``.
    """
    current = {id(p) for g in opt.param_groups for p in g["params"]}
    remaining = []
    for p, value in pending:
        frag = local_fragment(p, opt.param_groups, opt.comm.rank)
        if frag is None:  # this rank holds no element of p
            continue
        if id(frag.flat) not in current or frag.flat.grad is None:
            remaining.append((p, value))
            continue
        write_fragment(frag, frag.flat.grad, value, scale)
    pending[:] = remaining


def rescale_full_weights(opt: SPNGD) -> None:
    """Rule 8 under ZeRO: rescale full fp32 master weights that feed a BatchNorm (all ranks)."""
    if not opt.config.weight_rescale:
        return
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for b in opt.blocks.values():
        if b.name not in opt.capture.feeds_bn:
            continue
        w = b.params[0]
        full = safe_get_full_fp32_param(w)
        norm = float(torch.linalg.vector_norm(full.float()))
        target = math.sqrt(2.0 * full.shape[0])
        if norm > target:
            safe_set_full_fp32_param(w, full * (target / norm))
