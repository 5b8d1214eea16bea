"""Which rank owns which curvature block (docs/design.md §3, "Ownership").

An owner inverts its blocks and receives, through the exchange layout (:mod:`spngd_ds.comm`),
their gradients every step and their statistics' packed triangles when those are due. Ownership
balances three loads per rank at once:

- ``inversion``: the inversion cost d_A³ + d_G³ of its blocks (compute on a refresh step);
- ``elements``: gradient elements + packed statistic elements (what it receives on a step where
  every statistic is due);
- ``grad_elements``: gradient elements only (what it receives on a step where none is due, and
  what decides how well the owner ranges line up with the equal shards of the exchange).

Each load is normalised by its lower bound max(total/N, largest block), so 1.0 means "as good as
any assignment of whole blocks can be", and a rank's load is the largest of its normalised loads.
Jobs go longest first (on that combined size) to the rank whose combined load after taking the job
is least (ties: smaller sum of the normalised loads, less ``memory``, lower rank); then, when more
than one load is balanced, a local search moves or swaps blocks off the most-loaded rank while that
strictly lowers its load. Balancing
only two loads (inversion, elements) leaves one rank of ResNet-50 at N=8 with 1.46x its share of
the gradients (see tests/comm/test_assignment_bytes.py), hence the third.

For the ZeRO-compatible path, :func:`assign_to_holders` answers a different question: DeepSpeed has
already placed every gradient element on some rank's partition, and each element whose owner is
another rank crosses the wire twice a step (to the owner, and the preconditioned value back). It
gives each block to the rank holding most of its gradient elements, within a bounded loss of
inversion balance.

A load whose every cost is 0 is ignored, so ``BlockCost(name, inversion, memory)`` alone gives plain
longest-processing-time on the inversion cost with ties by memory. Deterministic given the costs (in
their order) and the world size, so every rank computes the same answer alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spngd_ds.blocks import Block

# assign_to_holders: a rank's inversion load may reach (1 + HOLDER_SLACK) x its lower bound
# max(total/N, largest block) when that keeps a block on the rank that holds its gradients. Inversion
# happens on refresh steps only (rarely, once statistics go stale); the bytes saved are paid every step.
HOLDER_SLACK = 0.25

# Bound on local-search rounds per block (each round strictly lowers the sorted vector of rank loads,
# so it ends anyway; the cap keeps the worst case predictable).
SEARCH_ROUNDS_PER_BLOCK = 4


@dataclass(frozen=True)
class BlockCost:
    """The cost of one block.

    ``inversion``: flop-like units (Σ d³ of its factors). ``memory``: elements of its factors
    (Σ d²; tie-break only). ``elements``: elements its owner receives when all its statistics are
    due (gradient + packed upper triangles). ``grad_elements``: gradient elements alone.
    """

    name: str
    inversion: float
    memory: float
    elements: float = 0.0
    grad_elements: float = 0.0

    def loads(self) -> tuple[float, float, float]:
        """The balanced loads, in the order (inversion, elements, grad_elements)."""
        return (self.inversion, self.elements, self.grad_elements)


def block_cost(block: Block) -> BlockCost:
    """The :class:`BlockCost` of a curvature block (shapes from ``ds_shape`` under ZeRO-3)."""
    from spngd_ds.blocks.shapes import full_numel

    grad = float(sum(full_numel(p) for p in block.params))
    stats = 0.0
    for s in block.stats.values():
        d = s.shape[-1]
        stats += math.prod(s.shape[:-2]) * d * (d + 1) // 2
    return BlockCost(block.name, block.inversion_cost(), block.memory_cost(), grad + stats, grad)


@dataclass(frozen=True)
class RankLoad:
    """What one rank owns under an assignment, in :class:`BlockCost` units."""

    inversion: float
    memory: float
    elements: float
    grad_elements: float
    blocks: int


def _normalised(costs: Sequence[BlockCost], world_size: int) -> list[list[float]]:
    """Per block, its loads divided by their lower bounds max(total/N, largest); all-zero loads dropped."""
    dims = []
    for k in range(3):
        vals = [c.loads()[k] for c in costs]
        bound = max(sum(vals) / world_size, max(vals, default=0.0))
        if bound > 0:
            dims.append([v / bound for v in vals])
    return [list(col) for col in zip(*dims, strict=True)] if dims else [[] for _ in costs]


def _peak(load: Sequence[float]) -> float:
    return max(load, default=0.0)


def assign_owners(costs: Sequence[BlockCost], world_size: int) -> dict[str, int]:
    """Map each block name to its owner rank in ``range(world_size)`` (see the module docstring)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len({c.name for c in costs}) != len(costs):
        raise ValueError("assign_owners: block names must be unique")
    jobs = _normalised(costs, world_size)
    k = len(jobs[0]) if jobs else 0
    order = sorted(range(len(costs)), key=lambda i: (-_peak(jobs[i]), -sum(jobs[i]), -costs[i].memory, i))
    loads = [[0.0] * k for _ in range(world_size)]
    memory = [0.0] * world_size
    owner = [0] * len(costs)

    def after(r: int, i: int) -> list[float]:
        return [a + b for a, b in zip(loads[r], jobs[i], strict=True)]

    for i in order:
        rank = min(range(world_size), key=lambda r: (_peak(after(r, i)), sum(after(r, i)), memory[r], r))
        owner[i] = rank
        loads[rank] = after(rank, i)
        memory[rank] += costs[i].memory
    if k > 1:  # one load alone: plain LPT (Graham's bound; tests pin its outcome)
        _local_search(jobs, owner, loads, SEARCH_ROUNDS_PER_BLOCK * len(costs))
    return {c.name: owner[i] for i, c in enumerate(costs)}


