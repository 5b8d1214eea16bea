"""A worker for tests/comm/test_exchange_dist.py.

The exchange layer of spngd_ds.comm on N gloo ranks, no DeepSpeed, every case in one launch. Run
under ``python -m torch.distributed.run``.

Each case checks its result against a dense reference (an all-reduce of the same data, or data
every rank can regenerate), and checks the bytes three ways: ``torch.distributed`` itself is
wrapped to record what each rank hands to every collective, and that must equal the layer's own
counter and the analytic :func:`spngd_ds.comm.layout_bytes` / ``FragmentPlan.sent_bytes``. The
number of collectives per call is recorded too. Rank 0 writes a JSON summary to ``--out``; any
failed check raises, so the launch fails. The test forks the ranks (:func:`forked_rank`, no torch
import per rank); ``python -m torch.distributed.run --nproc_per_node=N tests/support/exchange_worker.py
--out summary.json`` runs the same cases by hand.

Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from spngd_ds.comm import (  # noqa: E402
    ALL_GATHER,
    REDUCE_SCATTER,
    DistributedCommunicator,
    FragmentPlan,
    OwnerLayout,
    layout_bytes,
)


class WireLog:
    """Wraps the torch.distributed collectives the exchange may use.

    records, per call, the bytes this rank sends under the ring / all-to-all model, straight from
    the tensors and splits.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.calls: Counter[str] = Counter()
        self._orig: dict[str, Callable[..., Any]] = {}

    def install(self) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()

        def wrap(name: str, sent: Callable[..., int]) -> None:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapper(*args: Any, **kw: Any) -> Any:
                self.bytes += sent(*args, **kw)
                self.calls[name] += 1
                return orig(*args, **kw)

            setattr(dist, name, wrapper)

        def rs(output: torch.Tensor, input: torch.Tensor, *a: Any, **k: Any) -> int:
            assert input.numel() == world * output.numel(), "reduce-scatter input is not N equal shards"
            return (world - 1) * output.numel() * output.element_size()

        def ag(output: torch.Tensor, input: torch.Tensor, *a: Any, **k: Any) -> int:
            assert output.numel() == world * input.numel(), "all-gather output is not N equal shards"
            return (world - 1) * input.numel() * input.element_size()

        def a2a(
            output: torch.Tensor,
            input: torch.Tensor,
            output_split_sizes: list[int] | None = None,
            input_split_sizes: list[int] | None = None,
            **k: Any,
        ) -> int:
            assert input_split_sizes is not None and output_split_sizes is not None
            assert sum(input_split_sizes) == input.numel() and sum(output_split_sizes) == output.numel()
            return sum(n for q, n in enumerate(input_split_sizes) if q != rank) * input.element_size()

        def forbidden(*a: Any, **k: Any) -> int:
            raise AssertionError("the exchange layer must not use this collective")

        wrap(REDUCE_SCATTER, rs)
        wrap(ALL_GATHER, ag)
        wrap("all_to_all_single", a2a)
        for name in ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all"):
            wrap(name, forbidden)

    def reference_all_reduce(self, t: torch.Tensor) -> None:
        """An all-reduce for the dense references, neither recorded nor forbidden."""
        self._orig["all_reduce"](t)

    def reset(self) -> None:
        self.bytes = 0
        self.calls.clear()


def fresh(log: WireLog, comm: DistributedCommunicator) -> None:
    """Zero both byte counters (and the call log) before a measured call."""
    log.reset()
    comm.reset_bytes()


def random_layout(rng: random.Random, world: int, idle: int | None, count: int) -> OwnerLayout:
    """Items of random shapes (some empty) with unequal owners; rank ``idle`` owns nothing."""
    owners = [q for q in range(world) if q != idle]
    weights = [1 + 3 * (q % 2) for q in owners]  # unequal loads
    items: list[tuple[int | tuple[int, ...], int]] = []
    for _ in range(count):
        shape = rng.choice([(0,), (1,), (3, 4), (17,), (2, 0, 3), (5, 5, 2), (64,), (200,)])
        items.append((shape, rng.choices(owners, weights)[0]))
    return OwnerLayout.build(items, world)


