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
    remaining trainable parameter (named ``"<param name>"``).

    Returns the blocks and the names of trainable modules that fall back to first order.
    """
    blocks: list[Block] = []
    covered: set[int] = set()
    fallback: list[str] = []
    for name, module in model.named_modules():
        trainable = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not trainable:
            continue
        block: Block | None = None
        if isinstance(module, nn.Linear) or conv_supported(module):
            if all(p.requires_grad for p in module.parameters(recurse=False)):
                block = KronBlock(name, module, schedule)  # type: ignore[arg-type]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            if all(p.requires_grad for p in module.parameters(recurse=False)):
                block = UnitwiseBlock(name, module, schedule, bn_damping_scale)
        if block is None:
            fallback.append(f"{name or '<root>'} ({type(module).__name__})")
            continue
        blocks.append(block)
        covered.update(id(p) for p in block.params)
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            blocks.append(PlainBlock(pname, model, [p]))
    names = {id(p): n for n, p in model.named_parameters()}
    for block in blocks:
        block.param_names = [names[id(p)] for p in block.params]
    return blocks, fallback
