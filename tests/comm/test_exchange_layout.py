"""The exchange layout's arithmetic (spngd_ds.comm.OwnerLayout, FragmentPlan, layout_bytes) without processes.

Property checks over random item lists, and a pure-Python simulation of the collectives that follows
the split sizes element by element. The world-size-1 communicator runs the real torch code paths of
the exchange at the end.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from spngd_ds.comm import Communicator, FragmentPlan, OwnerLayout, ShardGeometry, layout_bytes

Items = list[tuple[int, int]]


def random_items(rng: random.Random, world: int) -> Items:
    """Random (numel, owner) items: owners unequal, some ranks owning nothing, some numel-0 items."""
    count = rng.choice([0, 1, 2, 5, 13])
    owners = rng.sample(range(world), k=rng.randint(1, world))  # the ranks that own something
    return [(rng.choice([0, 1, 3, 7, 40, 129]), rng.choice(owners)) for _ in range(count)]


CASES = [(seed, world) for world in range(1, 7) for seed in range(12)]


def layout_of(seed: int, world: int) -> OwnerLayout:
    return OwnerLayout.build(random_items(random.Random(seed * 31 + world), world), world)


# --------------------------------------------------------------------------------------------------
# a simulated exchange: elements are (item, index) labels, collectives move them as the splits say
# --------------------------------------------------------------------------------------------------

Label = tuple[int, int] | None  # None: padding


def labels_in_owner_order(lay: OwnerLayout) -> list[Label]:
    flat: list[Label] = [None] * lay.geometry.padded
    for i, (off, n) in enumerate(zip(lay.offsets, lay.numels, strict=True)):
        for e in range(n):
            flat[off + e] = (i, e)
    return flat


def all_to_all(sends: list[list[Label]], splits: list[tuple[list[int], list[int]]]) -> list[list[Label]]:
    """Rank r sends sends[r]'s q-th piece to q; returns what each rank receives, in holder order."""
    world = len(sends)
    pieces: list[list[list[Label]]] = []
    for r in range(world):
        send, _ = splits[r]
        assert sum(send) == len(sends[r])
        cuts = [sum(send[:q]) for q in range(world + 1)]
        pieces.append([sends[r][cuts[q] : cuts[q + 1]] for q in range(world)])
    out = []
    for q in range(world):
        _, recv = splits[q]
        got = [pieces[p][q] for p in range(world)]
        assert [len(g) for g in got] == recv  # what q expects from p is what p sends q
        out.append([x for g in got for x in g])
    return out


def simulate_to_owners(geo: ShardGeometry, flat: list[Label]) -> list[list[Label]]:
    s = geo.shard
    shards = [flat[p * s : (p + 1) * s] for p in range(geo.world_size)]
    # the all-to-all reads the shard's real (non-padding) prefix
    sends = [sh[: sum(geo.to_owner_splits(p)[0])] for p, sh in enumerate(shards)]
    return all_to_all(sends, [geo.to_owner_splits(r) for r in range(geo.world_size)])


# --------------------------------------------------------------------------------------------------
# OwnerLayout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "world"), CASES)
def test_owner_ranges_offsets_and_shards(seed: int, world: int) -> None:
    lay = layout_of(seed, world)
    geo = lay.geometry
    assert lay.total == sum(lay.numels)
    assert lay.shard == math.ceil(lay.total / world) and geo.padded == lay.shard * world
    # owner ranges: contiguous, in rank order, covering [0, P)
    end = 0
    for q in range(world):
        start, stop = lay.owner_range(q)
        assert start == end and stop - start == sum(lay.numels[i] for i in lay.owned_items[q])
        end = stop
    assert end == lay.total
    # items of an owner sit in its range in item order, back to back
    for q in range(world):
        at = lay.owner_range(q)[0]
        for i in lay.owned_items[q]:
            assert lay.owners[i] == q and lay.offsets[i] == at
            at += lay.numels[i]
    assert sorted(i for items in lay.owned_items for i in items) == list(range(len(lay.numels)))


@pytest.mark.parametrize(("seed", "world"), CASES)
def test_overlaps_partition_shards_and_owner_ranges(seed: int, world: int) -> None:
    lay = layout_of(seed, world)
    s, total = lay.shard, lay.total
    for p in range(world):
        real = max(0, min((p + 1) * s, total) - p * s)
        assert sum(lay.overlap(p, q) for q in range(world)) == real
    for q in range(world):
        assert sum(lay.overlap(p, q) for p in range(world)) == lay.geometry.counts[q]
    for r in range(world):
        send, recv = lay.to_owner_splits(r)
        assert send == [lay.overlap(r, q) for q in range(world)]
        assert recv == [lay.overlap(p, r) for p in range(world)]
        assert lay.from_owner_splits(r) == (recv, send)