def _local_search(jobs: list[list[float]], owner: list[int], loads: list[list[float]], rounds: int) -> None:
    """Improve the assignment by one move or swap of blocks off the most-loaded rank.

    Move one block off the most-loaded rank, or swap it with one of another rank's, while that
    lowers the most-loaded rank's load without raising the other's to it (in place). The best
    candidate wins; ties go to the first found (blocks, then ranks, in index order; moves first).
    """
    world = len(loads)
    for _ in range(rounds):
        worst = max(range(world), key=lambda r: (_peak(loads[r]), -r))
        top = _peak(loads[worst])
        mine = [i for i, r in enumerate(owner) if r == worst]
        best: tuple[float, int, int, int | None] | None = None
        for i in mine:
            for r in range(world):
                if r == worst:
                    continue
                for j in [None, *(j for j, q in enumerate(owner) if q == r)]:
                    give = jobs[i] if j is None else [a - b for a, b in zip(jobs[i], jobs[j], strict=True)]
                    new = max(
                        _peak([a - b for a, b in zip(loads[worst], give, strict=True)]),
                        _peak([a + b for a, b in zip(loads[r], give, strict=True)]),
                    )
                    if new < top * (1 - 1e-12) and (best is None or new < best[0]):
                        best = (new, i, r, j)
        if best is None:
            return
        _, i, r, j = best
        give = jobs[i] if j is None else [a - b for a, b in zip(jobs[i], jobs[j], strict=True)]
        loads[worst] = [a - b for a, b in zip(loads[worst], give, strict=True)]
        loads[r] = [a + b for a, b in zip(loads[r], give, strict=True)]
        owner[i] = r
        if j is not None:
            owner[j] = worst


def rank_loads(costs: Sequence[BlockCost], owners: dict[str, int], world_size: int) -> list[RankLoad]:
    """Every rank's totals under ``owners`` (ranks that own nothing get zeros)."""
    acc = [[0.0, 0.0, 0.0, 0.0, 0] for _ in range(world_size)]
    for c in costs:
        row = acc[owners[c.name]]
        row[0] += c.inversion
        row[1] += c.memory
        row[2] += c.elements
        row[3] += c.grad_elements
        row[4] += 1
    return [RankLoad(float(a), float(b), float(e), float(g), int(n)) for a, b, e, g, n in acc]


def load_per_rank(costs: Sequence[BlockCost], owners: dict[str, int], world_size: int) -> list[tuple[float, float]]:
    """(inversion, memory) load of each rank under ``owners``."""
    return [(x.inversion, x.memory) for x in rank_loads(costs, owners, world_size)]


def assign_to_holders(
    costs: Sequence[BlockCost],
    held: Sequence[Sequence[float]],
    world_size: int,
    slack: float = HOLDER_SLACK,
) -> dict[str, int]:
    """Owners aligned with where the gradients already are (the ZeRO-compatible path).

    ``held[i][r]``: gradient elements of block ``costs[i]`` that rank ``r``'s partition holds
    (``len(held[i]) == world_size``). Each block starts on the rank holding most of it (ties: lower
    rank). Then, while the most inversion-loaded rank is above the cap (1 + ``slack``) x the peak
    of plain longest-first scheduling on inversion cost alone, one of its blocks moves to another
    rank: the move that stays under the cap and sends the fewest extra elements per unit of
    inversion relieved (ties: the larger block, then index and rank order); when no move stays
    under the cap, the move that lowers the peak most. Deterministic given its arguments.
    Returns block name -> owner rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    if len(held) != len(costs) or any(len(h) != world_size for h in held):
        raise ValueError("assign_to_holders: held needs one row of world_size counts per block")
    if len({c.name for c in costs}) != len(costs):
        raise ValueError("assign_to_holders: block names must be unique")
    inv = [c.inversion for c in costs]
    lpt = assign_owners([BlockCost(c.name, c.inversion, 0.0) for c in costs], world_size)
    lpt_load = [0.0] * world_size
    for c in costs:
        lpt_load[lpt[c.name]] += c.inversion
    cap = (1.0 + slack) * max(lpt_load, default=0.0)
    owner = [max(range(world_size), key=lambda r: (h[r], -r)) for h in held]
    load = [0.0] * world_size
    for i, r in enumerate(owner):
        load[r] += inv[i]
    for _ in range(SEARCH_ROUNDS_PER_BLOCK * len(costs)):
        worst = max(range(world_size), key=lambda r: (load[r], -r))
        if load[worst] <= cap:
            break
        best: tuple[tuple[float, ...], int, int] | None = None
        for i in (i for i, r in enumerate(owner) if r == worst and inv[i] > 0):
            for r in range(world_size):
                after = load[r] + inv[i]
                if r == worst or after >= load[worst]:
                    continue
                extra = (held[i][worst] - held[i][r]) / inv[i]
                key = (0.0, extra, -inv[i]) if after <= cap else (1.0, max(after, load[worst] - inv[i]), extra)
                if best is None or key < best[0]:
                    best = (key, i, r)
        if best is None:
            break
        _, i, r = best
        load[worst] -= inv[i]
        load[r] += inv[i]
        owner[i] = r
    return {c.name: owner[i] for i, c in enumerate(costs)}
