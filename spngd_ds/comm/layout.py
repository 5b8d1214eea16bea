"""The exchange layout: where every item travels between data-parallel ranks.

docs/design.md §3, "One exchange layout", as pure arithmetic (no process group, no tensors).

Items (gradients, packed statistics, parameters) each have one owner rank. They are laid in one
flat buffer in owner order and cut into N equal shards (:class:`ShardGeometry`); "to owners" moves
the parts of each shard owned by another rank to their owner, "from owners" the reverse.
:class:`OwnerLayout` places the items and cuts the exchange into buckets, :class:`FragmentPlan`
describes the ZeRO-compatible path's fragments, and :func:`layout_bytes` counts the bytes each
rank sends, exactly as :class:`~spngd_ds.comm.communicator.Communicator`'s primitives do. All
sizes are in elements unless a name says bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    """Length of [a0, a1) ∩ [b0, b1)."""
    return max(0, min(a1, b1) - max(a0, b0))


@dataclass(frozen=True)
class ShardGeometry:
    """One owner-ordered buffer cut into N equal shards.

    The buffer holds ``counts[q]`` elements of owner q, owners one after the other
    (q = 0..N-1), P = sum(counts) elements, cut into N equal shards of S = ceil(P/N) elements (the
    buffer is padded with zeros to N·S). Rank p holds shard p = [p·S, (p+1)·S).

    All sizes are in elements. "To owners": rank p sends owner q the part of shard p inside q's
    range, ``overlap(p, q)`` elements; "from owners" is the reverse.
    """

    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        """Reject an empty or negative ``counts``."""
        if not self.counts:
            raise ValueError("ShardGeometry: world size must be >= 1 (no owner counts given)")
        if any(c < 0 for c in self.counts):
            raise ValueError(f"ShardGeometry: negative owner count in {self.counts}")

    @property
    def world_size(self) -> int:
        """N: the number of owners (ranks)."""
        return len(self.counts)

    @property
    def total(self) -> int:
        """P: elements in the buffer, padding excluded."""
        return sum(self.counts)

    @property
    def shard(self) -> int:
        """S = ceil(P/N): elements of each equal shard."""
        return _ceil_div(self.total, self.world_size)

    @property
    def padded(self) -> int:
        """N·S: elements of the padded buffer a reduce-scatter reads and an all-gather writes."""
        return self.shard * self.world_size

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """Where owner q's range begins in the buffer."""
        out, acc = [], 0
        for c in self.counts:
            out.append(acc)
            acc += c
        return tuple(out)

    def owner_range(self, owner: int) -> tuple[int, int]:
        """[start, end) of ``owner``'s elements in the buffer."""
        return self.starts[owner], self.starts[owner] + self.counts[owner]

    def overlap(self, holder: int, owner: int) -> int:
        """Elements of shard ``holder`` that lie in ``owner``'s range."""
        s = self.shard
        return _overlap(holder * s, (holder + 1) * s, *self.owner_range(owner))

    def to_owner_splits(self, rank: int) -> tuple[list[int], list[int]]:
        """Split sizes of ``rank``'s all-to-all that moves shard parts to owners.

        Returns ``(input, output)``: ``rank`` sends owner q ``overlap(rank, q)`` elements and receives
        ``overlap(p, rank)`` from holder p. Received pieces, in holder order, are ``rank``'s range in
        order (length ``counts[rank]``).
        """
        n = self.world_size
        return [self.overlap(rank, q) for q in range(n)], [self.overlap(p, rank) for p in range(n)]

    def from_owner_splits(self, rank: int) -> tuple[list[int], list[int]]:
        """Split sizes of the reverse all-to-all, from owners to holders.

        (input, output) split sizes of the reverse all-to-all: ``rank`` sends holder p the part of
        its range inside shard p and receives, in owner order, its own shard (length S minus the
        padding inside it).
        """
        send, recv = self.to_owner_splits(rank)
        return recv, send

    def sent_elements(self, rank: int, direction: Literal["to", "from"]) -> int:
        """Elements ``rank`` sends in one exchange of this buffer.

        The ring reduce-scatter or all-gather ((N-1)·S) plus the all-to-all parts that go to other
        ranks.
        """
        n = self.world_size
        if n == 1:
            return 0
        kept = self.overlap(rank, rank)
        if direction == "to":  # the real (unpadded) part of shard ``rank`` that others own
            moved = _overlap(rank * self.shard, (rank + 1) * self.shard, 0, self.total) - kept
        else:  # the part of ``rank``'s range that other ranks hold
            moved = self.counts[rank] - kept
        return (n - 1) * self.shard + moved


