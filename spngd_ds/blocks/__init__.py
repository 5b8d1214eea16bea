"""Curvature blocks: one per layer, each owning its statistics, damping, inversion and preconditioning.

Free of torch.distributed and DeepSpeed so the math is tested alone.
"""

from spngd_ds.blocks.base import Block, PlainBlock, Statistic, robust_inverse
from spngd_ds.blocks.build import BlockOptions, build_blocks
from spngd_ds.blocks.kron import KronBlock
from spngd_ds.blocks.unitwise import UnitwiseBlock

__all__ = [
    "Block",
    "BlockOptions",
    "KronBlock",
    "PlainBlock",
    "Statistic",
    "UnitwiseBlock",
    "build_blocks",
    "robust_inverse",
]
