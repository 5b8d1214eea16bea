"""Tests of spngd_ds.comm.layout alone, with plain Python lists.

spngd_ds.comm.layout alone: the exchange layout's arithmetic checked with plain Python lists (no
tensors, no process group). A hand-worked three-rank example, then properties over seeded random
layouts: equal shards, offsets that tile the buffer, balanced buckets, a rank that owns nothing, and
a simulated exchange (reduce-scatter, all-to-all, all-gather on lists of integers) whose pack into
bucket buffers and unpack out of them gives back every owner's sums.
"""

from __future__ import annotations

import ast
import math
import random
from pathlib import Path

import pytest

from spngd_ds.comm import layout as layout_module
from spngd_ds.comm.layout import Bucket, OwnerLayout, ShardGeometry, layout_bytes


def random_layout(seed: int, world: int) -> OwnerLayout:
    """Seeded random items and owners for the layout tests.

    Seeded random items (shapes of 0-3 dimensions, some empty), owners drawn from a random subset of
    the ranks, so that some ranks own nothing.
    """
    rng = random.Random(1000 * world + seed)
    owners = rng.sample(range(world), k=rng.randint(1, world))
    items = []
    for _ in range(rng.randint(0, 9)):
        shape = tuple(rng.choice([0, 1, 2, 3, 5, 17]) for _ in range(rng.randint(0, 3)))
        items.append((shape, rng.choice(owners)))
    return OwnerLayout.build(items, world)


CASES = [(seed, world) for world in (1, 2, 3, 4, 7) for seed in range(10)]


# --------------------------------------------------------------------------------------------------
# the module itself
# --------------------------------------------------------------------------------------------------


