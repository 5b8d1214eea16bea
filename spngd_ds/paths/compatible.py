"""The ZeRO-compatible path (DESIGN.md §3): ZeRO 1, 2, 3 and CPU offload.

DeepSpeed keeps reducing and partitioning the gradients and owns the fp32 master weights, which
the client optimizer sees as flat partitions. Between ``engine.backward`` on the boundary
micro-batch and DeepSpeed's step, :meth:`CompatiblePath.before_engine_step` runs on every rank:

1. every rank reads the full averaged gradient of every parameter (``safe_get_full_grad``, a
   collective under ZeRO: all ranks, same order) and keeps those of the blocks it owns;
2. one small all-reduce: a non-finite gradient anywhere skips the step; which parameters
   received a gradient on some rank;
3. due statistics are reduced to owners; owners precondition and clip by the global norm;
4. the preconditioned gradients are gathered from the owners.

DeepSpeed's step then calls :meth:`CompatiblePath.step` (SP-NGD's ``step()``) on its flat
partitions, possibly once per partition group: the preconditioned gradients are written where
that step reads them (:mod:`spngd_ds.partitions`; ``safe_set_full_grad`` writes copies that
DeepSpeed 0.19.8 no longer reads), rule 7 is applied elementwise (leaving alone the elements of
parameters that received no gradient), and rule 8 rescales the fp32 master fragments of the
weights that feed a BatchNorm, with their global norm, *before* DeepSpeed copies them into the
model's weights. A skipped step sets the DeepSpeed optimizer's ``overflow`` flag, so the engine
counts it as skipped and does not advance its learning-rate scheduler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from spngd_ds.blocks.shapes import full_shape
from spngd_ds.partitions import Fragment, local_fragment, write_fragment
from spngd_ds.reductions import all_reduce_sum, any_rank_each

if TYPE_CHECKING:
    from spngd_ds.optimizer import SPNGD


class CompatiblePath:
    """DeepSpeed's ZeRO optimizer steps the flat partitions; SP-NGD preconditions before it."""

    holds_flat_partitions = True

    def __init__(self, engine: Any, opt: SPNGD) -> None:
        self.engine = engine
        # DeepSpeed's ZeRO 1/2 step swaps ``param_groups`` for a one-group list while it calls us;
        # fragments are located in the full list, kept here
        self.groups = opt.param_groups
        self.pending: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.skip = False
        self.has_grad: dict[int, bool] = {}
        self.lrs: list[float] | None = None
        self.calls = 0
        if len(opt.param_groups) != 1:
            raise RuntimeError(f"SPNGD: expected one parameter group under ZeRO, found {len(opt.param_groups)}")

    # -- before DeepSpeed's step ------------------------------------------------------------------------
    def before_engine_step(self, opt: SPNGD) -> None:
        """Steps 1-4 of the module docstring (every rank)."""
        opt.stats_log.reset_timers()
        opt.comm.reset_bytes()
        self.calls, self.lrs, self.pending, self.skip = 0, None, [], False
        rank = opt.comm.rank
        params = [p for b in opt.blocks.values() for p in b.params]
        scale = _loss_scale(self.engine)  # the scale of this step's backward (fp16; else 1)
        kept: dict[str, list[torch.Tensor]] = {}
        with opt.stats_log.timer("comm"):
            for b in opt.blocks.values():
                grads = [_full_grad(p) for p in b.params]
                if opt.assignment[b.name] == rank:
                    kept[b.name] = [g.detach() / scale for g in grads]
        bad = any(not bool(torch.isfinite(g).all()) for gs in kept.values() for g in gs)
        with opt.stats_log.timer("comm"):
            flags = any_rank_each(opt.comm, [bad, *opt.received_gradient(params)])
        if flags[0]:
            # gradients stay as they are: an fp16 engine sees the overflow and skips its step; in
            # fp32/bf16 our step() is told to do nothing and to report the overflow
            opt.skip_step("non-finite gradient")
            self.skip = True
            return
        self.has_grad = {id(p): f for p, f in zip(params, flags[1:], strict=True)}
        opt.refresh_curvature()
        directions = opt.precondition_owned(kept)
        mine = [d.float() for b in opt.owned() for d in directions[b.name]]
        shapes: list[list[torch.Size]] = [[] for _ in range(opt.comm.world_size)]
        for b in opt.blocks.values():
            shapes[opt.assignment[b.name]].extend(full_shape(p) for p in b.params)
        with opt.stats_log.timer("comm"):
            gathered = opt.comm.gather_from_owners(mine, shapes, torch.float32)
        cursor = [0] * opt.comm.world_size
        for b in opt.blocks.values():
            owner = opt.assignment[b.name]
            for p in b.params:
                self.pending.append((p, gathered[owner][cursor[owner]]))
                cursor[owner] += 1

    # -- DeepSpeed's step calls SPNGD.step(), which lands here ----------------------------------------
    def step(self, opt: SPNGD) -> None:
        """Rule 7 (and 8) on the flat partitions DeepSpeed hands over now."""
        self.calls += 1
        if self.skip:
            self.engine.optimizer.overflow = True
            return
        if self.lrs is None:
            self.lrs = opt.current_lrs()
        current = [p for g in opt.param_groups for p in g["params"]]
        current_ids = {id(p) for p in current}
        self._write_pending(opt, current_ids)
        frozen = self._frozen_fragments(opt, current_ids)
        for gi, group in enumerate(opt.param_groups):
            for flat in group["params"]:
                if flat.grad is not None:
                    opt.momentum_update(flat, flat.grad, gi)
        for frag, theta, buf in frozen:
            frag.flat.narrow(0, frag.flat_start, frag.numel).copy_(theta)
            opt.state[frag.flat]["momentum_buffer"].narrow(0, frag.flat_start, frag.numel).copy_(buf)
        self._rescale(opt, current_ids)

    def after_engine_step(self, opt: SPNGD) -> bool:
        """Called after DeepSpeed's step: whether SP-NGD's step was applied (then the step is finished)."""
        if self.skip:
            return False
        if self.calls == 0:
            opt.skip_step("DeepSpeed skipped the step (fp16 overflow)")
            return False
        opt.finish_step(self.lrs)
        return True

    def _fragment(self, opt: SPNGD, p: torch.nn.Parameter) -> Fragment | None:
        return local_fragment(p, self.groups, opt.comm.rank)

    def _write_pending(self, opt: SPNGD, current_ids: set[int]) -> None:
        """Write full preconditioned gradients into the flat fp32 gradient partitions that DeepSpeed's
        step is about to use (unscaled, as DeepSpeed has made them by then). ZeRO-3 steps one
        sub-group at a time: entries whose partition is not being stepped now stay pending."""
        remaining = []
        for p, value in self.pending:
            frag = self._fragment(opt, p)
            if frag is None:  # this rank holds no element of p
                continue
            if id(frag.flat) not in current_ids or frag.flat.grad is None:
                remaining.append((p, value))
                continue
            write_fragment(frag, frag.flat.grad, value)
        self.pending = remaining

    def _frozen_fragments(
        self, opt: SPNGD, current_ids: set[int]
    ) -> list[tuple[Fragment, torch.Tensor, torch.Tensor]]:
        """Fragments (with copies of their weights and momentum) of parameters that received no
        gradient on any rank: the update below must leave them as they are."""
        out = []
        for b in opt.blocks.values():
            for p in b.params:
                if self.has_grad.get(id(p), True):
                    continue
                frag = self._fragment(opt, p)
                if frag is None or frag.numel == 0 or id(frag.flat) not in current_ids:
                    continue
                buf = opt.state[frag.flat].setdefault("momentum_buffer", torch.zeros_like(frag.flat))
                out.append((frag, frag.flat.narrow(0, frag.flat_start, frag.numel).clone(),
                            buf.narrow(0, frag.flat_start, frag.numel).clone()))
        return out

    def _rescale(self, opt: SPNGD, current_ids: set[int]) -> None:
        """Rule 8 on the fp32 master fragments: one all-reduce of the squared norms of the weights
        stepped in this call, then each rank scales its fragments. ZeRO 1/2 call once per step (SP-NGD
        has one parameter group); ZeRO-3 once per sub-group, each rank holding a fragment of every
        weight in the same sub-group, so every rank names the same weights."""
        weights: list[tuple[torch.nn.Parameter, Fragment | None]] = []
        for b in opt.rescaled_blocks():
            w = b.params[0]
            frag = self._fragment(opt, w)
            here = frag is not None and id(frag.flat) in current_ids
            if getattr(w, "_z3_optimizer", None) is not None and not here:
                continue
            weights.append((w, frag if here else None))
        if not weights:
            return
        sq = torch.zeros(len(weights), dtype=torch.float64, device=opt.comm.device)
        for i, (_, frag) in enumerate(weights):
            if frag is not None and frag.numel > 0:
                sq[i] = torch.sum(frag.flat.narrow(0, frag.flat_start, frag.numel).double() ** 2).to(sq.device)
        all_reduce_sum(opt.comm, sq)
        for (w, frag), total in zip(weights, sq.tolist(), strict=True):
            norm, target = total**0.5, opt.rescale_target(w)
            if frag is not None and frag.numel > 0 and norm > target:
                frag.flat.narrow(0, frag.flat_start, frag.numel).mul_(target / norm)


def _full_grad(p: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_grad

    g = safe_get_full_grad(p)
    if g is None:
        return torch.zeros(full_shape(p), dtype=torch.float32, device=p.device)
    return g


def _loss_scale(engine: Any) -> float:
    """The current fp16 loss scale (1 for fp32 and bf16)."""
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    for attr in ("loss_scale", "cur_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, int | float | torch.Tensor):
            return float(value)
    return 1.0