@pytest.mark.parametrize(("seed", "world"), CASES)
def test_simulated_exchange_delivers_owner_ranges_and_back(seed: int, world: int) -> None:
    lay = layout_of(seed, world)
    geo = lay.geometry
    flat = labels_in_owner_order(lay)
    got = simulate_to_owners(geo, flat)
    for q in range(world):
        expect = [(i, e) for i in lay.owned_items[q] for e in range(lay.numels[i])]
        assert got[q] == expect
    # reverse: owners send their ranges, holders rebuild their shard, the all-gather rebuilds all
    back = all_to_all(got, [geo.from_owner_splits(r) for r in range(world)])
    rebuilt: list[Label] = []
    for p in range(world):
        shard = back[p] + [None] * (geo.shard - len(back[p]))
        rebuilt.extend(shard)
    assert rebuilt == flat


@pytest.mark.parametrize(("seed", "world"), CASES[::3])
@pytest.mark.parametrize("bucket_numel", [12, 30, 1000])
def test_buckets_cover_each_owner_range_in_order(seed: int, world: int, bucket_numel: int) -> None:
    lay = layout_of(seed, world)
    if lay.geometry.padded <= bucket_numel:
        assert lay.buckets(bucket_numel) == [lay.buckets()[0]] and lay.buckets()[0].geometry == lay.geometry
    elif bucket_numel < 2 * world:
        with pytest.raises(ValueError, match="too small"):
            lay.buckets(bucket_numel)
        return
    buckets = lay.buckets(bucket_numel)
    assert all(b.geometry.padded <= bucket_numel for b in buckets)
    for q in range(world):
        at = 0
        for b in buckets:
            assert b.offsets[q] == at
            at += b.geometry.counts[q]
        assert at == lay.geometry.counts[q]
    # each bucket, exchanged alone, delivers owner q the next chunk of its range
    flat = labels_in_owner_order(lay)
    delivered: list[list[Label]] = [[] for _ in range(world)]
    for b in buckets:
        segments = lay.segments(b)
        assert segments == [
            (lay.owner_range(q)[0] + b.offsets[q], b.geometry.starts[q], b.geometry.counts[q]) for q in range(world)
        ]
        bflat = [x for at, _, n in segments for x in flat[at : at + n]]
        bflat += [None] * (b.geometry.padded - len(bflat))
        for q, part in enumerate(simulate_to_owners(b.geometry, bflat)):
            delivered[q].extend(part)
    for q in range(world):
        start, stop = lay.owner_range(q)
        assert delivered[q] == flat[start:stop]


def test_buckets_stay_balanced_and_reject_tiny_buckets() -> None:
    lay = OwnerLayout.build([(1000, 0), (1000, 1), (1000, 2), (1000, 3)], 4)
    buckets = lay.buckets(600)
    assert len(buckets) >= 7 and all(b.geometry.padded <= 600 for b in buckets)
    one = layout_bytes(lay, 4)
    many = layout_bytes(lay, 4, bucket_numel=600)
    assert one == [2 * 3 * 1000 * 4] * 4  # owner ranges = shards: the all-to-all moves nothing
    # per bucket every owner gives the same chunk: nothing moves either, only rounding padding is added
    assert all(m <= o * 1.05 for m, o in zip(many, one, strict=True))
    with pytest.raises(ValueError, match="too small"):
        lay.buckets(7)


def test_empty_layouts_and_zero_sized_items() -> None:
    for world in (1, 3):
        lay = OwnerLayout.build([], world)
        assert lay.total == 0 and lay.shard == 0 and lay.offsets == ()
        assert layout_bytes(lay, 4) == [0] * world and len(lay.buckets(64)) == 1
    lay = OwnerLayout.build([(0, 1), ((2, 0, 3), 0), (5, 1), (0, 0)], 2)
    assert lay.numels == (0, 0, 5, 0) and lay.shapes[1] == (2, 0, 3)
    assert lay.owner_range(0) == (0, 0) and lay.owner_range(1) == (0, 5)
    assert lay.offsets == (0, 0, 0, 0) and lay.shard == 3
    assert lay.to_owner_splits(0) == ([0, 3], [0, 0]) and lay.to_owner_splits(1) == ([0, 2], [3, 2])


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="owner 2"):
        OwnerLayout.build([(3, 2)], 2)
    with pytest.raises(ValueError, match="world_size"):
        OwnerLayout.build([], 0)
    with pytest.raises(ValueError, match="negative"):
        OwnerLayout.build([((2, -1), 0)], 1)


