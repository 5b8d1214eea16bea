"""Due statistics on their way to the owners of their blocks (docs/design.md §3, rule 6).

Every rank sends the packed upper triangles of its local sums of the step's due statistics to
their owners through the exchange layout (:class:`~spngd_ds.comm.OwnerLayout`): a reduce-scatter
of equal shards and an all-to-all of the parts another rank owns. A factors may already be in
flight, sent behind the backward (:class:`EarlyFactors`, :mod:`spngd_ds.paths.overlap`); the step
then only waits for them. What the owner does with what arrives is :mod:`spngd_ds.refresh`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from spngd_ds.blocks import Block
from spngd_ds.blocks.base import Statistic
from spngd_ds.comm import DTYPES, Communicator, OwnerLayout, PendingToOwners, pack_sym, unpack_sym
from spngd_ds.metrics import StepMetrics
from spngd_ds.reductions import all_reduce_sum

#: a due statistic of a block, in the order every rank agrees on
Due = tuple[Block, Statistic]


@dataclass
class EarlyFactors:
    """Due A factors whose exchange to owners is in flight.

    ``stats``: (block, statistic) pairs in block order; ``counts``: this rank's sample count of each;
    ``pending``: the exchange (its ``wait()`` returns the owned ones' global sums, packed);
    ``nbytes``: what starting it sent (counted into the step's ``comm_nbytes``).
    """

    stats: list[Due]
    counts: list[float]
    pending: PendingToOwners
    nbytes: int

    def ids(self) -> set[int]:
        """``id`` of every statistic in flight."""
        return {id(s) for _, s in self.stats}


def pack_statistics(
    comm: Communicator,
    owners: dict[str, int],
    comm_dtype: str,
    stats: list[Due],
    sums: list[torch.Tensor | None],
    divisors: list[float] | None = None,
) -> tuple[list[torch.Tensor], OwnerLayout, torch.dtype]:
    """Pack this rank's statistics for their exchange to the owners.

    What goes to the owners for ``stats`` ((block, statistic) pairs, every rank the same
    list): the packed upper triangles (d(d+1)/2 elements of a (d, d) sum, or of each (k, d, d)
    slice) of this rank's ``sums`` (zeros where ``None``: the rank takes part anyway), each divided
    by its divisor when one is given and > 0; their exchange layout (each owned by its block's
    owner in ``owners``); the wire dtype (``comm_dtype``, float64 for a float64 model, whose
    references are exact).
    """
    packed = []
    for i, ((b, s), total) in enumerate(zip(stats, sums, strict=True)):
        if total is None:
            total = torch.zeros(s.shape, dtype=b.dtype, device=comm.device)
        p = pack_sym(total)
        if divisors is not None and divisors[i] > 0:
            p = p / divisors[i]
        packed.append(p)
    layout = OwnerLayout.build(
        [(p.numel(), owners[b.name]) for p, (b, _) in zip(packed, stats, strict=True)], comm.world_size
    )
    wire = torch.float64 if any(p.dtype == torch.float64 for p in packed) else DTYPES[comm_dtype]
    return packed, layout, wire


def statistics_to_owners(
    comm: Communicator,
    owners: dict[str, int],
    comm_dtype: str,
    log: StepMetrics,
    due: list[Due],
    sample_totals: torch.Tensor | None,
    local_counts: Callable[[list[Due]], torch.Tensor],
    take_early: Callable[[], EarlyFactors | None],
) -> tuple[list[tuple[Block, Statistic, float]], list[torch.Tensor | None], bool] | None:
    """Reduce the due statistics ``due`` to their owners; ``None`` when nothing is due.

    Returns the statistics this rank owns with their global sample counts, their global sums
    (unpacked to the statistic's shape; with one rank the local sums themselves, ``None`` where
    nothing was captured), and whether the sums arrived divided by their counts (fp16 wire: the
    global mean cannot overflow fp16; the owner multiplies back).

    Sample counts are summed over all ranks first (one small all-reduce of ``local_counts(due)``,
    (len(due),) float64, unless the caller gives ``sample_totals``, the same already summed).
    ``take_early()`` hands over the A factors sent behind the backward, if any (the step only waits
    for them; the bytes their sending counted join this step's).
    """
    rank = comm.rank
    if comm.world_size == 1:  # nothing to exchange: the local sums are the global ones
        if not due:
            return None
        local = [s.take_local() for _, s in due]
        counts = [float(c) for _, c in local] if sample_totals is None else [float(c) for c in sample_totals]
        return [(b, s, count) for (b, s), count in zip(due, counts, strict=True)], [t for t, _ in local], False
    if due and sample_totals is None:
        with log.timer("comm"):
            sample_totals = all_reduce_sum(comm, local_counts(due))
    early = take_early()
    if not due:
        if early is not None:  # cannot happen (A is sent only when due); keep the ranks in step anyway
            early.pending.wait()
        return None
    assert sample_totals is not None
    if early is not None:  # sent before the step began counting its bytes
        comm.bytes_sent += early.nbytes
    sent = early.ids() if early is not None else set()
    late = [(b, s) for b, s in due if id(s) not in sent]
    local = [s.take_local() for _, s in late]
    totals = dict(zip((id(s) for _, s in due), sample_totals.tolist(), strict=True))
    prescale = comm_dtype == "fp16"
    # the global mean cannot overflow fp16; the owner multiplies back
    divisors = [totals[id(s)] for _, s in late] if prescale else None
    packed_all, layout, wire = pack_statistics(comm, owners, comm_dtype, late, [t for t, _ in local], divisors)
    with log.timer("comm"):
        got: dict[int, torch.Tensor] = {}
        if late:
            got.update(
                zip(
                    (id(s) for b, s in late if owners[b.name] == rank),
                    comm.to_owners(layout, packed_all, wire),
                    strict=True,
                )
            )
        if early is not None:
            got.update(
                zip((id(s) for b, s in early.stats if owners[b.name] == rank), early.pending.wait(), strict=True)
            )
    mine = [(b, s, totals[id(s)]) for b, s in due if owners[b.name] == rank]
    sums: list[torch.Tensor | None] = [unpack_sym(got[id(s)], s.shape[-1]) for _, s, _ in mine]
    return mine, sums, prescale
