"""The ZeRO-compatible path (docs/design.md §3): ZeRO 1, 2, 3 and CPU offload.

DeepSpeed keeps reducing and partitioning the gradients and owns the fp32 master weights, which
the client optimizer sees as flat partitions. DeepSpeed's step, once it has reduced, flattened and
unscaled this rank's gradient partition, calls SP-NGD's ``step()``, which lands in
:meth:`CompatiblePath.step`. There, on every rank:

1. this rank's fragments of the reduced gradients (where DeepSpeed's step reads them, located by
   the ``locate`` the engine wiring passes in: :func:`spngd_ds.deepspeed.partitions.local_fragment`)
   go to the owners of their layers: one all-to-all
   (:meth:`~spngd_ds.comm.Communicator.fragments_to_owners`), no per-parameter all-reduce and no
   all-gather of full gradients;
2. one small all-reduce: a non-finite gradient anywhere skips the step; which parameters received
   a gradient on some rank;
3. due statistics are reduced to owners; owners precondition and clip by the global norm;
4. the preconditioned fragments go back to the ranks that hold them (one all-to-all) and are
   written where the step reads them (``safe_set_full_grad`` writes copies that DeepSpeed 0.19.8
   no longer reads);
5. rule 7 is applied elementwise to the flat partitions (leaving alone the elements of parameters
   that received no gradient), and rule 8 rescales the fp32 master fragments of the weights that
   feed a BatchNorm, with their global norms, *before* DeepSpeed copies them into the model.

A step SP-NGD skips sets the DeepSpeed optimizer's ``overflow`` flag, so the engine counts it as
skipped and does not advance its learning-rate scheduler. A step DeepSpeed skips itself (fp16
overflow, an invalid gradient norm) never calls SP-NGD: :meth:`after_engine_step` then discards the
step's statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from spngd_ds.assignment import assign_to_holders, block_cost
from spngd_ds.blocks.base import all_finite_many
from spngd_ds.blocks.shapes import full_shape
from spngd_ds.comm import FragmentPlan, OwnerLayout
from spngd_ds.comm.packing import Fragment
from spngd_ds.paths.base import StepOptimizer, StepPath
from spngd_ds.reductions import all_reduce_sum

#: ``(param, param_groups, rank) -> Fragment | None``: where ``param``'s elements live in the flat
#: partitions this rank steps (``None``: this rank holds none of them)
FragmentLocator = Callable[[torch.nn.Parameter, list[dict[str, Any]], int], "Fragment | None"]


class CompatiblePath(StepPath):
    """DeepSpeed's ZeRO optimizer steps the flat partitions; SP-NGD preconditions inside that step."""

    holds_flat_partitions = True

    def __init__(self, engine: Any, opt: StepOptimizer, locate: FragmentLocator) -> None:
        """Plan the fragments of ``engine``'s flat partitions (``locate``); under ZeRO 1/2 re-choose owners."""
        self.engine = engine
        self.locate = locate
        # DeepSpeed's ZeRO 1/2 step swaps ``param_groups`` for a one-group list while it calls us;
        # fragments are located in the full list, kept here
        self.groups = opt.param_groups
        if len(self.groups) != 1:
            raise RuntimeError(f"SPNGD: expected one parameter group under ZeRO, found {len(self.groups)}")
        if int(engine.zero_optimization_stage()) == 3 and len(getattr(engine.optimizer, "fp16_groups", [])) > 1:
            raise ValueError(
                "SPNGD: zero_optimization.sub_group_size splits this model into "
                f"{len(engine.optimizer.fp16_groups)} ZeRO-3 sub-groups, which DeepSpeed steps one at a time; "
                "SP-NGD preconditions all layers at once: set sub_group_size to at least the number of parameters"
            )
        self.params = [p for b in opt.blocks.values() for p in b.params]
        self.frags: list[Fragment] = []
        self.layout = self._layout(opt)
        self.plan = self._fragment_plan(opt)
        if int(engine.zero_optimization_stage()) < 3:
            self._own_what_is_held(opt)
        self.calls = 0
        self.skipped = False
        self.lrs: list[float] | None = None

    def step(self, opt: StepOptimizer) -> None:
        """Steps 1-5 of the module docstring, on the flat partition DeepSpeed hands over now."""
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("SPNGD: DeepSpeed stepped the optimizer twice in one step (several groups?)")
        self.skipped, self.lrs = False, opt.current_lrs()
        comm = opt.comm
        plan = self.plan
        pieces = [f.flat.grad.narrow(0, f.flat_start, f.numel) for f in self.frags]  # type: ignore[union-attr]
        opened = self.open_step(opt, not all_finite_many(pieces), self.params)
        if opened is None:
            return
        has_grad = opened[0]
        with opt.stats_log.timer("comm"):
            owned = iter(comm.fragments_to_owners(plan, pieces, torch.float32))
        grads = {b.name: [next(owned) for _ in b.params] for b in opt.owned()}
        opt.refresh_curvature()
        directions = opt.precondition_owned(grads)
        with opt.stats_log.timer("comm"):
            back = comm.fragments_from_owners(plan, [d for b in opt.owned() for d in directions[b.name]], torch.float32)
        for f, value in zip(self.frags, back, strict=True):
            f.flat.grad.narrow(0, f.flat_start, f.numel).copy_(value)  # type: ignore[union-attr]
        with opt.stats_log.timer("precondition"):
            frozen = self._frozen_fragments(opt, has_grad)
            for gi, group in enumerate(opt.param_groups):
                for flat in group["params"]:
                    if flat.grad is not None:
                        opt.momentum_update(flat, flat.grad, gi)
            for frag, theta, buf in frozen:
                frag.flat.narrow(0, frag.flat_start, frag.numel).copy_(theta)
                opt.state[frag.flat]["momentum_buffer"].narrow(0, frag.flat_start, frag.numel).copy_(buf)
        self._rescale(opt)

    def report_skipped(self, opt: StepOptimizer) -> None:
        """Mark the engine's optimizer as overflowed, so that DeepSpeed counts the step skipped."""
        self.skipped = True
        self.engine.optimizer.overflow = True

    def before_engine_step(self, opt: StepOptimizer) -> None:
        """Nothing to note: :meth:`step` counts its own calls."""

    def after_engine_step(self, opt: StepOptimizer) -> bool:
        """Called after DeepSpeed's step: whether SP-NGD's step was applied (then it is finished)."""
        calls, self.calls = self.calls, 0
        if calls == 0:
            opt.skip_step("DeepSpeed skipped the step (fp16 overflow or an invalid gradient norm)")
            return False
        if self.skipped:
            return False
        opt.finish_step(self.lrs)
        return True

    def _fragment(self, opt: StepOptimizer, p: torch.nn.Parameter) -> Fragment | None:
        return self.locate(p, self.groups, opt.comm.rank)

    def _layout(self, opt: StepOptimizer) -> OwnerLayout:
        """Every block parameter's full shape, in block order, with its block's owner."""
        return OwnerLayout.build(
            [(tuple(full_shape(p)), opt.assignment[b.name]) for b in opt.blocks.values() for p in b.params],
            opt.comm.world_size,
        )

    def _fragment_plan(self, opt: StepOptimizer) -> FragmentPlan:
        """Exchange the partition plan of every rank.

        Which element ranges of which parameter each rank holds (DeepSpeed's partitions are
        fixed for the run): one exchange of (item, start, length) at initialize, on every rank.
        """
        triples = []
        for k, p in enumerate(self.params):
            frag = self._fragment(opt, p)
            if frag is not None and frag.numel > 0:
                triples.append((k, frag.full_start, frag.numel))
                self.frags.append(frag)
        return opt.comm.fragment_plan(self.layout, triples)

    def _own_what_is_held(self, opt: StepOptimizer) -> None:
        """Re-choose block owners to follow DeepSpeed's partitions.

        ZeRO 1/2: re-choose owners so that each block lives on the rank whose DeepSpeed
        partition holds most of its gradient (:func:`~spngd_ds.assignment.assign_to_holders`):
        only the elements of blocks that straddle a partition boundary, or that the inversion
        balance moves, cross the wire. Every rank computes the same owners from the plan. (ZeRO-3
        splits every parameter over all ranks, so no owner holds more than 1/N of a block there.)
        """
        n = opt.comm.world_size
        per_param = [[0.0] * n for _ in self.params]  # elements of each parameter on each rank
        for rank, frags in enumerate(self.plan.fragments):
            for i, _, length in frags:
                per_param[i][rank] += length
        rows = iter(per_param)
        held = [[sum(col) for col in zip(*(next(rows) for _ in b.params), strict=True)] for b in opt.blocks.values()]
        opt.set_owners(assign_to_holders([block_cost(b) for b in opt.blocks.values()], held, n))
        self.layout = self._layout(opt)
        self.plan = FragmentPlan(self.layout, self.plan.fragments)

    def _frozen_fragments(
        self, opt: StepOptimizer, has_grad: dict[int, bool]
    ) -> list[tuple[Fragment, torch.Tensor, torch.Tensor]]:
        """Return the fragments of parameters that received no gradient.

        Fragments (with copies of their weights and momentum) of parameters that received no
        gradient on any rank: the update must leave them as they are.
        """
        out = []
        for p in self.params:
            if has_grad[id(p)]:
                continue
            frag = self._fragment(opt, p)
            if frag is None or frag.numel == 0:
                continue
            buf = opt.state[frag.flat].setdefault("momentum_buffer", torch.zeros_like(frag.flat))
            out.append(
                (
                    frag,
                    frag.flat.narrow(0, frag.flat_start, frag.numel).clone(),
                    buf.narrow(0, frag.flat_start, frag.numel).clone(),
                )
            )
        return out

    def _rescale(self, opt: StepOptimizer) -> None:
        """Rescale the weights' fp32 master fragments (rule 8).

        Rule 8 on the fp32 master fragments: one all-reduce of the squared norms of the weights
        (every rank names the same ones), then each rank scales its fragments.
        """
        weights = [(b.params[0], self._fragment(opt, b.params[0])) for b in opt.rescaled_blocks()]
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