@dataclass(frozen=True)
class Bucket:
    """One bucket of an :class:`OwnerLayout`.

    Owner q contributes the elements ``[offsets[q], offsets[q] + geometry.counts[q])`` of its own
    range (offsets are relative to the start of q's range in the layout's flat buffer).
    """

    geometry: ShardGeometry
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class OwnerLayout:
    """Where every item travels in the exchange (docs/design.md §3, "One exchange layout").

    Items come in a fixed global order that every rank knows; item i has ``shapes[i]`` and one
    owner ``owners[i]`` in ``range(world_size)``. They are laid in one flat buffer in owner order
    (stable within an owner): owner 0's items, then owner 1's, ... Sizes are in elements.
    Pure arithmetic: no process group, no tensors.
    """

    shapes: tuple[tuple[int, ...], ...]
    owners: tuple[int, ...]
    world_size: int

    def __post_init__(self) -> None:
        """Reject a world size below 1, mismatched lengths, an owner out of range or a negative dimension."""
        if self.world_size < 1:
            raise ValueError(f"OwnerLayout: world_size must be >= 1, got {self.world_size}")
        if len(self.shapes) != len(self.owners):
            raise ValueError(f"OwnerLayout: {len(self.shapes)} shapes but {len(self.owners)} owners")
        for i, (shape, owner) in enumerate(zip(self.shapes, self.owners, strict=True)):
            if not 0 <= owner < self.world_size:
                raise ValueError(f"OwnerLayout: item {i} has owner {owner}, outside range({self.world_size})")
            if any(d < 0 for d in shape):
                raise ValueError(f"OwnerLayout: item {i} has a negative dimension in shape {shape}")

    @classmethod
    def build(cls, items: Sequence[tuple[int | Sequence[int], int]], world_size: int) -> OwnerLayout:
        """From ``(numel or shape, owner)`` pairs in the global item order.

        A bare numel means a 1-D item of that length.
        """
        shapes = tuple((int(s),) if isinstance(s, int) else tuple(int(d) for d in s) for s, _ in items)
        return cls(shapes, tuple(int(o) for _, o in items), int(world_size))

    @cached_property
    def numels(self) -> tuple[int, ...]:
        """Elements of each item, in the global item order."""
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def geometry(self) -> ShardGeometry:
        """The whole layout as one buffer (``counts[q]`` = elements owner q owns)."""
        counts = [0] * self.world_size
        for n, q in zip(self.numels, self.owners, strict=True):
            counts[q] += n
        return ShardGeometry(tuple(counts))

    @property
    def total(self) -> int:
        """P: elements of all items."""
        return self.geometry.total

    @property
    def shard(self) -> int:
        """S = ceil(P/N)."""
        return self.geometry.shard

    @cached_property
    def owned_items(self) -> tuple[tuple[int, ...], ...]:
        """Per owner, the indices of its items in item order (= their order in the buffer)."""
        out: list[list[int]] = [[] for _ in range(self.world_size)]
        for i, q in enumerate(self.owners):
            out[q].append(i)
        return tuple(tuple(x) for x in out)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Offset of each item in the flat owner-ordered buffer."""
        out = [0] * len(self.numels)
        for q, items in enumerate(self.owned_items):
            acc = self.geometry.starts[q]
            for i in items:
                out[i] = acc
                acc += self.numels[i]
        return tuple(out)

    def owner_range(self, owner: int) -> tuple[int, int]:
        """[start, end) of ``owner``'s items in the flat buffer."""
        return self.geometry.owner_range(owner)

    def overlap(self, holder: int, owner: int) -> int:
        """Elements of shard ``holder`` (of the unbucketed buffer) owned by ``owner``."""
        return self.geometry.overlap(holder, owner)

    def to_owner_splits(self, rank: int) -> tuple[list[int], list[int]]:
        """See :meth:`ShardGeometry.to_owner_splits` (unbucketed buffer)."""
        return self.geometry.to_owner_splits(rank)

    def from_owner_splits(self, rank: int) -> tuple[list[int], list[int]]:
        """See :meth:`ShardGeometry.from_owner_splits` (unbucketed buffer)."""
        return self.geometry.from_owner_splits(rank)

    def segments(self, bucket: Bucket) -> list[tuple[int, int, int]]:
        """Where each owner's elements of this bucket lie.

        Per owner q, ``(start in the layout's flat buffer, start in the bucket's buffer, length)``
        of q's elements in ``bucket`` (the bucket's buffer holds them in owner order).
        """
        geo = bucket.geometry
        return [
            (self.geometry.starts[q] + bucket.offsets[q], geo.starts[q], geo.counts[q]) for q in range(self.world_size)
        ]

    def buckets(self, bucket_numel: int | None = None) -> list[Bucket]:
        """Cut the exchange into K buckets of at most ``bucket_numel`` elements.

        Each bucket's padded buffer (N·S_k) holds <= ``bucket_numel`` elements; one bucket when
        ``bucket_numel`` is None or large enough.

        Every owner's range is cut into K near-equal consecutive chunks and bucket k takes chunk k
        of every owner, so each bucket is balanced across owners like the whole layout and the
        all-to-all moves no more than it would unbucketed (plus rounding).
        """
        geo = self.geometry
        n = self.world_size
        if bucket_numel is None or geo.padded <= bucket_numel:
            return [Bucket(geo, (0,) * n)]
        if bucket_numel < 2 * n:
            raise ValueError(f"bucket_numel={bucket_numel} is too small for {n} ranks (need >= {2 * n})")
        k = max(1, _ceil_div(geo.total, max(1, bucket_numel - 2 * n)))  # rounding adds < N, padding < N
        while True:
            chunks = [_ceil_div(c, k) for c in geo.counts]
            buckets = []
            for j in range(k):
                offs = tuple(min(j * ch, c) for ch, c in zip(chunks, geo.counts, strict=True))
                cnts = tuple(min((j + 1) * ch, c) - o for ch, c, o in zip(chunks, geo.counts, offs, strict=True))
                buckets.append(Bucket(ShardGeometry(cnts), offs))
            if all(b.geometry.padded <= bucket_numel for b in buckets):
                return [b for b in buckets if b.geometry.total > 0]
            k += 1