# --------------------------------------------------------------------------------------------------
# layout_bytes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "world"), CASES)
def test_layout_bytes_is_ring_plus_moved_parts(seed: int, world: int) -> None:
    lay = layout_of(seed, world)
    s = lay.shard
    to = layout_bytes(lay, 2, "to")
    back = layout_bytes(lay, 2, "from")
    for r in range(world):
        if world == 1:
            assert to[r] == back[r] == 0
            continue
        moved_to = sum(lay.overlap(r, q) for q in range(world) if q != r)
        moved_from = sum(lay.overlap(p, r) for p in range(world) if p != r)
        assert to[r] == 2 * ((world - 1) * s + moved_to)
        assert back[r] == 2 * ((world - 1) * s + moved_from)
    assert layout_bytes(lay, 2) == [a + b for a, b in zip(to, back, strict=True)]


def test_balanced_owners_cost_exactly_one_all_reduce() -> None:
    """When every owner's range is its shard, to + from owners = a ring all-reduce, 2(N-1)/N·P."""
    world, per = 5, 120
    lay = OwnerLayout.build([(60, q) for q in range(world) for _ in range(2)], world)
    assert layout_bytes(lay, 4) == [2 * (world - 1) * per * 4] * world
    # one owner of everything: it sends its whole range back (from) on top of the ring
    lay = OwnerLayout.build([(600, 2)], world)
    b = layout_bytes(lay, 4)
    assert b[2] == 4 * (2 * (world - 1) * per + (600 - per))
    assert b[0] == 4 * (2 * (world - 1) * per + per)  # its whole shard goes to rank 2


# --------------------------------------------------------------------------------------------------
# FragmentPlan
# --------------------------------------------------------------------------------------------------


def random_fragments(rng: random.Random, lay: OwnerLayout) -> list[list[tuple[int, int, int]]]:
    """Cut every item at random points and deal the pieces to random ranks (zero-length ones too)."""
    per: list[list[tuple[int, int, int]]] = [[] for _ in range(lay.world_size)]
    for i, n in enumerate(lay.numels):
        cuts = sorted({0, n, *(rng.randint(0, n) for _ in range(rng.randint(0, 3)))})
        for a, b in zip(cuts, cuts[1:], strict=False):
            per[rng.randrange(lay.world_size)].append((i, a, b - a))
        if rng.random() < 0.2:
            per[rng.randrange(lay.world_size)].append((i, 0, 0))
    for frags in per:
        rng.shuffle(frags)
    return per


@pytest.mark.parametrize(("seed", "world"), CASES)
def test_fragment_routing_simulated(seed: int, world: int) -> None:
    rng = random.Random(seed)
    lay = layout_of(seed, world)
    per = random_fragments(rng, lay)
    plan = FragmentPlan(lay, tuple(tuple(f) for f in per))
    sends: list[list[Label]] = []
    for p in range(world):
        frags = plan.fragments[p]
        sends.append([(frags[j][0], frags[j][1] + e) for j in plan.send_order(p) for e in range(frags[j][2])])
    got = all_to_all(sends, [plan.to_owner_splits(r) for r in range(world)])
    for q in range(world):
        placed = [(i, s + e) for i, s, n in plan.placements(q) for e in range(n)]
        assert got[q] == placed
        assert sorted(placed) == [(i, e) for i in lay.owned_items[q] for e in range(lay.numels[i])]
    back = all_to_all(got, [plan.from_owner_splits(r) for r in range(world)])
    for p in range(world):
        assert back[p] == sends[p]
        assert plan.sent_bytes(p, 4, "to") == 4 * sum(n for i, _, n in plan.fragments[p] if lay.owners[i] != p)
        assert plan.sent_bytes(p, 4, "from") <= 4 * lay.geometry.counts[p]


