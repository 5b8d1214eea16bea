"""The communicator: the collectives that move SP-NGD's tensors between ranks.

Curvature statistics, gradients and updates move between data-parallel ranks (docs/design.md §3) over
the arithmetic of :mod:`spngd_ds.comm.layout`.

"To owners" is a reduce-scatter of the equal shards followed by an all-to-all with variable splits
that moves the parts of each shard owned by another rank to their owner; "from owners" is the same
all-to-all in reverse followed by an all-gather of the equal shards. Nothing is padded to the
most-loaded owner, and each call issues a constant number of collectives (two per bucket). The
ZeRO-compatible path, whose gradients DeepSpeed has already reduced into disjoint per-rank
fragments, routes fragments to owners and back with one all-to-all each. Every collective goes
through the primitives ``reduce_scatter``, ``all_gather`` and ``all_to_all``, which check devices
and count the bytes this rank *sends* (ring algorithm for the first two: (N-1)·shard·itemsize;
all-to-all: what goes to other ranks). :func:`~spngd_ds.comm.layout.layout_bytes` gives the same
count analytically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.distributed as dist

from spngd_ds.comm.layout import Bucket, FragmentPlan, OwnerLayout
from spngd_ds.comm.packing import _concat, _split

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: the equal-shard collectives by the names this torch gives them: torch 2.14 renamed
#: ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` to ``*_single`` and warns on every call
#: of the old names. Looked up on ``torch.distributed`` at each call, so that a wrapper installed
#: there (bench/comm_volume.py's counter) sees it.
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


class Work(Protocol):
    """What an asynchronous collective returns (``torch.distributed.Work``)."""

    def wait(self) -> object:
        """Block until the collective has finished."""
        ...


class _Done:
    """A collective that already finished (world size 1)."""

    def wait(self) -> bool:
        """Return at once: there is nothing to wait for."""
        return True


class PendingToOwners:
    """A :meth:`Communicator.to_owners` whose reduce-scatters are in flight.

    :meth:`wait` finishes them, runs the all-to-all(s) and returns what ``to_owners`` returns. Call it exactly once,
    at the same point on every rank (it issues collectives).
    """

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
        """Hold what :meth:`wait` needs: the buckets, their in-flight ``works`` and 1-D ``shards`` (S_k,) outputs.

        ``dtypes`` and ``shapes`` are the items' own (restored on the result); ``sends`` are the reduce-scatters'
        1-D (N·S_k,) inputs.
        """
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
            return [
                torch.zeros(s, dtype=d, device=comm.device) for s, d in zip(self._shapes, self._dtypes, strict=True)
            ]
        views = _split(flat, [self._layout.numels[i] for i in owned], self._shapes)
        return [v.to(d) for v, d in zip(views, self._dtypes, strict=True)]


class Communicator:
    """One process, no communication: the world of size 1 (the standalone optimizer)."""

    rank = 0
    world_size = 1

    bucket_numel: int | None = None

    def __init__(self, device: torch.device | str = "cpu") -> None:
        """A size-1 communicator whose tensors live on ``device``; :attr:`bytes_sent` starts at 0."""
        self.bytes_sent = 0
        self.device = torch.device(device)

    # -- primitives: every collective of the exchange layout goes through one of these ---------------
    def check_device(self, op: str, *tensors: torch.Tensor) -> None:
        """Raise RuntimeError unless every tensor lives on this communicator's device.

        NCCL takes no CPU tensor; a gloo group takes no CUDA tensor. ``op`` names the collective in
        the message.
        """
        want = self.device
        for t in tensors:
            dev = t.device
            if dev.type != want.type or (want.index is not None and dev.index != want.index):
                raise RuntimeError(
                    f"{type(self).__name__}.{op}: tensor on {dev}, but the communicator's device is {want}; "
                    "move it there before the collective"
                )

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False) -> Work:
        """``output`` (S,) <- shard ``rank`` of the sum over ranks of ``input`` (N·S,).

        Counts (N-1)·S·itemsize bytes (ring).
        """
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
        """Send ``input``'s pieces to every rank and receive ``output``'s pieces from every rank (all-to-all).

        Rank r sends ``input``'s q-th piece (``input_splits[q]`` elements) to rank q and
        receives ``output``'s p-th piece (``output_splits[p]`` elements) from rank p. Counts the
        bytes of the pieces sent to other ranks.
        """
        self.check_device("all_to_all", output, input)
        output.copy_(input)

    # -- the exchange layout ------------------------------------------------------------------------
    def to_owners(self, layout: OwnerLayout, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """Reduce every item of ``layout`` onto its owner ("to owners").

        One reduce-scatter + one all-to-all per bucket; every rank calls it with the same layout.

        Args:
            layout: Where the items go.
            tensors: ALL items of ``layout``, this rank's local contribution (any shape with the
                item's numel, any dtype, any device).
            dtype: The wire dtype.

        Returns:
            The items this rank owns, summed over ranks, in item order, in each input's shape and
            dtype, on :attr:`device`.
        """
        return self.to_owners_async(layout, tensors, dtype).wait()

    @torch.no_grad()
    def to_owners_async(
        self, layout: OwnerLayout, tensors: Sequence[torch.Tensor], dtype: torch.dtype
    ) -> PendingToOwners:
        """Start :meth:`to_owners` asynchronously.

        The reduce-scatter(s) are issued now (``async_op=True``): the inputs are copied into the
        wire buffer before this returns, so they may change afterwards. ``.wait()`` runs the
        all-to-all(s) and returns what :meth:`to_owners` returns.
        """
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
    def from_owners(self, layout: OwnerLayout, mine: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """Send every owned item to all ranks ("from owners").

        One all-to-all + one all-gather per bucket; every rank calls it with the same layout.

        Args:
            layout: Where the items come from.
            mine: The items this rank owns, in ``layout.owned_items[rank]`` order (any shape with
                the item's numel).
            dtype: The wire dtype.

        Returns:
            ALL items, in item order, shaped ``layout.shapes``, of ``dtype``, on :attr:`device`
            (views of one buffer).
        """
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
        """Gather every rank's fragments into a validated :class:`FragmentPlan`.

        A collective (one all-gather of counts, one of the triples, int64 on :attr:`device`, counted in
        :attr:`bytes_sent`); build it once and cache it.

        Args:
            layout: The items the fragments belong to.
            fragments: This rank's ``(item, start, length)`` fragments, in elements.

        Returns:
            The plan, the same on every rank.

        Raises:
            ValueError: On every rank, when the fragments overlap or leave a gap.
        """
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
        """Send every rank's fragments to the owners of their items.

        One all-to-all; no reduction: each element lives in exactly one rank's fragment.

        Args:
            plan: The fragments of every rank.
            fragments: This rank's fragment tensors (1-D, in ``plan.fragments[rank]`` order).
            dtype: The wire dtype.

        Returns:
            The items this rank owns, whole, in ``layout.owned_items[rank]`` order, shaped
            ``layout.shapes``, of ``dtype``, on :attr:`device`.
        """
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
        """Send each owner's items back to the ranks that hold their fragments.

        One all-to-all.

        Args:
            plan: The fragments of every rank.
            owned: The items this rank owns (``layout.owned_items[rank]`` order, any shape with the
                item's numel).
            dtype: The wire dtype.

        Returns:
            This rank's fragments of them (1-D, in ``plan.fragments[rank]`` order, of ``dtype``, on
            :attr:`device`).
        """
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
        """Set :attr:`bytes_sent` (bytes this rank has sent so far) back to 0."""
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
        """Wrap ``group`` (None: the default group).

        Args:
            group: The process group the collectives run on.
            bucket_numel: Most elements of one bucket's padded buffer (N·S_k) in an exchange.
            device: Where the collectives' tensors must live (CUDA for NCCL, CPU for gloo).
        """
        super().__init__(device)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bucket_numel = bucket_numel

    # -- primitives ----------------------------------------------------------------------------------
    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False) -> Work:
        """See :meth:`Communicator.reduce_scatter`; with ``async_op`` the returned work is still in flight."""
        self.check_device("reduce_scatter", output, input)
        work = getattr(dist, REDUCE_SCATTER)(output, input, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)
        self.bytes_sent += (self.world_size - 1) * output.numel() * output.element_size()
        return work if async_op and work is not None else _Done()

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """See :meth:`Communicator.all_gather`."""
        self.check_device("all_gather", output, input)
        getattr(dist, ALL_GATHER)(output, input, group=self.group)
        self.bytes_sent += (self.world_size - 1) * input.numel() * input.element_size()

    def all_to_all(
        self, output: torch.Tensor, input: torch.Tensor, input_splits: Sequence[int], output_splits: Sequence[int]
    ) -> None:
        """See :meth:`Communicator.all_to_all`."""
        self.check_device("all_to_all", output, input)
        dist.all_to_all_single(
            output,
            input,
            output_split_sizes=list(output_splits),
            input_split_sizes=list(input_splits),
            group=self.group,
        )
        others = sum(x for q, x in enumerate(input_splits) if q != self.rank)
        self.bytes_sent += others * input.element_size()
