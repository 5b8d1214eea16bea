"""The fast path (docs/design.md §3): the standalone optimizer and ZeRO stage 0.

One step, on every rank:

1. one small all-reduce: was any gradient non-finite on any rank (then the whole step, statistics
   included, is skipped), which parameters received a gradient on some rank, and the due
   statistics' sample counts summed over the ranks;
2. gradients are reduced to the owners of their blocks through the exchange layout
   (:class:`~spngd_ds.comm.OwnerLayout`: a reduce-scatter of equal shards and an all-to-all of
   the parts another rank owns), due statistics too (refreshed and re-inverted there);
3. owners precondition, clip by the global norm, and apply momentum SGD (rule 7) and weight
   rescaling (rule 8) to their layers; a parameter that received no gradient is left alone;
4. every rank gathers the owners' updated parameters (the same layout in reverse: an all-to-all
   and an all-gather of equal shards), and with them the owners' refresh decisions of the step's
   due statistics (docs/design.md rule 6). Nothing is padded to the most-loaded owner.

``overflow_target`` is the object whose ``overflow`` attribute DeepSpeed's engine reads after the
step (SP-NGD itself at fp32, DeepSpeed's bf16 wrapper otherwise): a skipped step sets it, so the
engine counts the step as skipped and does not advance its learning-rate scheduler.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spngd_ds.blocks.base import all_finite_device, all_finite_many
from spngd_ds.comm import OwnerLayout
from spngd_ds.decisions import decision_states, load_decisions
from spngd_ds.paths.base import StepOptimizer, StepPath
from spngd_ds.stat_exchange import Due


class FastPath(StepPath):
    """The path on which SP-NGD moves gradients and parameters itself.

    SP-NGD moves gradients and parameters itself (``param_groups`` hold the model's tensors, or
    DeepSpeed's per-parameter fp32 copies of them under bf16).
    """

    holds_flat_partitions = False

    def __init__(self, overflow_target: Any = None) -> None:
        """``overflow_target``: the object DeepSpeed reads ``overflow`` from (default: the optimizer)."""
        self.overflow_target = overflow_target
        self._layout: OwnerLayout | None = None
        self._items: list[tuple[tuple[int, ...], int]] | None = None
        self._before: tuple[int, int] | None = None

    def report_skipped(self, opt: StepOptimizer) -> None:
        """Set ``overflow`` on the object DeepSpeed reads it from."""
        target = self.overflow_target if self.overflow_target is not None else opt
        target.overflow = True

    def before_engine_step(self, opt: StepOptimizer) -> None:
        """Note the step count and skip count, which a step the engine ran through SP-NGD changes."""
        self._before = (opt.step_count, opt.stats_log.skipped_steps)

    def after_engine_step(self, opt: StepOptimizer) -> bool:
        """Report whether SP-NGD's step was applied.

        When the engine called it neither to apply nor to skip it (DeepSpeed skipped it: an
        overflow), the step is skipped here.
        """
        before, self._before = self._before, None
        if before is not None and (opt.step_count, opt.stats_log.skipped_steps) == before:
            opt.skip_step("DeepSpeed skipped the step (overflow)")
            return False
        return before is not None and opt.step_count != before[0]

    def step(self, opt: StepOptimizer) -> None:
        """Exchange gradients to owners, precondition, update, and gather the parameters back."""
        live = opt.live_parameters()
        # the step's one host synchronisation when nothing is refreshed: must it be skipped?
        present = [g for g in (live[id(q)].grad for q in opt.model_parameters) if g is not None]
        present = [g for g in present if g.numel() > 0]
        local_bad = bool(present) and not bool(all_finite_device(present)) and not all_finite_many(present)
        opened = self.open_step(opt, local_bad, opt.model_parameters, with_sample_totals=True)
        if opened is None:
            return
        has_grad, totals = opened
        grads = {b.name: [_grad_or_zeros(live[id(p)]) for p in b.params] for b in opt.blocks.values()}
        owned_grads = self._reduce_gradients(opt, grads)
        due = opt.refresh_curvature(share_decisions=False, sample_totals=totals)
        directions = opt.precondition_owned(owned_grads)
        group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        with opt.stats_log.timer("precondition"):
            per_group: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for b in opt.owned():
                for p, d in zip(b.params, directions[b.name], strict=True):
                    if has_grad[id(p)]:
                        target_p = live[id(p)]
                        ps, ds = per_group.setdefault(group_of[id(target_p)], ([], []))
                        ps.append(target_p)
                        ds.append(d)
            for gi, (ps, ds) in sorted(per_group.items()):
                opt.momentum_update_many(ps, ds, gi)
            rescaled = [b for b in opt.rescaled_blocks() if opt.assignment[b.name] == opt.comm.rank]
            _rescale_many(
                [live[id(b.params[0])] for b in rescaled], [opt.rescale_target(b.params[0]) for b in rescaled]
            )
        with opt.stats_log.timer("comm"):
            self._gather_parameters(opt, live, due)
        opt.finish_step(opt.current_lrs())

    def _param_items(self, opt: StepOptimizer) -> list[tuple[tuple[int, ...], int]]:
        """(shape, owner) of every parameter of every block, in block order (built once)."""
        if self._items is None:
            self._items = [(tuple(p.shape), opt.assignment[b.name]) for b in opt.blocks.values() for p in b.params]
        return self._items

    def _param_layout(self, opt: StepOptimizer) -> OwnerLayout:
        """Every parameter of every block, in block order, owned by its block's owner (built once)."""
        if self._layout is None:
            self._layout = OwnerLayout.build(self._param_items(opt), opt.comm.world_size)
        return self._layout

    def _reduce_gradients(
        self, opt: StepOptimizer, grads: dict[str, list[torch.Tensor]]
    ) -> dict[str, list[torch.Tensor]]:
        """Average gradients over ranks, delivered to their owners.

        Each block's gradients reach its owner only (the exchange layout: reduce-scatter of equal
        shards + all-to-all to owners).
        """
        if opt.comm.world_size == 1:
            return grads
        flat = [g for b in opt.blocks.values() for g in grads[b.name]]
        with opt.stats_log.timer("comm"):
            mine = opt.comm.to_owners(self._param_layout(opt), flat, flat[0].dtype)
        it = iter(mine)
        return {b.name: [next(it).div_(opt.comm.world_size) for _ in b.params] for b in opt.owned()}

    def _gather_parameters(self, opt: StepOptimizer, live: dict[int, nn.Parameter], due: list[Due]) -> None:
        """Deliver the owners' updated parameters to every rank.

        Every rank receives the owners' updated parameters (all-to-all back + all-gather of equal
        shards), in the dtype of the tensors the optimizer updates (the same on every rank), and the
        owners' refresh decisions of ``due`` after them in the same layout: no exchange of their own,
        unless that dtype cannot hold them exactly (then they go alone, in float64).
        """
        if opt.comm.world_size == 1:
            return
        dtype = live[id(opt.model_parameters[0])].dtype
        mine = [live[id(p)].detach() for b in opt.owned() for p in b.params]
        with_decisions = bool(due) and opt.decisions_exact_in(dtype)
        if with_decisions:
            items, states = decision_states(opt.comm, opt.assignment, due, dtype)
            layout = OwnerLayout.build([*self._param_items(opt), *items], opt.comm.world_size)
            mine += states  # owned items in item order: this rank's parameters, then its decisions
        else:
            layout = self._param_layout(opt)
            if due:
                opt.share_decisions(due)
        every = opt.comm.from_owners(layout, mine, dtype)
        params = [p for b in opt.blocks.values() for p in b.params]
        n = len(params)
        for p, owner, value in zip(params, layout.owners[:n], every[:n], strict=True):
            if owner != opt.comm.rank:
                live[id(p)].copy_(value)
        if with_decisions:
            load_decisions(due, every[n:])


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, or zeros of p's shape when the parameter received no gradient this step."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


_TARGETS: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


def _rescale_many(weights: list[torch.Tensor], targets: list[float]) -> None:
    """Rescale full weights in place (rule 8).

    Rule 8 on full weights: W <- W · min(1, target/||W||_F), each with its target, norms in
    float64, without a host synchronisation.
    """
    if not weights:
        return
    norms = torch.stack(torch._foreach_norm(weights, 2, dtype=torch.float64))
    key = (tuple(targets), norms.device)
    bound = _TARGETS.get(key)
    if bound is None:  # the targets are fixed for a run: uploaded once
        bound = _TARGETS[key] = torch.tensor(targets, dtype=torch.float64, device=norms.device)
    act = torch.isfinite(norms) & (norms > bound)
    factors = torch.where(act, bound / torch.where(act, norms, 1.0), 1.0)
    torch._foreach_mul_(weights, list(factors.to(weights[0].dtype).unbind(0)))
