"""Moving curvature statistics, gradients and updates between data-parallel ranks (DESIGN.md §3).

Two layers live here.

*The exchange layout* (:class:`OwnerLayout`, :class:`FragmentPlan` and the ``to_owners`` /
``from_owners`` / ``fragments_*`` methods of :class:`Communicator`). Items (gradients, packed
statistics, parameters) each have one owner rank. They are laid in one flat buffer in owner order
and cut into N equal shards. "To owners" is a reduce-scatter of the equal shards followed by an
all-to-all with variable splits that moves the parts of each shard owned by another rank to their
owner; "from owners" is the same all-to-all in reverse followed by an all-gather of the equal
shards. Nothing is padded to the most-loaded owner, and each call issues a constant number of
collectives (two per bucket). The ZeRO-compatible path, whose gradients DeepSpeed has already
reduced into disjoint per-rank fragments, routes fragments to owners and back with one all-to-all
each. Every collective goes through the primitives ``reduce_scatter``, ``all_gather`` and
``all_to_all``, which check devices and count the bytes this rank *sends* (ring algorithm for the
first two: (N-1)·shard·itemsize; all-to-all: what goes to other ranks). :func:`layout_bytes` gives
the same count analytically.

Symmetric statistics travel as their packed upper triangle (:func:`pack_sym`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate
from typing import Literal, Protocol

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def triu_numel(d: int) -> int:
    """Length of the packed upper triangle of a (d, d) matrix."""
    return d * (d + 1) // 2


#: the equal-shard collectives by the names this torch gives them: torch 2.14 renamed
#: ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` to ``*_single`` and warns on every call
#: of the old names. Looked up on ``torch.distributed`` at each call, so that a wrapper installed
#: there (bench/comm_volume.py's counter) sees it.
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"

_TRIU_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _triu_flat(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a (d, d) matrix flattened row-major: the flat positions of its upper triangle in
    row-major order (d(d+1)/2,), the positions of their mirror images, and the upper-triangle mask
    (d, d); built once per (d, device) (``torch.triu_indices`` costs more than the packing)."""
    key = (d, torch.device(device))
    hit = _TRIU_CACHE.get(key)
    if hit is None:
        rows, cols = torch.triu_indices(d, d, device=device)
        mask = torch.ones(d, d, dtype=torch.bool, device=device).triu_()
        hit = _TRIU_CACHE[key] = (rows * d + cols, cols * d + rows, mask)
    return hit


def pack_sym(matrix: torch.Tensor) -> torch.Tensor:
    """Upper triangle (row-major) of the symmetric (..., d, d) ``matrix`` as (..., d(d+1)/2)."""
    d = matrix.shape[-1]
    flat, _, _ = _triu_flat(d, matrix.device)
    return matrix.reshape(*matrix.shape[:-2], d * d).index_select(-1, flat)


