"""Small all-reduces over a :class:`~spngd_ds.comm.Communicator`.

Flags every rank must agree on (a non-finite gradient somewhere, which parameters received a
gradient on any rank) and sums of a few numbers (sample counts, squared norms). One collective per
call, whatever the length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from spngd_ds.comm import Communicator


def all_reduce_sum(comm: Communicator, values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``values`` (any shape, on ``comm.device``), in place, returned."""
    if comm.world_size == 1:
        return values
    comm.check_device("all_reduce_sum", values)
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=getattr(comm, "group", None))
    comm.bytes_sent += int(2 * (comm.world_size - 1) * values.numel() * values.element_size() / comm.world_size)
    return values


def any_rank_each(comm: Communicator, flags: Sequence[bool]) -> list[bool]:
    """For each flag, whether it is true on any rank (every rank gives the same number of flags)."""
    if comm.world_size == 1 or not flags:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float32, device=comm.device)
    comm.check_device("any_rank_each", t)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=getattr(comm, "group", None))
    comm.bytes_sent += int(2 * (comm.world_size - 1) * t.numel() * t.element_size() / comm.world_size)
    return [bool(v > 0) for v in t.tolist()]


def any_rank_each_and_sum(
    comm: Communicator, flags: Sequence[bool], values: torch.Tensor
) -> tuple[list[bool], torch.Tensor]:
    """:func:`any_rank_each` and :func:`all_reduce_sum` in one all-reduce.

    :func:`any_rank_each` of ``flags`` and :func:`all_reduce_sum` of ``values`` ((K,) float64, on
    ``comm.device``) in ONE all-reduce: a float64 sum of the flags as 0/1 (true on some rank: a sum
    > 0) followed by the values.
    """
    if comm.world_size == 1:
        return list(flags), values
    t = torch.cat(
        [
            torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64, device=values.device),
            values.to(torch.float64),
        ]
    )
    summed = all_reduce_sum(comm, t)
    return [bool(v > 0) for v in summed[: len(flags)].tolist()], summed[len(flags) :]
