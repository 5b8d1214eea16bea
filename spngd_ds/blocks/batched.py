"""Preconditioning many blocks at once: one batched product per group of equal shapes.

A ResNet has dozens of convolutions of a handful of shapes and dozens of BatchNorms: preconditioning
them one by one costs a few kernel launches per layer. Here, Kronecker blocks without a bias whose
gradients have the same shape and dtype are preconditioned together, Ĝ⁻¹ M Â⁻¹ by two ``bmm`` on
stacks (B, d_G, d_G), (B, d_G, d_A), (B, d_A, d_A), and every unit-wise (BatchNorm) block of one
dtype by one ``bmm`` on (ΣC, 2, 2). The inverses live in persistent stacks: each statistic's
``inverse`` is a view of its slot, so nothing is stacked again on a step that refreshes nothing,
and a re-inverted statistic is copied into its slot. A block of another kind, one that overrides
``precondition``, or one alone in its group takes :meth:`Block.precondition`.
"""

from __future__ import annotations

import torch

from spngd_ds.blocks.base import Block, Statistic
from spngd_ds.blocks.kron import KronBlock
from spngd_ds.blocks.unitwise import UnitwiseBlock

_Key = tuple[object, ...]


class BatchedPreconditioner:
    """The persistent inverse stacks of one optimizer and the batched ``precondition`` over them."""

    def __init__(self) -> None:
        """Start with no stacks."""
        #: group key -> (ids of the member statistics, the stacks, per stack the member views)
        self._stacks: dict[_Key, tuple[tuple[int, ...], list[torch.Tensor], list[list[torch.Tensor]]]] = {}

    def precondition(self, blocks: list[Block], grads: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """P(∇) of every block of ``blocks`` (``grads``: name -> gradients in ``params`` order).

        The plain gradient for a block that is not ready.
        """
        out: dict[str, list[torch.Tensor]] = {}
        kron: dict[_Key, list[KronBlock]] = {}
        unit: dict[_Key, list[UnitwiseBlock]] = {}
        for b in blocks:
            g = grads[b.name]
            if not b.ready():
                out[b.name] = g
            elif (
                isinstance(b, KronBlock)
                and not b.has_bias
                and type(b).precondition is KronBlock.precondition
                and type(b).grad_matrix is KronBlock.grad_matrix
            ):  # the (d_G, d_A) weight layout
                kron.setdefault(("kron", b.d_G, b.d_A, b.dtype, tuple(g[0].shape), g[0].dtype, g[0].device), []).append(
                    b
                )
            elif type(b).precondition is UnitwiseBlock.precondition and isinstance(b, UnitwiseBlock):
                unit.setdefault(("unit", b.dtype, g[0].dtype, g[0].device), []).append(b)
            else:
                out[b.name] = b.precondition(g)
        used: set[_Key] = set()
        for key, members in kron.items():
            if len(members) == 1:
                out[members[0].name] = members[0].precondition(grads[members[0].name])
                continue
            used.add(key)
            g_inv, a_inv = self._stacked(
                key, [[b.stats["G"] for b in members], [b.stats["A"] for b in members]], concat=False
            )
            first = grads[members[0].name][0]
            m = torch.stack([grads[b.name][0] for b in members]).view(len(members), members[0].d_G, members[0].d_A)
            p = torch.bmm(torch.bmm(g_inv, m.to(g_inv.dtype)), a_inv)
            for b, d in zip(members, p.to(first.dtype).view(len(members), *first.shape).unbind(0), strict=True):
                out[b.name] = [d]
        for key, units in unit.items():
            used.add(key)
            (inv,) = self._stacked(key, [[b.stats["F"] for b in units]], concat=True)
            first = grads[units[0].name][0]
            pairs = torch.stack(
                [torch.cat([grads[b.name][0] for b in units]), torch.cat([grads[b.name][1] for b in units])], dim=-1
            ).to(inv.dtype)  # (ΣC, 2)
            p = torch.bmm(inv, pairs.unsqueeze(-1)).squeeze(-1).t().to(first.dtype).contiguous()  # (2, ΣC)
            sizes = [b.channels for b in units]
            gammas, betas = (row.split(sizes) for row in p.unbind(0))
            for b, gamma, beta in zip(units, gammas, betas, strict=True):
                out[b.name] = [gamma, beta]
        for key in [k for k in self._stacks if k not in used]:
            del self._stacks[key]
        return {b.name: out[b.name] for b in blocks}

    def _stacked(self, key: _Key, stats: list[list[Statistic]], concat: bool) -> list[torch.Tensor]:
        """Stacked inverses of ``stats``, one stack per list, kept across steps.

        One stack per list of ``stats`` of their inverses (``torch.stack``, or ``torch.cat`` along
        dim 0 when ``concat``); each statistic's ``inverse`` becomes a view of its slot. Built again
        only when the members change; a statistic re-inverted since is copied into its slot.
        """
        members = tuple(id(s) for group in stats for s in group)
        hit = self._stacks.get(key)
        if hit is None or hit[0] != members:
            stacks, views = [], []
            for group in stats:
                inverses = [s.inverse for s in group]
                assert all(t is not None for t in inverses)
                if concat:
                    stack = torch.cat(inverses)  # type: ignore[arg-type]
                    slots = list(stack.split([t.shape[0] for t in inverses]))  # type: ignore[union-attr]
                else:
                    stack = torch.stack(inverses)  # type: ignore[arg-type]
                    slots = list(stack.unbind(0))
                for s, slot in zip(group, slots, strict=True):
                    s.inverse = slot
                stacks.append(stack)
                views.append(slots)
            self._stacks[key] = (members, stacks, views)
            return stacks
        _, stacks, views = hit
        for group, slots in zip(stats, views, strict=True):
            for s, slot in zip(group, slots, strict=True):
                if s.inverse is not slot:
                    assert s.inverse is not None
                    slot.copy_(s.inverse)
                    s.inverse = slot
        return stacks
