"""Which rank owns which curvature block (DESIGN.md §3, "Ownership").

Longest job first on the inversion cost d_A³ + d_G³, ties broken by memory d_A² + d_G², each job
going to the rank with the least inversion load so far (then least memory, then lowest rank).
Deterministic given the blocks and the world size, so every rank computes the same answer alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockCost:
    """The cost of one block: ``inversion`` (flop-like units) and ``memory`` (elements)."""

    name: str
    inversion: float
    memory: float


def assign_owners(costs: Sequence[BlockCost], world_size: int) -> dict[str, int]:
    """Map each block name to its owner rank in ``range(world_size)``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i].inversion, -costs[i].memory, i))
    loads = [(0.0, 0.0) for _ in range(world_size)]
    owners: dict[str, int] = {}
    for i in order:
        rank = min(range(world_size), key=lambda r: (loads[r][0], loads[r][1], r))
        owners[costs[i].name] = rank
        loads[rank] = (loads[rank][0] + costs[i].inversion, loads[rank][1] + costs[i].memory)
    return owners


def load_per_rank(costs: Sequence[BlockCost], owners: dict[str, int], world_size: int) -> list[tuple[float, float]]:
    """(inversion, memory) load of each rank under ``owners``."""
    loads = [[0.0, 0.0] for _ in range(world_size)]
    for c in costs:
        loads[owners[c.name]][0] += c.inversion
        loads[owners[c.name]][1] += c.memory
    return [(a, b) for a, b in loads]