def test_layout_imports_only_the_standard_library() -> None:
    """The layout is arithmetic: no torch, no torch.distributed, no other spngd_ds module."""
    allowed = {"__future__", "math", "collections.abc", "dataclasses", "functools", "itertools", "typing"}
    tree = ast.parse(Path(layout_module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= allowed, f"spngd_ds/comm/layout.py imports {sorted(imported - allowed)}"


# --------------------------------------------------------------------------------------------------
# a hand-worked example: owners hold 5, 0 and 4 elements on 3 ranks
# --------------------------------------------------------------------------------------------------


def test_hand_worked_three_ranks_with_an_empty_owner() -> None:
    # items: 2x2 and 1 owned by rank 0, 4 owned by rank 2; rank 1 owns nothing
    lay = OwnerLayout.build([((2, 2), 0), (4, 2), (1, 0)], 3)
    assert lay.numels == (4, 4, 1)
    assert lay.geometry.counts == (5, 0, 4)
    assert lay.total == 9 and lay.shard == 3 and lay.geometry.padded == 9
    assert lay.owned_items == ((0, 2), (), (1,))
    assert lay.offsets == (0, 5, 4)  # rank 0's items first (item order), then rank 2's
    assert [lay.owner_range(q) for q in range(3)] == [(0, 5), (5, 5), (5, 9)]
    # shards [0,3) [3,6) [6,9) against ranges [0,5) [5,5) [5,9)
    table = [[lay.overlap(p, q) for q in range(3)] for p in range(3)]
    assert table == [[3, 0, 0], [2, 0, 1], [0, 0, 3]]
    assert lay.to_owner_splits(1) == ([2, 0, 1], [0, 0, 0])
    assert lay.from_owner_splits(1) == ([0, 0, 0], [2, 0, 1])
    assert lay.to_owner_splits(2) == ([0, 0, 3], [0, 1, 3])
    # ring reduce-scatter (N-1)*S = 6, plus the real part of the shard that others own
    assert [lay.geometry.sent_elements(r, "to") for r in range(3)] == [6 + 0, 6 + 3, 6 + 0]
    # ring all-gather 6, plus the part of the rank's own range that other ranks hold
    assert [lay.geometry.sent_elements(r, "from") for r in range(3)] == [6 + 2, 6 + 0, 6 + 1]
    assert layout_bytes(lay, 4, "both") == [4 * 14, 4 * 15, 4 * 13]


def test_one_rank_sends_nothing() -> None:
    lay = OwnerLayout.build([(7, 0), ((3, 3), 0)], 1)
    assert lay.shard == lay.total == 16
    assert lay.to_owner_splits(0) == ([16], [16])
    assert layout_bytes(lay, 2) == [0]


def test_bad_geometries_and_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="world size"):
        ShardGeometry(())
    with pytest.raises(ValueError, match="negative"):
        ShardGeometry((3, -1))
    with pytest.raises(ValueError, match="outside range"):
        OwnerLayout.build([(3, 2)], 2)
    with pytest.raises(ValueError, match="world_size"):
        OwnerLayout.build([], 0)


# --------------------------------------------------------------------------------------------------
# properties over random layouts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "world"), CASES)
def test_offsets_tile_the_buffer_in_owner_order(seed: int, world: int) -> None:
    lay = random_layout(seed, world)
    assert lay.total == sum(lay.numels) == sum(lay.geometry.counts)
    assert lay.numels == tuple(math.prod(s) for s in lay.shapes)
    at = 0
    for q in range(world):
        start, end = lay.owner_range(q)
        assert start == at and end - start == sum(lay.numels[i] for i in lay.owned_items[q])
        for i in lay.owned_items[q]:  # an owner's items lie back to back, in item order
            assert lay.owners[i] == q and lay.offsets[i] == at
            at += lay.numels[i]
        assert at == end
    assert at == lay.total
    assert sorted(i for items in lay.owned_items for i in items) == list(range(len(lay.numels)))


@pytest.mark.parametrize(("seed", "world"), CASES)
def test_equal_shards_split_every_owner_range(seed: int, world: int) -> None:
    lay = random_layout(seed, world)
    geo = lay.geometry
    assert geo.shard == -(-lay.total // world) and geo.padded - lay.total < max(world, 1)
    for q in range(world):  # every element of q's range lies in exactly one shard
        assert sum(lay.overlap(p, q) for p in range(world)) == geo.counts[q]
    for p in range(world):  # shard p is its real (unpadded) part, cut among owners
        real = max(0, min(lay.total, (p + 1) * geo.shard) - p * geo.shard)
        assert sum(lay.overlap(p, q) for q in range(world)) == real
        send, recv = lay.to_owner_splits(p)
        assert sum(send) == real and sum(recv) == geo.counts[p]
        assert lay.from_owner_splits(p) == (recv, send)


@pytest.mark.parametrize(("seed", "world"), CASES)
def test_a_rank_that_owns_nothing_receives_nothing_and_still_joins_the_ring(seed: int, world: int) -> None:
    lay = random_layout(seed, world)
    idle = [q for q in range(world) if lay.geometry.counts[q] == 0]
    for q in idle:
        assert all(lay.numels[i] == 0 for i in lay.owned_items[q])  # at most empty items
        assert lay.owner_range(q)[0] == lay.owner_range(q)[1]
        assert lay.to_owner_splits(q)[1] == [0] * world
        assert lay.from_owner_splits(q)[0] == [0] * world
        if world > 1:  # it keeps nothing: its whole real shard part goes on to the owners
            real = max(0, min(lay.total, (q + 1) * lay.shard) - q * lay.shard)
            assert lay.geometry.sent_elements(q, "to") == (world - 1) * lay.shard + real
            assert lay.geometry.sent_elements(q, "from") == (world - 1) * lay.shard


def test_the_random_cases_include_ranks_that_own_nothing() -> None:
    idle = sum(1 for seed, world in CASES for c in random_layout(seed, world).geometry.counts if c == 0)
    busy = sum(1 for seed, world in CASES for c in random_layout(seed, world).geometry.counts if c > 0)
    assert idle >= 10 and busy >= 10


@pytest.mark.parametrize(("seed", "world"), CASES)
@pytest.mark.parametrize("bucket_numel", [None, 16, 40, 101])
def test_buckets_are_balanced_and_cover_each_owner_range_once(seed: int, world: int, bucket_numel: int | None) -> None:
    lay = random_layout(seed, world)
    if bucket_numel is not None and bucket_numel < 2 * world:
        with pytest.raises(ValueError, match="too small"):
            lay.buckets(bucket_numel)
        return
    buckets = lay.buckets(bucket_numel)
    if bucket_numel is not None:
        assert all(b.geometry.padded <= bucket_numel for b in buckets)
    k = len(buckets)
    for q in range(world):
        sizes = [b.geometry.counts[q] for b in buckets]
        assert sum(sizes) == lay.geometry.counts[q]
        chunk = -(-lay.geometry.counts[q] // k) if k else 0
        assert all(s <= chunk for s in sizes)  # no bucket takes more than its share of an owner
        covered: list[int] = []
        for b in buckets:
            (at, b_at, n) = lay.segments(b)[q]
            assert b_at == b.geometry.starts[q] and n == b.geometry.counts[q]
            covered.extend(range(at, at + n))
        start, end = lay.owner_range(q)
        assert covered == list(range(start, end))  # consecutive chunks, in order, each once


def simulate_round_trip(lay: OwnerLayout, buckets: list[Bucket], contributions: list[list[int]]) -> list[list[int]]:
    """Run "to owners" then "from owners" on lists.

    Rank r contributes ``contributions[r]`` (one integer per element of the flat owner-ordered
    buffer). Returns what every rank holds at the end (the flat buffer, padding dropped), built only
    from the layout's splits and segments.
    """
    world = lay.world_size
    owned_sums: list[list[int]] = [[0] * lay.geometry.counts[q] for q in range(world)]
    result: list[list[int]] = [[0] * lay.total for _ in range(world)]
    for b in buckets:
        geo = b.geometry
        segs = lay.segments(b)
        # pack: each rank's bucket buffer, padded to N*S
        packed = []
        for r in range(world):
            buf = [0] * geo.padded
            for at, b_at, n in segs:
                buf[b_at : b_at + n] = contributions[r][at : at + n]
            packed.append(buf)
        # reduce-scatter: rank p holds the sum of shard p
        shards = [
            [sum(packed[r][p * geo.shard + j] for r in range(world)) for j in range(geo.shard)] for p in range(world)
        ]
        # all-to-all to owners: rank p sends owner q the next overlap(p, q) elements of its shard
        received: list[list[int]] = [[] for _ in range(world)]
        for q in range(world):
            for p in range(world):
                send, _ = geo.to_owner_splits(p)
                lo = sum(send[:q])
                received[q].extend(shards[p][lo : lo + send[q]])
        for q in range(world):
            assert len(received[q]) == geo.counts[q]
            off = b.offsets[q]
            owned_sums[q][off : off + geo.counts[q]] = received[q]
        # from owners: owner q sends holder p its part of shard p, then the shards are all-gathered
        back = [[0] * geo.shard for _ in range(world)]
        for p in range(world):
            at = 0
            for q in range(world):
                send, _ = geo.from_owner_splits(q)
                lo = sum(send[:p])
                piece = owned_sums[q][b.offsets[q] + lo : b.offsets[q] + lo + send[p]]
                back[p][at : at + len(piece)] = piece
                at += len(piece)
        gathered = [x for p in range(world) for x in back[p]]
        # unpack: every rank copies the bucket's segments back into the flat buffer
        for r in range(world):
            for at, b_at, n in segs:
                result[r][at : at + n] = gathered[b_at : b_at + n]
    return result


@pytest.mark.parametrize(("seed", "world"), CASES)
@pytest.mark.parametrize("bucket_numel", [None, 16, 40])
def test_simulated_exchange_round_trips_the_sums(seed: int, world: int, bucket_numel: int | None) -> None:
    lay = random_layout(seed, world)
    if bucket_numel is not None and bucket_numel < 2 * world:
        pytest.skip("bucket too small for this world size (refused, see the bucket test)")
    rng = random.Random(seed)
    contributions = [[rng.randint(-50, 50) for _ in range(lay.total)] for _ in range(world)]
    want = [sum(c[j] for c in contributions) for j in range(lay.total)]
    got = simulate_round_trip(lay, lay.buckets(bucket_numel), contributions)
    assert got == [want] * world


@pytest.mark.parametrize(("seed", "world"), CASES)
@pytest.mark.parametrize("bucket_numel", [None, 40])
def test_layout_bytes_counts_the_ring_and_the_parts_sent_to_other_ranks(
    seed: int, world: int, bucket_numel: int | None
) -> None:
    lay = random_layout(seed, world)
    itemsize = 2
    want_to, want_from = [0] * world, [0] * world
    for b in lay.buckets(bucket_numel):
        geo = b.geometry
        ring = (world - 1) * geo.shard if world > 1 else 0
        for r in range(world):
            send_to, _ = geo.to_owner_splits(r)
            send_from, _ = geo.from_owner_splits(r)
            want_to[r] += ring + sum(x for q, x in enumerate(send_to) if q != r)
            want_from[r] += ring + sum(x for q, x in enumerate(send_from) if q != r)
    assert layout_bytes(lay, itemsize, "to", bucket_numel) == [itemsize * x for x in want_to]
    assert layout_bytes(lay, itemsize, "from", bucket_numel) == [itemsize * x for x in want_from]
    assert layout_bytes(lay, itemsize, "both", bucket_numel) == [
        itemsize * (a + b) for a, b in zip(want_to, want_from, strict=True)
    ]
