"""Moving curvature statistics, gradients and updates between data-parallel ranks (DESIGN.md §3).

Symmetric statistics travel as their packed upper triangle. Each rank contributes, for every owner
rank r, a list of tensors that r owns (the same shapes on every rank); :meth:`reduce_to_owners`
sums them over ranks and delivers each owner its own list (a reduce-scatter), and
:meth:`gather_from_owners` gives every rank what every owner produced (an all-gather). Both are
bucketed so that no single buffer exceeds ``bucket_numel`` elements per owner, and both count the
bytes this rank sends under the ring algorithm: (N-1)·chunk per collective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def triu_numel(d: int) -> int:
    """Length of the packed upper triangle of a (d, d) matrix."""
    return d * (d + 1) // 2


def pack_sym(matrix: torch.Tensor) -> torch.Tensor:
    """Upper triangle (row-major) of the symmetric (..., d, d) ``matrix`` as (..., d(d+1)/2)."""
    d = matrix.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=matrix.device)
    return matrix[..., rows, cols]


def unpack_sym(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_sym`: a symmetric (..., d, d) matrix."""
    rows, cols = torch.triu_indices(d, d, device=packed.device)
    out = packed.new_zeros(*packed.shape[:-1], d, d)
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out


def split_rounds(numels: Sequence[int], bucket_numel: int) -> list[list[int]]:
    """Indices of consecutive tensors of ``numels`` elements grouped greedily so that each group
    holds <= bucket_numel elements (a single larger tensor forms its own group)."""
    rounds: list[list[int]] = []
    size = 0
    for i, n in enumerate(numels):
        if rounds and size + n <= bucket_numel:
            rounds[-1].append(i)
            size += n
        else:
            rounds.append([i])
            size = n
    return rounds


class Communicator:
    """One process, no communication: the world of size 1 (the standalone optimizer)."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.bytes_sent = 0
        self.device = torch.device(device)

    def reduce_to_owners(
        self, by_owner: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype | None = None
    ) -> list[torch.Tensor]:
        """Sum over ranks of ``by_owner[self.rank]`` (each rank gives every owner's list)."""
        return [t.clone() for t in by_owner[self.rank]]

    def gather_from_owners(
        self, mine: Sequence[torch.Tensor], shapes_by_owner: Sequence[Sequence[torch.Size]], dtype: torch.dtype
    ) -> list[list[torch.Tensor]]:
        """Every owner's list of tensors (shapes given per owner), on every rank."""
        return [list(mine)]

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (a tiny all-reduce)."""
        return flag

    def reset_bytes(self) -> None:
        self.bytes_sent = 0


class DistributedCommunicator(Communicator):
    """The same contract over a ``torch.distributed`` process group (gloo or NCCL)."""

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        bucket_numel: int = 64 * 2**20,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(device)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bucket_numel = bucket_numel

    def reduce_to_owners(
        self, by_owner: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype | None = None
    ) -> list[torch.Tensor]:
        mine = by_owner[self.rank]
        out: list[torch.Tensor | None] = [None] * len(mine)
        rounds = [split_rounds([t.numel() for t in lst], self.bucket_numel) for lst in by_owner]
        for j in range(max((len(r) for r in rounds), default=0)):
            pieces = [
                [by_owner[r][i] for i in rounds[r][j]] if j < len(rounds[r]) else [] for r in range(self.world_size)
            ]
            ref = next(t for p in pieces for t in p)
            wire = dtype or ref.dtype
            flats = [
                torch.cat([t.reshape(-1).to(wire) for t in p]) if p else ref.new_zeros(0, dtype=wire) for p in pieces
            ]
            chunk = max(f.numel() for f in flats)
            send = torch.zeros(self.world_size * chunk, dtype=wire, device=ref.device)
            for r, f in enumerate(flats):
                send[r * chunk : r * chunk + f.numel()] = f
            recv = torch.empty(chunk, dtype=wire, device=ref.device)
            dist.reduce_scatter_tensor(recv, send, op=dist.ReduceOp.SUM, group=self.group)
            self.bytes_sent += (self.world_size - 1) * chunk * recv.element_size()
            if j < len(rounds[self.rank]):
                offset = 0
                for i in rounds[self.rank][j]:
                    n = mine[i].numel()
                    out[i] = recv[offset : offset + n].reshape(mine[i].shape).to(mine[i].dtype)
                    offset += n
        return [t for t in out if t is not None]

    def gather_from_owners(
        self, mine: Sequence[torch.Tensor], shapes_by_owner: Sequence[Sequence[torch.Size]], dtype: torch.dtype
    ) -> list[list[torch.Tensor]]:
        numels = [[int(torch.Size(s).numel()) for s in shapes] for shapes in shapes_by_owner]
        out: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        rounds = [split_rounds(lst, self.bucket_numel) for lst in numels]
        device = mine[0].device if mine else self.device
        for j in range(max((len(r) for r in rounds), default=0)):
            sizes = [
                sum(numels[r][i] for i in rounds[r][j]) if j < len(rounds[r]) else 0 for r in range(self.world_size)
            ]
            chunk = max(sizes)
            send = torch.zeros(chunk, dtype=dtype, device=device)
            if j < len(rounds[self.rank]):
                flat = torch.cat([mine[i].reshape(-1).to(dtype) for i in rounds[self.rank][j]])
                send[: flat.numel()] = flat
            recv = torch.empty(self.world_size * chunk, dtype=dtype, device=device)
            dist.all_gather_into_tensor(recv, send, group=self.group)
            self.bytes_sent += (self.world_size - 1) * chunk * recv.element_size()
            for r in range(self.world_size):
                if j >= len(rounds[r]):
                    continue
                offset = r * chunk
                for i in rounds[r][j]:
                    n = numels[r][i]
                    out[r].append(recv[offset : offset + n].reshape(shapes_by_owner[r][i]))
                    offset += n
        return out

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)
