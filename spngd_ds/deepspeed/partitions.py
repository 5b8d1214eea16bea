"""Where a model parameter's elements live inside DeepSpeed's flat fp32 partitions on this rank.

ZeRO 1/2 and BF16_Optimizer describe it with ``param._hp_mapping``; ZeRO-3 with its optimizer's
``grad_position`` table. SP-NGD's compatible path writes preconditioned gradients there, and its
checkpoints read and write full-shape momentum there, because DeepSpeed 0.19.8's ``safe_set_*``
helpers write copies its step no longer reads, or need state that exists only after a step.
"""

from __future__ import annotations

from typing import Any

import torch

from spngd_ds.comm import Communicator
from spngd_ds.comm.packing import Fragment
from spngd_ds.reductions import all_reduce_sum


def local_fragment(param: torch.nn.Parameter, param_groups: list[dict[str, Any]], rank: int) -> Fragment | None:
    """The fragment of ``param`` this rank holds, or ``None``."""
    z3 = getattr(param, "_z3_optimizer", None)
    if z3 is not None:
        gidx, offset, numel = z3.grad_position[z3.get_param_id(param)]
        full_start = int(param.ds_tensor.ds_numel) * rank  # type: ignore[attr-defined]
        real = max(0, min(numel, int(param.ds_numel) - full_start))  # type: ignore[attr-defined]
        return Fragment(z3.fp32_partitioned_groups_flat[gidx], int(offset), full_start, real)
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    (flat,) = param_groups[mapping.param_group_index]["params"]  # one fp32 partition per group
    hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
    return Fragment(flat, int(hp.start), int(lp.start), int(hp.numel))


def write_fragment(frag: Fragment, target: torch.Tensor, full: torch.Tensor, scale: float = 1.0) -> None:
    """Copy this rank's part of the full-shape ``full`` into ``target``.

    Args:
        frag: Where this rank's part lies.
        target: 1-D, ``frag.flat`` or its grad or a state tensor of the same layout.
        full: The parameter-shaped tensor.
        scale: ``full`` is divided by it on the way.
    """
    if frag.numel == 0:
        return
    src = full.flatten().narrow(0, frag.full_start, frag.numel)
    target.narrow(0, frag.flat_start, frag.numel).copy_(src / scale if scale != 1.0 else src)


def gather_full(
    comm: Communicator, frag: Fragment | None, source: torch.Tensor | None, shape: torch.Size
) -> torch.Tensor:
    """Assemble the full-shape fp32 tensor from the fragments ranks hold.

    A collective over ``comm``: every rank calls it for the same parameter in the same order.

    Args:
        comm: The data-parallel communicator.
        frag: This rank's fragment of the parameter, or None.
        source: 1-D, the same layout as ``frag.flat`` (possibly on the CPU under offload), or None.
        shape: The parameter's full shape.

    Returns:
        The fp32 tensor of ``shape`` on ``comm.device``, the same on every rank.
    """
    out = torch.zeros(int(torch.Size(shape).numel()), dtype=torch.float32, device=comm.device)
    if frag is not None and source is not None and frag.numel > 0:
        out.narrow(0, frag.full_start, frag.numel).copy_(source.narrow(0, frag.flat_start, frag.numel))
    return all_reduce_sum(comm, out).reshape(shape)