def test_fragment_plan_refuses_gaps_overlaps_and_strays() -> None:
    lay = OwnerLayout.build([(10, 0), (4, 1)], 2)
    ok = ((0, 0, 6), (1, 0, 4)), ((0, 6, 4),)
    FragmentPlan(lay, ok)
    with pytest.raises(ValueError, match=r"item 0 .*gap at \[5, 6\)"):
        FragmentPlan(lay, (((0, 0, 5), (1, 0, 4)), ((0, 6, 4),)))
    with pytest.raises(ValueError, match=r"item 0 .*overlap at \[6, 7\)"):
        FragmentPlan(lay, (((0, 0, 7), (1, 0, 4)), ((0, 6, 4),)))
    with pytest.raises(ValueError, match=r"item 1 .*gap at \[0, 4\)"):
        FragmentPlan(lay, (((0, 0, 6),), ((0, 6, 4),)))
    with pytest.raises(ValueError, match="outside"):
        FragmentPlan(lay, (((0, 0, 6), (1, 2, 4)), ((0, 6, 4),)))
    with pytest.raises(ValueError, match="names item 5"):
        FragmentPlan(lay, (((5, 0, 1),), ()))
    with pytest.raises(ValueError, match="world size"):
        FragmentPlan(lay, (ok[0],))


# --------------------------------------------------------------------------------------------------
# the real exchange code at world size 1
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bucket_numel", [None, 4])
def test_single_rank_exchange_round_trips(bucket_numel: int | None) -> None:
    torch.manual_seed(0)
    comm = Communicator()
    comm.bucket_numel = bucket_numel
    lay = OwnerLayout.build([((2, 3), 0), (0, 0), ((5,), 0)], 1)
    ts = [torch.randn(2, 3), torch.randn(0), torch.randn(5, dtype=torch.float64)]
    out = comm.to_owners(lay, ts, torch.float64)
    assert [o.dtype for o in out] == [t.dtype for t in ts] and [o.shape for o in out] == [t.shape for t in ts]
    assert all(torch.equal(a, b) for a, b in zip(out, ts, strict=True))
    out[0].zero_()
    assert not torch.equal(ts[0], out[0])  # copies, not aliases
    back = comm.from_owners(lay, ts, torch.float32)
    assert [b.shape for b in back] == [torch.Size(s) for s in lay.shapes] and back[2].dtype == torch.float32
    assert torch.equal(back[2], ts[2].float())
    bf = comm.to_owners(lay, ts, torch.bfloat16)[0]
    assert torch.equal(bf, ts[0].bfloat16().float()) and not torch.equal(bf, ts[0])  # rounded on the wire
    pending = comm.to_owners_async(lay, ts, torch.float32)
    ts[0].add_(1.0)  # the input was copied into the wire buffer at issue time
    assert torch.equal(pending.wait()[0], (ts[0] - 1.0))
    with pytest.raises(RuntimeError, match="twice"):
        pending.wait()
    assert comm.bytes_sent == 0


def test_exchange_never_records_autograd() -> None:
    """Parameters handed over outside torch.no_grad() come back as plain tensors."""
    comm = Communicator()
    lay = OwnerLayout.build([((2, 2), 0)], 1)
    w = torch.nn.Parameter(torch.ones(2, 2))
    for out in (comm.from_owners(lay, [w], torch.float32)[0], comm.to_owners(lay, [w], torch.float32)[0]):
        assert not out.requires_grad and out.grad_fn is None
    plan = comm.fragment_plan(lay, [(0, 0, 4)])
    assert not comm.fragments_to_owners(plan, [w.reshape(-1)], torch.float32)[0].requires_grad
    assert not comm.fragments_from_owners(plan, [w], torch.float32)[0].requires_grad


def test_single_rank_fragments_round_trip() -> None:
    comm = Communicator()
    lay = OwnerLayout.build([((2, 3), 0), (4, 0)], 1)
    frags = [(1, 2, 2), (0, 0, 6), (1, 0, 2)]
    plan = comm.fragment_plan(lay, frags)
    full = [torch.arange(6.0).reshape(2, 3), torch.arange(10.0, 14.0)]
    pieces = [full[i].reshape(-1)[s : s + n] for i, s, n in frags]
    items = comm.fragments_to_owners(plan, pieces, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(items, full, strict=True))
    back = comm.fragments_from_owners(plan, [2 * t for t in full], torch.float32)
    assert all(torch.equal(a, 2 * b) for a, b in zip(back, pieces, strict=True))
    with pytest.raises(ValueError, match="gap"):
        comm.fragment_plan(lay, frags[:2])


def test_single_rank_device_check() -> None:
    comm = Communicator("meta")
    x = torch.zeros(4)
    calls = (lambda: comm.all_gather(x, x), lambda: comm.reduce_scatter(x, x), lambda: comm.all_to_all(x, x, [4], [4]))
    for call in calls:
        with pytest.raises(RuntimeError, match=r"on cpu, but the communicator's device is meta"):
            call()
    lay = OwnerLayout.build([(4, 0)], 1)
    out = comm.to_owners(lay, [x], torch.float32)  # inputs are copied to the communicator's device
    assert out[0].device.type == "meta"
