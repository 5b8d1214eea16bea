"""Pieces of the distribution that need no process group.

Packed triangles, the single-rank communicator, and the owner assignment (longest job first,
docs/design.md section 3).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

import spngd_ds
from spngd_ds.assignment import BlockCost, assign_owners, load_per_rank
from spngd_ds.comm import Communicator, OwnerLayout, pack_sym, triu_numel, unpack_sym
from spngd_ds.reductions import any_rank_each, any_rank_each_and_sum

# --------------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------------


def _sym(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x = torch.randn(*shape, dtype=dtype)
    return x + x.transpose(-1, -2)


@pytest.mark.parametrize("d", [1, 2, 5, 17])
def test_pack_unpack_round_trip(d: int) -> None:
    torch.manual_seed(d)
    m = _sym(d, d)
    packed = pack_sym(m)
    assert packed.shape == (triu_numel(d),) == (d * (d + 1) // 2,)
    assert torch.equal(unpack_sym(packed, d), m)


def test_pack_layout_is_row_major_upper_triangle() -> None:
    m = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    assert pack_sym(m).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert torch.equal(unpack_sym(torch.arange(1.0, 7.0), 3), m)


def test_pack_unpack_batched() -> None:
    torch.manual_seed(0)
    m = _sym(4, 3, 2, 2)  # e.g. the (C, 2, 2) BatchNorm statistic, with an extra batch dim
    packed = pack_sym(m)
    assert packed.shape == (4, 3, 3)
    assert torch.equal(unpack_sym(packed, 2), m)
    for i in range(4):
        for j in range(3):
            assert torch.equal(packed[i, j], pack_sym(m[i, j]))


def test_packing_is_linear_so_sums_commute() -> None:
    """Reducing packed triangles equals packing the reduced matrices (what reduce-scatter relies on)."""
    torch.manual_seed(1)
    a, b = _sym(6, 6), _sym(6, 6)
    assert torch.equal(pack_sym(a) + pack_sym(b), pack_sym(a + b))
    torch.testing.assert_close(unpack_sym(pack_sym(a).float(), 6), a.float())


def test_unpack_keeps_dtype_and_ignores_lower_triangle() -> None:
    m = torch.tensor([[1.0, 2.0], [99.0, 3.0]], dtype=torch.bfloat16)  # not symmetric
    out = unpack_sym(pack_sym(m), 2)
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [[1.0, 2.0], [2.0, 3.0]]


def test_single_rank_communicator() -> None:
    comm = Communicator()
    a, b = torch.randn(3), torch.randn(2, 2)
    layout = OwnerLayout.build([(a.numel(), 0), (tuple(b.shape), 0)], 1)
    out = comm.to_owners(layout, [a, b], torch.float32)
    assert len(out) == 2 and torch.equal(out[0], a) and torch.equal(out[1], b)
    out[0].zero_()
    assert not torch.equal(a, out[0])  # a copy, not an alias
    gathered = comm.from_owners(layout, [a, b], a.dtype)
    assert len(gathered) == 2 and torch.equal(gathered[0], a) and torch.equal(gathered[1], b)
    assert any_rank_each(comm, [True, False]) == [True, False]
    counts = torch.tensor([3.0, 5.0], dtype=torch.float64)
    flags, totals = any_rank_each_and_sum(comm, [False, True], counts)
    assert flags == [False, True] and torch.equal(totals, counts)
    assert (comm.rank, comm.world_size, comm.bytes_sent) == (0, 1, 0)


def test_standalone_step_sends_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = spngd_ds.SPNGD(model)
    model(torch.randn(5, 3)).square().mean().backward()
    opt.step()
    assert opt.comm_nbytes == 0 and opt.metrics()["spngd/comm_bytes"] == 0.0
    assert set(opt.assignment.values()) == {0} and set(opt.assignment) == set(opt.blocks)
    assert opt.curvature_nbytes() > 0


# --------------------------------------------------------------------------------------------------
# assignment
# --------------------------------------------------------------------------------------------------


def _costs(values: list[float], memory: list[float] | None = None) -> list[BlockCost]:
    mem = memory or [0.0] * len(values)
    return [BlockCost(f"b{i}", v, m) for i, (v, m) in enumerate(zip(values, mem, strict=True))]


def _brute_force_makespan(values: list[float], world: int) -> float:
    best = float("inf")
    for owners in itertools.product(range(world), repeat=len(values)):
        loads = [0.0] * world
        for v, r in zip(values, owners, strict=True):
            loads[r] += v
        best = min(best, max(loads))
    return best


def test_equal_costs_split_evenly() -> None:
    costs = _costs([5.0] * 8, [1.0] * 8)
    owners = assign_owners(costs, 2)
    assert set(owners) == {c.name for c in costs}
    counts = [list(owners.values()).count(r) for r in range(2)]
    assert counts == [4, 4]
    assert load_per_rank(costs, owners, 2) == [(20.0, 4.0), (20.0, 4.0)]
    # 8 equal blocks on 3 ranks: 3, 3, 2
    assert sorted(list(assign_owners(costs, 3).values()).count(r) for r in range(3)) == [2, 3, 3]


def test_assignment_is_deterministic_and_order_independent_of_calls() -> None:
    rng = random.Random(0)
    costs = _costs([rng.choice([1.0, 8.0, 27.0, 64.0]) for _ in range(20)], [rng.random() for _ in range(20)])
    first = assign_owners(costs, 4)
    for _ in range(3):
        assert assign_owners(list(costs), 4) == first
    assert all(0 <= r < 4 for r in first.values())
    assert set(first) == {c.name for c in costs}


def test_largest_job_first_and_ties_by_memory() -> None:
    # the largest goes to rank 0, the next to rank 1, then each to the least loaded rank
    owners = assign_owners(_costs([1.0, 100.0, 60.0, 50.0]), 2)
    assert owners == {"b1": 0, "b2": 1, "b3": 1, "b0": 0}
    # equal inversion cost: the one with more memory is placed first (rank 0)
    owners = assign_owners(_costs([10.0, 10.0], [1.0, 5.0]), 2)
    assert owners == {"b1": 0, "b0": 1}
    # equal inversion loads: the rank with less memory takes the next block
    owners = assign_owners(_costs([10.0, 10.0, 3.0], [5.0, 1.0, 0.0]), 2)
    assert owners["b0"] == 0 and owners["b1"] == 1 and owners["b2"] == 1


def test_world_larger_than_blocks_and_bad_world() -> None:
    owners = assign_owners(_costs([3.0, 2.0]), 5)
    assert owners == {"b0": 0, "b1": 1}
    assert assign_owners([], 3) == {}
    with pytest.raises(ValueError, match="world_size"):
        assign_owners(_costs([1.0]), 0)


@pytest.mark.parametrize("seed", range(6))
def test_lpt_within_four_thirds_of_optimum(seed: int) -> None:
    """Graham's bound for longest-processing-time-first: makespan <= (4/3 - 1/(3m)) OPT."""
    rng = random.Random(seed)
    world = rng.choice([2, 3])
    n = 8 if world == 2 else 7
    values = [float(rng.randint(1, 40) ** 3) for _ in range(n)]
    costs = _costs(values)
    owners = assign_owners(costs, world)
    makespan = max(load for load, _ in load_per_rank(costs, owners, world))
    opt = _brute_force_makespan(values, world)
    assert makespan <= (4 / 3 - 1 / (3 * world)) * opt + 1e-9, (values, makespan, opt)


def test_lpt_worst_case_instance_is_tight() -> None:
    """The classical instance 3,3,2,2,2 on 2 ranks: LPT gives 7, the optimum is 6 (ratio 7/6)."""
    costs = _costs([3.0, 3.0, 2.0, 2.0, 2.0])
    owners = assign_owners(costs, 2)
    assert max(load for load, _ in load_per_rank(costs, owners, 2)) == 7.0
    assert _brute_force_makespan([3.0, 3.0, 2.0, 2.0, 2.0], 2) == 6.0


def test_model_assignment_balances_curvature_cost() -> None:
    """Block costs come from the layer shapes (d_A³ + d_G³): a model's blocks on 2 ranks."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 4), nn.BatchNorm1d(4)
    )
    opt = spngd_ds.SPNGD(model)
    costs = [BlockCost(b.name, b.inversion_cost(), b.memory_cost()) for b in opt.blocks.values()]
    assert opt.blocks["0"].inversion_cost() == 31**3 + 30**3
    assert opt.blocks["4"].inversion_cost() == 31**3 + 4**3
    owners = assign_owners(costs, 2)
    assert owners["0"] != owners["2"]  # the two big equal blocks go to different ranks