def contribution(lay: OwnerLayout, rank: int, seed: int) -> list[torch.Tensor]:
    """Rank ``rank``'s local contribution to every item (fp32 and fp64 items alternate)."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return [
        torch.randn(s, generator=g, dtype=torch.float64 if i % 3 == 2 else torch.float32)
        for i, s in enumerate(lay.shapes)
    ]


TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}


def check_close(got: torch.Tensor, want: torch.Tensor, wire: torch.dtype, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if got.numel() == 0:
        return
    scale = float(want.abs().max().clamp_min(1.0))
    err = float((got.double() - want.double()).abs().max()) / scale
    tol = max(TOL[wire], TOL[got.dtype])  # the wire's rounding, or the result's when it is coarser
    assert err <= tol, f"{what}: error {err:.3g} > {tol} (wire {wire}, result {got.dtype})"


def expect_bytes(log: WireLog, comm: DistributedCommunicator, analytic: int, what: str) -> None:
    assert log.bytes == comm.bytes_sent == analytic, (
        f"{what}: wrapped {log.bytes}, counter {comm.bytes_sent}, analytic {analytic}"
    )


def case_exchange(comm: DistributedCommunicator, log: WireLog, summary: dict[str, Any]) -> None:
    world, rank = comm.world_size, comm.rank
    rng = random.Random(7 * world)
    layouts = {
        "unequal": random_layout(rng, world, None, 9),
        "idle_rank": random_layout(rng, world, world - 1, 7),
        "one_owner": OwnerLayout.build([((33,), 0), ((5, 3), 0)], world),
        "zero_numel": OwnerLayout.build([((0,), world - 1), ((2, 0), 0)], world),
        "empty": OwnerLayout.build([], world),
    }
    runs = 0
    for name, lay in layouts.items():
        for wire in (torch.float32, torch.bfloat16, torch.float64):
            for bucket in (None, max(2 * world, 40)):
                comm.bucket_numel = bucket  # type: ignore[assignment]
                seed = runs
                mine = contribution(lay, rank, seed)
                dense = [t.double().clone() for t in mine]
                for t in dense:
                    log.reference_all_reduce(t)
                owned = lay.owned_items[rank]
                live = sum(1 for b in lay.buckets(bucket) if b.geometry.total > 0)
                # to owners, sync
                fresh(log, comm)
                got = comm.to_owners(lay, mine, wire)
                expect_bytes(log, comm, layout_bytes(lay, wire.itemsize, "to", bucket)[rank], f"{name} to_owners")
                assert log.calls == Counter({REDUCE_SCATTER: live, "all_to_all_single": live}), log.calls
                assert len(got) == len(owned)
                for i, t in zip(owned, got, strict=True):
                    assert t.dtype == mine[i].dtype and t.shape == mine[i].shape
                    check_close(t, dense[i], wire, f"{name} to_owners item {i}")
                # to owners, async: the inputs may change once it is issued; the same result
                pending = comm.to_owners_async(lay, mine, wire)
                for t in mine:
                    t.mul_(-3.0)
                later = pending.wait()
                assert all(torch.equal(a, b) for a, b in zip(later, got, strict=True)), f"{name} async"
                # from owners: each owner gives an update of its items; everyone gets all, exactly
                updates = [(dense[i] * 0.5 + i).to(mine[i].dtype) for i in owned]
                fresh(log, comm)
                every = comm.from_owners(lay, updates, wire)
                expect_bytes(log, comm, layout_bytes(lay, wire.itemsize, "from", bucket)[rank], f"{name} from")
                assert log.calls == Counter({"all_to_all_single": live, ALL_GATHER: live}), log.calls
                for i, t in enumerate(every):
                    want = (dense[i] * 0.5 + i).to(mine[i].dtype).to(wire)
                    assert t.dtype == wire and t.shape == torch.Size(lay.shapes[i])
                    assert torch.equal(t, want), f"{name} from_owners item {i} (wire {wire})"
                runs += 1
    comm.bucket_numel = 64 * 2**20
    summary["exchange_runs"] = runs
    summary["buckets_small"] = len(layouts["unequal"].buckets(max(2 * world, 40)))


def deal_fragments(lay: OwnerLayout, rng: random.Random) -> list[list[tuple[int, int, int]]]:
    """Cut every item at arbitrary points and deal the pieces to ranks in a shuffled order.

    Like ZeRO partitions that split parameters anywhere; some pieces are zero-length.
    """
    world = lay.world_size
    per: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
    for i, n in enumerate(lay.numels):
        cuts = sorted({0, n, *(rng.randint(0, n) for _ in range(rng.randint(0, 4)))})
        for a, b in zip(cuts, cuts[1:], strict=False):
            per[rng.randrange(world)].append((i, a, b - a))
        if rng.random() < 0.3:
            per[rng.randrange(world)].append((i, min(n, 1), 0))
    for frags in per:
        rng.shuffle(frags)
    return per


def case_fragments(comm: DistributedCommunicator, log: WireLog, summary: dict[str, Any]) -> None:
    world, rank = comm.world_size, comm.rank
    rng = random.Random(99 + world)
    lay = random_layout(rng, world, world - 1, 8)
    g = torch.Generator().manual_seed(5)
    full = [torch.randn(s, generator=g) for s in lay.shapes]  # DeepSpeed's already-reduced gradients
    for trial in range(3):
        per = deal_fragments(lay, rng)
        mine = per[rank]
        fresh(log, comm)
        plan = comm.fragment_plan(lay, mine)
        assert plan == FragmentPlan(lay, tuple(tuple(f) for f in per)), "plan differs from the local one"
        assert log.calls == Counter({ALL_GATHER: 2})
        pieces = [full[i].reshape(-1)[s : s + n].clone() for i, s, n in mine]
        for wire in (torch.float32, torch.bfloat16):
            fresh(log, comm)
            items = comm.fragments_to_owners(plan, pieces, wire)
            expect_bytes(log, comm, plan.sent_bytes(rank, wire.itemsize, "to"), "fragments_to_owners")
            assert log.calls == Counter({"all_to_all_single": 1})
            held = sum(n for _, _, n in mine)
            assert comm.bytes_sent <= wire.itemsize * held
            for i, t in zip(lay.owned_items[rank], items, strict=True):
                assert torch.equal(t, full[i].to(wire)), f"fragments_to_owners item {i} trial {trial}"
            fresh(log, comm)
            back = comm.fragments_from_owners(plan, [t.float() * 3 for t in items], wire)
            expect_bytes(log, comm, plan.sent_bytes(rank, wire.itemsize, "from"), "fragments_from_owners")
            assert log.calls == Counter({"all_to_all_single": 1})
            assert comm.bytes_sent <= wire.itemsize * lay.geometry.counts[rank]
            for (i, s, n), t in zip(mine, back, strict=True):
                want = (full[i].reshape(-1)[s : s + n].to(wire).float() * 3).to(wire)
                assert t.shape == (n,) and torch.equal(t, want), f"fragments_from_owners item {i} trial {trial}"
    # nothing to route: no collective beyond the plan's count all-gather
    empty = OwnerLayout.build([((0,), 0), ((2, 0), world - 1)], world)
    fresh(log, comm)
    plan = comm.fragment_plan(empty, [])
    assert plan.fragments == ((),) * world
    got_empty = comm.fragments_to_owners(plan, [], torch.float32)  # the owners' zero-sized items
    assert [tuple(t.shape) for t in got_empty] == [empty.shapes[i] for i in empty.owned_items[rank]]
    assert comm.fragments_from_owners(plan, got_empty, torch.float32) == []
    assert log.calls == Counter({ALL_GATHER: 1}), log.calls
    # a partition with a gap is refused on every rank (the all-gather ran, so no rank hangs)
    per = deal_fragments(lay, rng)
    victim = next(p for p in range(world) if any(n > 0 for _, _, n in per[p]))
    j = next(k for k, f in enumerate(per[victim]) if f[2] > 0)
    i, s, n = per[victim][j]
    per[victim][j] = (i, s, n - 1)
    try:
        comm.fragment_plan(lay, per[rank])
    except ValueError as e:
        assert "gap" in str(e) and f"item {i}" in str(e), e
    else:
        raise AssertionError("a gap in the fragments was not detected")
    summary["fragment_trials"] = 3


def case_device(comm: DistributedCommunicator, log: WireLog, summary: dict[str, Any]) -> None:
    """A tensor off the communicator's device is refused by every primitive, before gloo sees it."""
    world = comm.world_size
    wrong = torch.zeros(world, device="meta")
    right = torch.zeros(world)
    cpu_comm_calls: list[tuple[str, Callable[[], object]]] = [
        ("reduce_scatter", lambda: comm.reduce_scatter(right[:1], wrong)),
        ("all_gather", lambda: comm.all_gather(wrong, right[:1])),
        ("all_to_all", lambda: comm.all_to_all(right, wrong, [1] * world, [1] * world)),
    ]
    meta_comm = DistributedCommunicator(device="meta")
    meta_calls: list[tuple[str, Callable[[], object]]] = [
        ("reduce_scatter", lambda: meta_comm.reduce_scatter(right[:1], right)),
        ("all_gather", lambda: meta_comm.all_gather(right, right[:1])),
        ("all_to_all", lambda: meta_comm.all_to_all(right, right, [1] * world, [1] * world)),
    ]
    log.reset()
    fired = 0
    for (op, call), (tdev, cdev) in [
        *((c, ("meta", "cpu")) for c in cpu_comm_calls),
        *((c, ("cpu", "meta")) for c in meta_calls),
    ]:
        try:
            call()
        except RuntimeError as e:
            msg = str(e)
            assert op in msg and f"tensor on {tdev}" in msg and f"device is {cdev}" in msg, msg
            fired += 1
        else:
            raise AssertionError(f"{op}: a {tdev} tensor passed a {cdev} communicator")
    assert not log.calls, f"a collective ran despite the device check: {log.calls}"
    summary["device_checks"] = fired


