"""Which layers get which curvature block."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from spngd_ds.blocks.base import Block, PlainBlock
from spngd_ds.blocks.kron import KronBlock, conv_supported
from spngd_ds.blocks.unitwise import UnitwiseBlock
from spngd_ds.staleness import RefreshSchedule


def build_blocks(
    model: nn.Module, schedule: Callable[[], RefreshSchedule], bn_damping_scale: float
) -> tuple[list[Block], list[str]]:
    """One block per supported layer, in ``named_modules`` order, plus one :class:`PlainBlock` per
    remaining trainable parameter (named ``"<param name>"``), each parameter in exactly one block.

    A layer gets no curvature block (first-order update instead) when it is of an unsupported kind,
    when only some of its parameters are trainable, or when it shares a parameter with another
    module (tied weights: one layer's Kronecker factors do not describe the summed gradient).

    Returns the blocks and, for every trainable module that falls back to first order, a line
    ``"<name> (<type>): <reason>"``.
    """
    modules = list(model.named_modules())
    users: dict[int, list[str]] = {}
    for name, module in modules:
        for p in module.parameters(recurse=False):
            users.setdefault(id(p), []).append(name or "<root>")
    blocks: list[Block] = []
    covered: set[int] = set()
    fallback: list[str] = []
    for name, module in modules:
        trainable = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not trainable:
            continue
        label = f"{name or '<root>'} ({type(module).__name__})"
        shared = sorted({u for p in module.parameters(recurse=False) for u in users[id(p)]} - {name or "<root>"})
        if shared:
            fallback.append(f"{label}: shares a parameter with {', '.join(shared)}")
            continue
        if not all(p.requires_grad for p in module.parameters(recurse=False)):
            fallback.append(f"{label}: only some of its parameters are trainable")
            continue
        block: Block | None = None
        if isinstance(module, nn.Linear) or conv_supported(module):
            block = KronBlock(name, module, schedule)  # type: ignore[arg-type]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            block = UnitwiseBlock(name, module, schedule, bn_damping_scale)
        if block is None:
            fallback.append(f"{label}: no curvature block for this layer type")
            continue
        blocks.append(block)
        covered.update(id(p) for p in block.params)
    for pname, p in model.named_parameters():  # named_parameters lists a shared parameter once
        if p.requires_grad and id(p) not in covered:
            blocks.append(PlainBlock(pname, model, [p]))
            covered.add(id(p))
    names = {id(p): n for n, p in model.named_parameters()}
    for block in blocks:
        block.param_names = [names[id(p)] for p in block.params]
    return blocks, fallback