def unpack_sym(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_sym`: a symmetric (..., d, d) matrix (each entry a copy of its packed
    value: the lower triangle is the transpose of the upper one, bit for bit)."""
    flat, _, mask = _triu_flat(d, packed.device)
    upper = packed.new_zeros(*packed.shape[:-1], d * d).index_copy_(-1, flat, packed).view(*packed.shape[:-1], d, d)
    return torch.where(mask, upper, upper.transpose(-1, -2))


# --------------------------------------------------------------------------------------------------
# the exchange layout: pure arithmetic, no torch.distributed
# --------------------------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    """Length of [a0, a1) ∩ [b0, b1)."""
    return max(0, min(a1, b1) - max(a0, b0))


@dataclass(frozen=True)
class ShardGeometry:
    """One owner-ordered buffer: ``counts[q]`` elements of owner q, owners one after the other
    (q = 0..N-1), P = sum(counts) elements, cut into N equal shards of S = ceil(P/N) elements
    (the buffer is padded with zeros to N·S). Rank p holds shard p = [p·S, (p+1)·S).

    All sizes are in elements. "To owners": rank p sends owner q the part of shard p inside q's
    range, ``overlap(p, q)`` elements; "from owners" is the reverse.
    """

    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.counts:
            raise ValueError("ShardGeometry: world size must be >= 1 (no owner counts given)")
        if any(c < 0 for c in self.counts):
            raise ValueError(f"ShardGeometry: negative owner count in {self.counts}")

    @property
    def world_size(self) -> int:
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
        """(input, output) split sizes of ``rank``'s all-to-all that moves shard parts to owners:
        it sends owner q ``overlap(rank, q)`` and receives ``overlap(p, rank)`` from holder p.
        Received pieces, in holder order, are ``rank``'s range in order (length ``counts[rank]``)."""
        n = self.world_size
        return [self.overlap(rank, q) for q in range(n)], [self.overlap(p, rank) for p in range(n)]

    def from_owner_splits(self, rank: int) -> tuple[list[int], list[int]]:
        """(input, output) split sizes of the reverse all-to-all: ``rank`` sends holder p the part
        of its range inside shard p and receives, in owner order, its own shard (length S minus
        the padding inside it)."""
        send, recv = self.to_owner_splits(rank)
        return recv, send

    def sent_elements(self, rank: int, direction: Literal["to", "from"]) -> int:
        """Elements ``rank`` sends in one exchange of this buffer: the ring reduce-scatter or
        all-gather ((N-1)·S) plus the all-to-all parts that go to other ranks."""
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
    """One bucket of an :class:`OwnerLayout`: owner q contributes the elements
    ``[offsets[q], offsets[q] + geometry.counts[q])`` of its own range (offsets are relative to the
    start of q's range in the layout's flat buffer)."""

    geometry: ShardGeometry
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class OwnerLayout:
    """Where every item travels in the exchange (DESIGN.md §3, "One exchange layout").

    Items come in a fixed global order that every rank knows; item i has ``shapes[i]`` and one
    owner ``owners[i]`` in ``range(world_size)``. They are laid in one flat buffer in owner order
    (stable within an owner): owner 0's items, then owner 1's, ... Sizes are in elements.
    Pure arithmetic: no process group, no tensors.
    """

    shapes: tuple[tuple[int, ...], ...]
    owners: tuple[int, ...]
    world_size: int

    def __post_init__(self) -> None:
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
        """From ``(numel or shape, owner)`` pairs in the global item order. A bare numel means a
        1-D item of that length."""
        shapes = tuple((int(s),) if isinstance(s, int) else tuple(int(d) for d in s) for s, _ in items)
        return cls(shapes, tuple(int(o) for _, o in items), int(world_size))

    @cached_property
    def numels(self) -> tuple[int, ...]:
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
        """Per owner q, ``(start in the layout's flat buffer, start in the bucket's buffer, length)``
        of q's elements in ``bucket`` (the bucket's buffer holds them in owner order)."""
        geo = bucket.geometry
        return [(self.geometry.starts[q] + bucket.offsets[q], geo.starts[q], geo.counts[q])
                for q in range(self.world_size)]

    def buckets(self, bucket_numel: int | None = None) -> list[Bucket]:
        """Cut the exchange into K buckets whose padded buffers (N·S_k) hold <= ``bucket_numel``
        elements each; one bucket when ``bucket_numel`` is None or large enough.

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
    """Bytes each rank sends to exchange ``layout`` with ``itemsize``-byte wire elements:
    :meth:`Communicator.to_owners` ("to"), :meth:`Communicator.from_owners` ("from") or one of each
    ("both"), ring count for the reduce-scatter / all-gather, exactly what the primitives count."""
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
        """Indices into ``fragments[rank]`` in wire order: by owner of the item, then item, start
        (zero-length fragments left out)."""
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
        """Where ``owner``'s received buffer goes: ``(item, start, length)`` in receive order
        (holder by holder, each in its send order)."""
        out: list[tuple[int, int, int]] = []
        for p in range(self.layout.world_size):
            frags = self.fragments[p]
            out.extend(frags[j] for j in self.send_order(p) if self.layout.owners[frags[j][0]] == owner)
        return out

    def sent_bytes(self, rank: int, itemsize: int, direction: Literal["to", "from"]) -> int:
        """Bytes ``rank`` sends in one fragment exchange (parts for / from other ranks only)."""
        send, _ = self.to_owner_splits(rank) if direction == "to" else self.from_owner_splits(rank)
        return itemsize * sum(x for q, x in enumerate(send) if q != rank)


# --------------------------------------------------------------------------------------------------
# flatten / split helpers shared by every exchange
# --------------------------------------------------------------------------------------------------


def _concat(
    pieces: Sequence[torch.Tensor], size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A zero-padded 1-D buffer of ``size`` elements of ``dtype`` on ``device`` holding the
    flattened ``pieces`` one after the other (one copy each, cast on the way)."""
    out = torch.zeros(size, dtype=dtype, device=device)
    at = 0
    for t in pieces:
        n = t.numel()
        out[at : at + n].copy_(t.reshape(-1))
        at += n
    return out


def _split(
    flat: torch.Tensor,
    numels: Sequence[int],
    shapes: Sequence[Sequence[int]],
    offsets: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Views of the 1-D ``flat``, one per (numel, shape), at ``offsets`` (default: consecutive)."""
    if offsets is None:
        offsets = list(accumulate(numels, initial=0))[:-1]
    return [flat[o : o + n].view(tuple(s)) for o, n, s in zip(offsets, numels, shapes, strict=True)]


class Work(Protocol):
    """What an asynchronous collective returns (``torch.distributed.Work``)."""

    def wait(self) -> object: ...


class _Done:
    """A collective that already finished (world size 1)."""

    def wait(self) -> bool:
        return True


class PendingToOwners:
    """A :meth:`Communicator.to_owners` whose reduce-scatters are in flight. :meth:`wait` finishes
    them, runs the all-to-all(s) and returns what ``to_owners`` returns. Call it exactly once, at the
    same point on every rank (it issues collectives)."""

    def __init__(
        self,
        comm: Communicator,
        layout: OwnerLayout,
        buckets: list[Bucket],
        works: list[Work],
        shards: list[torch.Tensor],
        dtypes: list[torch.dtype],
        shapes: list[tuple[int, ...]],
        sends: list[torch.Tensor],
    ) -> None:
        self._comm, self._layout, self._buckets = comm, layout, buckets
        self._works, self._shards, self._dtypes, self._shapes = works, shards, dtypes, shapes
        self._sends = sends  # the reduce-scatters' inputs stay alive until they are waited on
        self._done = False

    @torch.no_grad()
    def wait(self) -> list[torch.Tensor]:
        """The items this rank owns, summed over ranks, in item order, each in its input's shape and dtype."""
        if self._done:
            raise RuntimeError("PendingToOwners.wait() called twice")
        self._done = True
        comm, rank = self._comm, self._comm.rank
        parts = []
        for bucket, work, shard in zip(self._buckets, self._works, self._shards, strict=True):
            work.wait()
            send, recv = bucket.geometry.to_owner_splits(rank)
            mine = torch.empty(sum(recv), dtype=shard.dtype, device=shard.device)
            comm.all_to_all(mine, shard[: sum(send)], send, recv)  # the shard's real part (padding last)
            parts.append(mine)
        owned = self._layout.owned_items[rank]
        flat = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else None
        if flat is None:  # nothing to exchange: every item has 0 elements
            return [torch.zeros(s, dtype=d, device=comm.device)
                    for s, d in zip(self._shapes, self._dtypes, strict=True)]
        views = _split(flat, [self._layout.numels[i] for i in owned], self._shapes)
        return [v.to(d) for v, d in zip(views, self._dtypes, strict=True)]


class Communicator:
    """One process, no communication: the world of size 1 (the standalone optimizer)."""

    rank = 0
    world_size = 1

    bucket_numel: int | None = None

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.bytes_sent = 0
        self.device = torch.device(device)

    # -- primitives: every collective of the exchange layout goes through one of these ---------------
    def check_device(self, op: str, *tensors: torch.Tensor) -> None:
        """Raise RuntimeError unless every tensor lives on this communicator's device (NCCL takes
        no CPU tensor; a gloo group takes no CUDA tensor)."""
        want = self.device
        for t in tensors:
            dev = t.device
            if dev.type != want.type or (want.index is not None and dev.index != want.index):
                raise RuntimeError(
                    f"{type(self).__name__}.{op}: tensor on {dev}, but the communicator's device is {want}; "
                    "move it there before the collective"
                )

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False) -> Work:
        """``output`` (S,) <- shard ``rank`` of the sum over ranks of ``input`` (N·S,). Counts
        (N-1)·S·itemsize bytes (ring)."""
        self.check_device("reduce_scatter", output, input)
        output.copy_(input)
        return _Done()

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """``output`` (N·S,) <- every rank's ``input`` (S,) in rank order. Counts (N-1)·S·itemsize bytes (ring)."""
        self.check_device("all_gather", output, input)
        output.copy_(input)

    def all_to_all(
        self, output: torch.Tensor, input: torch.Tensor, input_splits: Sequence[int], output_splits: Sequence[int]
    ) -> None:
        """Rank r sends ``input``'s q-th piece (``input_splits[q]`` elements) to rank q and
        receives ``output``'s p-th piece (``output_splits[p]`` elements) from rank p. Counts the
        bytes of the pieces sent to other ranks."""
        self.check_device("all_to_all", output, input)
        output.copy_(input)

    # -- the exchange layout ------------------------------------------------------------------------
    def to_owners(
        self, layout: OwnerLayout, tensors: Sequence[torch.Tensor], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Every rank gives ALL items of ``layout`` (its local contribution, any shape with the
        item's numel, any dtype, any device); returns the items this rank owns, summed over ranks,
        in item order, in each input's shape and dtype, on :attr:`device`. ``dtype`` is the wire
        dtype. One reduce-scatter + one all-to-all per bucket."""
        return self.to_owners_async(layout, tensors, dtype).wait()

    @torch.no_grad()
    def to_owners_async(
        self, layout: OwnerLayout, tensors: Sequence[torch.Tensor], dtype: torch.dtype
    ) -> PendingToOwners:
        """:meth:`to_owners` with the reduce-scatter(s) issued now (``async_op=True``): the
        inputs are copied into the wire buffer before this returns, so they may change afterwards.
        ``.wait()`` runs the all-to-all(s) and returns the result."""
        self._check_layout(layout, [t.numel() for t in tensors])
        buckets = layout.buckets(self.bucket_numel)
        order = [i for items in layout.owned_items for i in items]
        flat = _concat([tensors[i] for i in order], layout.geometry.padded, dtype, self.device)
        works: list[Work] = []
        shards: list[torch.Tensor] = []
        sends: list[torch.Tensor] = []
        for bucket in buckets:
            geo = bucket.geometry
            if geo.total == 0:
                continue
            send = flat if len(buckets) == 1 else self._bucket_buffer(flat, layout, bucket)
            shard = torch.empty(geo.shard, dtype=dtype, device=self.device)
            works.append(self.reduce_scatter(shard, send, async_op=True))
            shards.append(shard)
            sends.append(send)
        live = [b for b in buckets if b.geometry.total > 0]
        owned = layout.owned_items[self.rank]
        dtypes = [tensors[i].dtype for i in owned]
        shapes = [tuple(tensors[i].shape) for i in owned]
        return PendingToOwners(self, layout, live, works, shards, dtypes, shapes, sends)

    @torch.no_grad()
    def from_owners(
        self, layout: OwnerLayout, mine: Sequence[torch.Tensor], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Each rank gives the items it owns (``layout.owned_items[rank]`` order, any shape with
        the item's numel); every rank receives ALL items, in item order, shaped ``layout.shapes``,
        of the wire ``dtype``, on :attr:`device` (views of one buffer). One all-to-all + one
        all-gather per bucket."""
        owned = layout.owned_items[self.rank]
        if len(mine) != len(owned):
            raise ValueError(f"from_owners: rank {self.rank} owns {len(owned)} items, got {len(mine)} tensors")
        for i, t in zip(owned, mine, strict=True):
            if t.numel() != layout.numels[i]:
                raise ValueError(f"from_owners: item {i} has {layout.numels[i]} elements, got {t.numel()}")
        geo_all = layout.geometry
        ranged = _concat(mine, geo_all.counts[self.rank], dtype, self.device)
        buckets = layout.buckets(self.bucket_numel)
        gathered: list[torch.Tensor] = []
        for bucket in buckets:
            geo = bucket.geometry
            if geo.total == 0:
                gathered.append(torch.zeros(0, dtype=dtype, device=self.device))
                continue
            send, recv = geo.from_owner_splits(self.rank)
            start = bucket.offsets[self.rank]
            piece = ranged[start : start + geo.counts[self.rank]]
            shard = torch.zeros(geo.shard, dtype=dtype, device=self.device)
            self.all_to_all(shard[: sum(recv)], piece, send, recv)
            full = torch.empty(geo.padded, dtype=dtype, device=self.device)
            self.all_gather(full, shard)
            gathered.append(full)
        if len(buckets) == 1:
            flat = gathered[0]
        else:
            flat = torch.empty(geo_all.total, dtype=dtype, device=self.device)
            for bucket, full in zip(buckets, gathered, strict=True):
                for at, b_at, n in layout.segments(bucket):
                    flat[at : at + n].copy_(full[b_at : b_at + n])
        return _split(flat, layout.numels, layout.shapes, layout.offsets)

    @torch.no_grad()
    def fragment_plan(self, layout: OwnerLayout, fragments: Sequence[tuple[int, int, int]]) -> FragmentPlan:
        """Every rank gives its ``(item, start, length)`` fragments; returns the validated
        :class:`FragmentPlan` (the same on every rank). A collective (one all-gather of counts, one
        of the triples, int64 on :attr:`device`, counted in :attr:`bytes_sent`); build it once and
        cache it. Raises ValueError on every rank when the fragments overlap or leave a gap."""
        n = self.world_size
        mine = torch.tensor([list(map(int, f)) for f in fragments], dtype=torch.int64).reshape(-1, 3)
        counts = torch.empty(n, dtype=torch.int64, device=self.device)
        self.all_gather(counts, torch.tensor([len(mine)], dtype=torch.int64, device=self.device))
        most = int(counts.max())
        if most == 0:  # no rank holds anything (an empty layout): nothing more to gather
            return FragmentPlan(layout, ((),) * n)
        padded = torch.zeros(most, 3, dtype=torch.int64, device=self.device)
        padded[: len(mine)] = mine
        every = torch.empty(n * most * 3, dtype=torch.int64, device=self.device)
        self.all_gather(every, padded.reshape(-1))
        table = every.reshape(n, most, 3).tolist()
        per_rank = tuple(tuple((i, s, ln) for i, s, ln in table[p][: int(counts[p])]) for p in range(n))
        return FragmentPlan(layout, per_rank)

    @torch.no_grad()
    def fragments_to_owners(
        self, plan: FragmentPlan, fragments: Sequence[torch.Tensor], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Every rank gives its fragment tensors (1-D, in ``plan.fragments[rank]`` order); each
        owner receives its items whole, assembled from every rank's fragments without reduction,
        in ``layout.owned_items[rank]`` order, shaped ``layout.shapes``, of the wire ``dtype``, on
        :attr:`device`. One all-to-all."""
        lay, rank = plan.layout, self.rank
        mine = plan.fragments[rank]
        if len(fragments) != len(mine):
            raise ValueError(
                f"fragments_to_owners: the plan lists {len(mine)} fragments on rank {rank}, got {len(fragments)}"
            )
        for (i, _, n), t in zip(mine, fragments, strict=True):
            if t.numel() != n:
                raise ValueError(
                    f"fragments_to_owners: fragment of item {i} has {n} elements in the plan, got {t.numel()}"
                )
        send, recv = plan.to_owner_splits(rank)
        order = plan.send_order(rank)
        wire = _concat([fragments[j] for j in order], sum(send), dtype, self.device)
        got = torch.empty(sum(recv), dtype=dtype, device=self.device)
        if lay.total:  # every rank knows when there is nothing at all to move
            self.all_to_all(got, wire, send, recv)
        owned = lay.owned_items[rank]
        flat = torch.empty(lay.geometry.counts[rank], dtype=dtype, device=self.device)
        base = {i: lay.offsets[i] - lay.geometry.starts[rank] for i in owned}
        at = 0
        for i, start, n in plan.placements(rank):
            flat[base[i] + start : base[i] + start + n].copy_(got[at : at + n])
            at += n
        return _split(flat, [lay.numels[i] for i in owned], [lay.shapes[i] for i in owned])

    @torch.no_grad()
    def fragments_from_owners(
        self, plan: FragmentPlan, owned: Sequence[torch.Tensor], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Each owner gives its items (``layout.owned_items[rank]`` order, any shape with the
        item's numel); every rank receives exactly its fragments of them (1-D, in
        ``plan.fragments[rank]`` order, wire ``dtype``, on :attr:`device`). One all-to-all."""
        lay, rank = plan.layout, self.rank
        items = lay.owned_items[rank]
        if len(owned) != len(items):
            raise ValueError(f"fragments_from_owners: rank {rank} owns {len(items)} items, got {len(owned)} tensors")
        flat_of = {i: t.reshape(-1) for i, t in zip(items, owned, strict=True)}
        send, recv = plan.from_owner_splits(rank)
        wire = _concat([flat_of[i][s : s + n] for i, s, n in plan.placements(rank)], sum(send), dtype, self.device)
        got = torch.empty(sum(recv), dtype=dtype, device=self.device)
        if lay.total:
            self.all_to_all(got, wire, send, recv)
        mine = plan.fragments[rank]
        out = [torch.zeros(0, dtype=dtype, device=self.device)] * len(mine)
        at = 0
        for j in plan.send_order(rank):
            n = mine[j][2]
            out[j] = got[at : at + n]
            at += n
        return out

    def _check_layout(self, layout: OwnerLayout, numels: Sequence[int]) -> None:
        if layout.world_size != self.world_size:
            raise ValueError(f"layout is for {layout.world_size} ranks, the communicator has {self.world_size}")
        if list(numels) != list(layout.numels):
            raise ValueError(
                f"to_owners: {len(numels)} tensors whose numels differ from the layout's {len(layout.numels)} items"
            )

    def _bucket_buffer(self, flat: torch.Tensor, layout: OwnerLayout, bucket: Bucket) -> torch.Tensor:
        """The padded owner-ordered buffer of one bucket, copied out of the layout's flat buffer."""
        pieces = [flat[at : at + n] for at, _, n in layout.segments(bucket)]
        return _concat(pieces, bucket.geometry.padded, flat.dtype, flat.device)

    def reset_bytes(self) -> None:
        self.bytes_sent = 0


class DistributedCommunicator(Communicator):
    """The same contract over a ``torch.distributed`` process group (gloo or NCCL)."""

    bucket_numel: int

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

    # -- primitives ----------------------------------------------------------------------------------
    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False) -> Work:
        self.check_device("reduce_scatter", output, input)
        work = getattr(dist, REDUCE_SCATTER)(output, input, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)
        self.bytes_sent += (self.world_size - 1) * output.numel() * output.element_size()
        return work if async_op and work is not None else _Done()

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        self.check_device("all_gather", output, input)
        getattr(dist, ALL_GATHER)(output, input, group=self.group)
        self.bytes_sent += (self.world_size - 1) * input.numel() * input.element_size()

    def all_to_all(
        self, output: torch.Tensor, input: torch.Tensor, input_splits: Sequence[int], output_splits: Sequence[int]
    ) -> None:
        self.check_device("all_to_all", output, input)
        dist.all_to_all_single(
            output, input, output_split_sizes=list(output_splits), input_split_sizes=list(input_splits),
            group=self.group,
        )
        others = sum(x for q, x in enumerate(input_splits) if q != self.rank)
        self.bytes_sent += others * input.element_size()
