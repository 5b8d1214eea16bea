"""Which layers get which curvature block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from spngd_ds.blocks.base import Block, PlainBlock
from spngd_ds.blocks.diagonal import DiagonalConv1DBlock, DiagonalKronBlock
from spngd_ds.blocks.embedding import EmbeddingBlock, embedding_supported
from spngd_ds.blocks.kron import Conv1DBlock, KronBlock, conv_supported, is_hf_conv1d
from spngd_ds.blocks.norm import NormBlock, norm_supported
from spngd_ds.blocks.unitwise import UnitwiseBlock
from spngd_ds.staleness import RefreshSchedule


@dataclass(frozen=True)
class BlockOptions:
    """Which layer kinds get curvature, and how (the SPNGD keys of the same names)."""

    positions_as_samples: bool = True
    curvature_conv1d: bool = True
    curvature_norm: bool = True
    curvature_embedding: bool = True
    max_factor_dim: int | None = 16384


def _kron_block(
    name: str, module: nn.Module, schedule: Callable[[], RefreshSchedule], options: BlockOptions
) -> tuple[Block | None, str]:
    """The Kronecker block of a Linear / Conv2d / HF Conv1D, or ``None`` and the reason.

    Factors above ``max_factor_dim`` are kept diagonal.
    """
    conv1d = is_hf_conv1d(module)
    dims = Conv1DBlock.weight_dims(module) if conv1d else KronBlock.weight_dims(module)
    bias = int(getattr(module, "bias", None) is not None)
    limit = options.max_factor_dim
    large = limit is not None and max(dims[0], dims[1] + bias) > limit
    block: KronBlock
    if large and isinstance(module, nn.Conv2d):
        return None, f"a Kronecker factor larger than max_factor_dim = {limit}"
    if large:
        assert limit is not None
        block = (DiagonalConv1DBlock if conv1d else DiagonalKronBlock)(name, module, schedule, limit)
    else:
        block = (Conv1DBlock if conv1d else KronBlock)(name, module, schedule)  # type: ignore[arg-type]
    block.positions_as_samples = options.positions_as_samples
    return block, ""


def build_blocks(
    model: nn.Module,
    schedule: Callable[[], RefreshSchedule],
    bn_damping_scale: float,
    options: BlockOptions | None = None,
) -> tuple[list[Block], list[str]]:
    """One block per supported layer plus one plain block per remaining parameter.

    Layers in ``named_modules`` order, then one :class:`PlainBlock` per remaining trainable
    parameter (named ``"<param name>"``), each parameter in exactly one block. ``options``: the
    layer kinds switched on (default: all) and ``positions_as_samples``.

    A layer gets no curvature block (first-order update instead) when it is of an unsupported kind,
    when only some of its parameters are trainable, or when it shares a parameter with another
    module (tied weights: one layer's Kronecker factors do not describe the summed gradient).

    Returns the blocks and, for every trainable module that falls back to first order, a line
    ``"<name> (<type>): <reason>"``.
    """
    options = options or BlockOptions()
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
        reason = "no curvature block for this layer type"
        if isinstance(module, nn.Linear) or conv_supported(module):
            block, reason = _kron_block(name, module, schedule, options)
        elif is_hf_conv1d(module):
            if options.curvature_conv1d:
                block, reason = _kron_block(name, module, schedule, options)
            else:
                reason = "curvature_conv1d is off"
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            block = UnitwiseBlock(name, module, schedule, bn_damping_scale)
        elif norm_supported(module):
            if options.curvature_norm:
                block = NormBlock(name, module, schedule, bn_damping_scale, options.positions_as_samples)
            else:
                reason = "curvature_norm is off"
        elif embedding_supported(module):
            if options.curvature_embedding:
                assert isinstance(module, nn.Embedding)
                block = EmbeddingBlock(name, module, schedule, options.positions_as_samples, options.max_factor_dim)
            else:
                reason = "curvature_embedding is off"
        if block is None:
            fallback.append(f"{label}: {reason}")
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