def run_cases(out: str) -> None:
    """Every case on this rank of the initialised default process group; rank 0 writes the summary."""
    torch.set_num_threads(1)
    log = WireLog()
    log.install()
    comm = DistributedCommunicator()
    summary: dict[str, Any] = {"world": comm.world_size}
    t0 = time.perf_counter()
    for case in (case_exchange, case_fragments, case_device):
        case(comm, log, summary)
    summary["seconds"] = time.perf_counter() - t0
    flags = torch.ones(1)
    log.reference_all_reduce(flags)  # every rank got here
    summary["ranks_done"] = int(flags.item())
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump(summary, f)


def forked_rank(rank: int, world: int, port: int, out: str) -> None:
    """Entry point of one forked rank (tests/comm/test_exchange_dist.py): exit code 0 on success."""
    code = 1
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        run_cases(out)
        dist.destroy_process_group()
        code = 0
    except BaseException as exc:
        import traceback

        from tests.support.distributed import PORT_TAKEN, port_taken

        traceback.print_exc()
        if port_taken(str(exc)):
            code = PORT_TAKEN  # another process bound the port first: the launcher retries
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the forked parent's atexit handlers (pytest's)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    run_cases(args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from spngd_ds.process_exit import exit_process

    exit_process(0)  # not the interpreter's teardown, which gloo's threads can abort
