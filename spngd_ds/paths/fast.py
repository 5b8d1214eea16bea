"""The fast path (DESIGN.md §3): the standalone optimizer and ZeRO stage 0.

One step, on every rank:

1. one small all-reduce: was any gradient non-finite on any rank (then the whole step, statistics
   included, is skipped), and which parameters received a gradient on some rank;
2. gradients are reduced to the owners of their blocks, due statistics too (refreshed and
   re-inverted there);
3. owners precondition, clip by the global norm, and apply momentum SGD (rule 7) and weight
   rescaling (rule 8) to their layers; a parameter that received no gradient is left alone;
4. every rank gathers the owners' updated parameters.

``overflow_target`` is the object whose ``overflow`` attribute DeepSpeed's engine reads after the
step (SP-NGD itself at fp32, DeepSpeed's bf16 wrapper otherwise): a skipped step sets it, so the
engine counts the step as skipped and does not advance its learning-rate scheduler.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from spngd_ds.reductions import any_rank_each

if TYPE_CHECKING:
    from spngd_ds.optimizer import SPNGD


class FastPath:
    """SP-NGD moves gradients and parameters itself (``param_groups`` hold the model's tensors, or
    DeepSpeed's per-parameter fp32 copies of them under bf16)."""

    holds_flat_partitions = False

    def __init__(self, overflow_target: Any = None) -> None:
        self.overflow_target = overflow_target

    def step(self, opt: SPNGD) -> None:
        target = self.overflow_target if self.overflow_target is not None else opt
        opt.overflow = False
        opt.stats_log.reset_timers()
        opt.comm.reset_bytes()
        live = opt._aligned()
        local_bad = any(
            p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in (live[id(q)] for q in opt._params)
        )
        with opt.stats_log.timer("comm"):
            flags = any_rank_each(opt.comm, [local_bad, *opt.received_gradient(opt._params)])
        if flags[0]:
            opt.skip_step("non-finite gradient")
            target.overflow = True
            return
        has_grad = {id(p): f for p, f in zip(opt._params, flags[1:], strict=True)}
        grads = {
            b.name: [_grad_or_zeros(live[id(p)]) for p in b.params] for b in opt.blocks.values()
        }
        owned_grads = self._reduce_gradients(opt, grads)
        opt.refresh_curvature()
        directions = opt.precondition_owned(owned_grads)
        group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        with opt.stats_log.timer("precondition"):
            for b in opt.owned():
                for p, d in zip(b.params, directions[b.name], strict=True):
                    if has_grad[id(p)]:
                        target_p = live[id(p)]
                        opt.momentum_update(target_p, d, group_of[id(target_p)])
            for b in opt.rescaled_blocks():
                if opt.assignment[b.name] == opt.comm.rank:
                    _rescale(live[id(b.params[0])], opt.rescale_target(b.params[0]))
        with opt.stats_log.timer("comm"):
            self._gather_parameters(opt, live)
        opt.finish_step(opt.current_lrs())

    @staticmethod
    def _reduce_gradients(opt: SPNGD, grads: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """Average gradients over ranks, delivered to each block's owner only."""
        if opt.comm.world_size == 1:
            return grads
        by_owner: list[list[torch.Tensor]] = [[] for _ in range(opt.comm.world_size)]
        for b in opt.blocks.values():
            by_owner[opt.assignment[b.name]].extend(grads[b.name])
        with opt.stats_log.timer("comm"):
            mine = opt.comm.reduce_to_owners(by_owner)
        out: dict[str, list[torch.Tensor]] = {}
        it = iter(mine)
        for b in opt.owned():
            out[b.name] = [next(it).div_(opt.comm.world_size) for _ in b.params]
        return out

    @staticmethod
    def _gather_parameters(opt: SPNGD, live: dict[int, nn.Parameter]) -> None:
        """Every rank receives the owners' updated parameters (the fast path's all-gather), in the
        dtype of the tensors the optimizer updates (the same on owners and ranks that own nothing)."""
        if opt.comm.world_size == 1:
            return
        shapes: list[list[torch.Size]] = [[] for _ in range(opt.comm.world_size)]
        for b in opt.blocks.values():
            shapes[opt.assignment[b.name]].extend(p.shape for p in b.params)
        mine = [live[id(p)].detach() for b in opt.owned() for p in b.params]
        dtype = live[id(opt._params[0])].dtype
        gathered = opt.comm.gather_from_owners(mine, shapes, dtype)
        cursor = [0] * opt.comm.world_size
        for b in opt.blocks.values():
            owner = opt.assignment[b.name]
            for p in b.params:
                live[id(p)].copy_(gathered[owner][cursor[owner]])
                cursor[owner] += 1


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, or zeros of p's shape when the parameter received no gradient this step."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _rescale(weight: torch.Tensor, target: float) -> None:
    """Rule 8 on a full weight: W <- W · min(1, target/||W||_F)."""
    norm = float(torch.linalg.vector_norm(weight.double()))
    if norm > target and math.isfinite(norm):
        weight.mul_(target / norm)