def layout_bytes(
    layout: OwnerLayout,
    itemsize: int,
    direction: Literal["to", "from", "both"] = "both",
    bucket_numel: int | None = None,
) -> list[int]:
    """Bytes each rank sends to exchange ``layout``.

    Exactly what the communicator's primitives count (ring count for the reduce-scatter and the
    all-gather).

    Args:
        layout: The exchange layout.
        itemsize: Bytes of one wire element.
        direction: :meth:`Communicator.to_owners` ("to"), :meth:`Communicator.from_owners` ("from")
            or one of each ("both").
        bucket_numel: The communicator's bucket size in elements (None: one bucket).

    Returns:
        Bytes sent by each rank, indexed by rank.
    """
    dirs: tuple[Literal["to", "from"], ...] = ("to", "from") if direction == "both" else (direction,)
    return [
        itemsize * sum(b.geometry.sent_elements(r, d) for b in layout.buckets(bucket_numel) for d in dirs)
        for r in range(layout.world_size)
    ]


@dataclass(frozen=True)
class FragmentPlan:
    """Which rank holds which element range of which item, for the ZeRO-compatible path.

    ``fragments[p]`` lists rank p's fragments as ``(item, start, length)``: the elements
    ``[start, start + length)`` of the flattened item, in the order rank p hands them over. Across
    ranks they cover every item of ``layout`` exactly once (validated). Build it once
    (:meth:`Communicator.fragment_plan` all-gathers the triples) and reuse it: DeepSpeed's
    partitions are static. Pure arithmetic once built.
    """

    layout: OwnerLayout
    fragments: tuple[tuple[tuple[int, int, int], ...], ...]

    def __post_init__(self) -> None:
        """Reject fragments that do not cover every item exactly once."""
        lay = self.layout
        if len(self.fragments) != lay.world_size:
            raise ValueError(f"FragmentPlan: {len(self.fragments)} ranks' fragments for world size {lay.world_size}")
        pieces: list[list[tuple[int, int, int]]] = [[] for _ in lay.numels]
        for p, frags in enumerate(self.fragments):
            for item, start, length in frags:
                if not 0 <= item < len(lay.numels):
                    raise ValueError(f"FragmentPlan: rank {p} names item {item}; there are {len(lay.numels)}")
                if start < 0 or length < 0 or start + length > lay.numels[item]:
                    raise ValueError(
                        f"FragmentPlan: rank {p}'s fragment [{start}, {start + length}) of item {item} "
                        f"is outside [0, {lay.numels[item]})"
                    )
                if length:
                    pieces[item].append((start, start + length, p))
        for item, spans in enumerate(pieces):
            end = 0
            for s, e, p in sorted(spans):
                if s != end:
                    kind = "overlap" if s < end else "gap"
                    raise ValueError(
                        f"FragmentPlan: item {item} ({lay.numels[item]} elements): {kind} at [{min(s, end)}, "
                        f"{max(s, end)}) (rank {p}'s fragment starts at {s}, covered so far up to {end})"
                    )
                end = e
            if end != lay.numels[item]:
                raise ValueError(
                    f"FragmentPlan: item {item} ({lay.numels[item]} elements): gap at [{end}, {lay.numels[item]})"
                )

    def send_order(self, rank: int) -> list[int]:
        """Indices into ``fragments[rank]`` in wire order.

        By owner of the item, then item, start (zero-length fragments left out).
        """
        frags = self.fragments[rank]
        keep = [j for j, f in enumerate(frags) if f[2] > 0]
        return sorted(keep, key=lambda j: (self.layout.owners[frags[j][0]], frags[j][0], frags[j][1]))

    def held(self, holder: int, owner: int) -> int:
        """Elements of ``owner``'s items that rank ``holder`` holds."""
        return sum(ln for i, _, ln in self.fragments[holder] if self.layout.owners[i] == owner)

    def to_owner_splits(self, rank: int) -> tuple[list[int], list[int]]:
        """(input, output) split sizes of the all-to-all that sends fragments to owners."""
        n = self.layout.world_size
        return [self.held(rank, q) for q in range(n)], [self.held(p, rank) for p in range(n)]

    def from_owner_splits(self, rank: int) -> tuple[list[int], list[int]]:
        """(input, output) split sizes of the all-to-all that returns fragments to their holders."""
        send, recv = self.to_owner_splits(rank)
        return recv, send

    def placements(self, owner: int) -> list[tuple[int, int, int]]:
        """Where ``owner``'s received buffer goes.

        ``(item, start, length)`` in receive order (holder by holder, each in its send order).
        """
        out: list[tuple[int, int, int]] = []
        for p in range(self.layout.world_size):
            frags = self.fragments[p]
            out.extend(frags[j] for j in self.send_order(p) if self.layout.owners[frags[j][0]] == owner)
        return out

    def sent_bytes(self, rank: int, itemsize: int, direction: Literal["to", "from"]) -> int:
        """Bytes ``rank`` sends in one fragment exchange (parts for / from other ranks only)."""
        send, _ = self.to_owner_splits(rank) if direction == "to" else self.from_owner_splits(rank)
        return itemsize * sum(x for q, x in enumerate(send) if q != rank)
