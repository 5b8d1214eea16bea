"""Bytes each rank sends per step under the exchange layout (DESIGN.md §3), against the issue-12
targets, counted outside the project by wrapping every ``torch.distributed`` collective.

Parts (each merges its section into ``bench/results/comm_volume.json`` and redraws
``docs/comm_volume.png`` from whatever sections the file holds):

``fast`` (run under torchrun at 2 and at 4 gloo ranks): SP-NGD's fast path (ZeRO stage 0), fp32,
on the ResNet-20 of :func:`common.build_model`. Staleness ``threshold=1e9`` makes every statistic
go stale at once, so one short run has steps that refresh every statistic (0, 1, 3) and steps that
refresh none (2, 4, 5):

- (a) a step that refreshes nothing, per rank, as a ratio to a first-order ring all-reduce of the
  same gradients, 2(N-1)/N·4·P (target <= 1.10 at 2 and 4 ranks);
- (b) a step that refreshes every statistic, minus the no-refresh bytes of the same rank, against
  (N-1)/N of the packed (upper-triangle) statistics: no padding to the most-loaded owner;
- (c) the number of collectives per step: must not grow with N.

``compatible`` (torchrun at 2, or 4): the ZeRO-compatible path at ZeRO 1, 2 and 3 on the same
model: everything the rank sends during a no-refresh step (forward, backward and step; DeepSpeed's
traffic and ours) against what DeepSpeed sends for ``"optimizer": {"type": "SGD"}`` under the
same config, run and intercepted in the same script (target <= 1.15).

``analytic`` (plain python, no ranks): torchvision ResNet-50 at N = 2, 8, 64, 256, 1024 from the
real code (``build_blocks``, ``block_cost`` + ``assign_owners``, the fast path's gradient
``OwnerLayout``, ``layout_bytes`` with the communicator's default bucket size, and the two small
all-reduces), no-refresh ratio (target <= 1.10 at every N), and the refresh step with every
statistic due (fp32 and bf16 on the wire).

Counting (what a rank *sends*, ring model): all-reduce 2(N-1)/N·bytes; reduce-scatter and
all-gather (N-1)/N·(the full buffer); all-to-all the split sizes that go to other ranks;
reduce and broadcast (N-1)/N·bytes (the per-rank average of a pipelined tree or ring; DeepSpeed's
ZeRO 1/2 in 0.19.8 does not call them during a step here). A collective this script has no formula
for raises during a measured step, and on the fast path anything but all_reduce,
reduce_scatter_single (or _tensor), all_gather_single (or _into_tensor) and all_to_all_single
raises. Calls are attributed to SP-NGD when the caller of the ``torch.distributed`` function is
a file of ``spngd_ds/``; the fast path's intercepted bytes are compared with
``opt.comm_nbytes`` (the library's own count).

Commands (CPU, about 1-2 min each; OMP_NUM_THREADS=1)::

    export OMP_NUM_THREADS=1 WANDB_MODE=offline SPNGD_CHECK_AGREEMENT=0
    torchrun --nproc_per_node 2 bench/comm_volume.py fast
    torchrun --nproc_per_node 4 bench/comm_volume.py fast
    torchrun --nproc_per_node 2 bench/comm_volume.py compatible
    torchrun --nproc_per_node 4 bench/comm_volume.py compatible
    python bench/comm_volume.py analytic
    python bench/comm_volume.py report      # tables and plot from the JSON only
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGET_FAST = 1.10  # issue 12: a no-refresh fast-path step vs the first-order all-reduce
TARGET_COMPATIBLE = 1.15  # issue 12: SP-NGD's ZeRO step vs DeepSpeed's SGD step, same config
FP32, FP64 = 4, 8
WIRE = {"fp32": 4, "bf16": 2}
RESULTS = common.RESULTS_DIR / "comm_volume.json"
PLOT = common.DOCS_DIR / "comm_volume.png"
ANALYTIC_WORLDS = (2, 8, 64, 256, 1024)
#: staleness that lets every statistic go stale together: refresh at steps 0, 1, 3, 6, ...
ALL_STALE = {"threshold": 1e9, "max_interval": 1000, "noise_scale": 0.0}
FAST_STEPS = 6
COMPATIBLE_STEPS = 5
IMAGE, MICRO = 16, 8  # bytes do not depend on the batch: keep the CPU work small

# -- counting every collective ----------------------------------------------------------------------

#: every collective and point-to-point function of torch.distributed; those mapped to None have no
#: byte formula here and raise when called during a measured step
FUNCS: dict[str, str | None] = {
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter": "reduce_scatter_list",
    "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
    "_all_gather_base": "all_gather", "all_gather": "all_gather_list",
    "all_to_all_single": "all_to_all",
    "reduce": "reduce", "broadcast": "reduce",
    "barrier": "none", "monitored_barrier": "none",
    "all_gather_coalesced": None, "all_gather_object": None, "gather": None, "gather_object": None,
    "scatter": None, "scatter_object_list": None, "broadcast_object_list": None, "all_to_all": None,
    "send": None, "recv": None, "isend": None, "irecv": None, "batch_isend_irecv": None,
    "_all_gather_base_coalesced": None, "_reduce_scatter_base_coalesced": None,
}
#: what the fast path may call during a step
FAST_ALLOWED = frozenset({"all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather_into_tensor",
                          "all_gather_single", "all_to_all_single"})


def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, list | tuple):
        return sum(_nbytes(x) for x in t)
    return 0


def sent_bytes(kind: str, a: dict[str, Any], rank: int, world: int) -> float:
    """Bytes one rank sends in one collective of ``kind`` (bound arguments ``a``), ring model."""
    n = world
    if n == 1 or kind == "none":
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n * _nbytes(a.get("tensor", a.get("tensors")))
    if kind == "reduce_scatter":  # the full input buffer, (N-1)/N of it leaves each rank
        return (n - 1) / n * _nbytes(a.get("input"))
    if kind == "reduce_scatter_list":
        return (n - 1) / n * _nbytes(a.get("input_list"))
    if kind == "all_gather":  # (N-1)/N of the full output buffer
        return (n - 1) / n * _nbytes(a.get("output_tensor"))
    if kind == "all_gather_list":
        return (n - 1) * _nbytes(a.get("tensor"))
    if kind == "all_to_all":
        inp = a["input"]
        splits = a.get("input_split_sizes")
        row = inp.element_size() * (math.prod(inp.shape[1:]) if inp.dim() > 1 else 1)
        if not splits:
            return (n - 1) / n * _nbytes(inp)
        return float(sum(s for q, s in enumerate(splits) if q != rank) * row)
    if kind == "reduce":
        return (n - 1) / n * _nbytes(a.get("tensor"))
    raise KeyError(kind)


class CollectiveCounter:
    """Replaces every function of :data:`FUNCS` in ``torch.distributed`` and
    ``torch.distributed.distributed_c10d`` (and DeepSpeed's cached all-gather / reduce-scatter
    functions) by a wrapper that logs :func:`sent_bytes` and the wall seconds of each call (for an
    asynchronous one, its issue plus its ``wait``). Nested calls (one c10d function calling
    another) count once, as the outermost."""

    def __init__(self) -> None:
        import deepspeed.comm.comm as ds_comm
        from torch.distributed import distributed_c10d as c10d

        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.measuring = False
        self.allowed: frozenset[str] | None = None
        self.log: list[dict[str, Any]] = []
        self.outside: dict[str, int] = {}  # calls outside measured windows (engine setup)
        self._depth = 0
        self._wrapped: dict[int, Callable[..., Any]] = {}
        for name in FUNCS:
            for mod in (dist, c10d):
                orig = getattr(mod, name, None)
                if orig is not None:
                    setattr(mod, name, self._wrap(name, orig))
        cdb = ds_comm.cdb
        for attr, name in (("all_gather_function", "all_gather_into_tensor"),
                           ("reduce_scatter_function", "reduce_scatter_tensor")):
            orig = getattr(cdb, attr, None)
            if orig is not None:
                setattr(cdb, attr, self._wrap(getattr(orig, "__name__", name), orig))

    def _wrap(self, name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        inner = getattr(orig, "__wrapped_by_counter__", orig)
        if id(inner) in self._wrapped:
            return self._wrapped[id(inner)]
        sig = inspect.signature(inner)
        kind = FUNCS.get(name)

        @functools.wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            entry = None
            if self._depth == 0:
                entry = self._record(name, kind, sig, args, kwargs, sys._getframe(1).f_code.co_filename)
            self._depth += 1
            start = time.perf_counter()
            try:
                out = inner(*args, **kwargs)
            finally:
                self._depth -= 1
            if entry is not None:
                entry["seconds"] = time.perf_counter() - start
                if out is not None and hasattr(out, "wait"):  # async_op: the wait counts too
                    entry["async"] = True
                    out = _TimedWork(out, entry)
            return out

        wrapper.__wrapped_by_counter__ = inner  # type: ignore[attr-defined]
        self._wrapped[id(inner)] = wrapper
        return wrapper

    def _record(self, name: str, kind: str | None, sig: inspect.Signature, args: tuple[Any, ...],
                kwargs: dict[str, Any], caller: str) -> dict[str, Any] | None:
        """Log one call made inside a measured window (its entry, which the wrapper completes with
        the call's wall ``seconds``); count it in :attr:`outside` otherwise."""
        if not self.measuring:
            self.outside[name] = self.outside.get(name, 0) + 1
            return None
        if kind is None or (self.allowed is not None and name not in self.allowed):
            raise RuntimeError(f"comm_volume: unexpected collective torch.distributed.{name} during a measured step "
                               f"(called from {caller}); allowed: {sorted(self.allowed or FUNCS)}")
        bound = sig.bind_partial(*args, **kwargs).arguments
        group = bound.get("group")
        world = dist.get_world_size(group) if group is not None else self.world
        rank = dist.get_rank(group) if group is not None else self.rank
        entry = {"fn": name, "bytes": sent_bytes(kind, bound, rank, world),
                 "ours": "/spngd_ds/" in caller.replace("\\", "/"), "seconds": 0.0, "async": False}
        self.log.append(entry)
        return entry

    def window(self, allowed: frozenset[str] | None = None) -> _Window:
        """``with counter.window() as w:`` counts the calls inside; ``w.calls`` afterwards."""
        return _Window(self, allowed)


class _TimedWork:
    """The handle of an asynchronous collective: its ``wait`` adds to the call's logged seconds."""

    def __init__(self, work: Any, entry: dict[str, Any]) -> None:
        self._work, self._entry = work, entry

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._entry["seconds"] += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class _Window:
    def __init__(self, counter: CollectiveCounter, allowed: frozenset[str] | None) -> None:
        self.counter, self.allowed = counter, allowed
        self.calls: list[dict[str, Any]] = []

    def __enter__(self) -> _Window:
        c = self.counter
        c.log, c.measuring, c.allowed = [], True, self.allowed
        return self

    def __exit__(self, *exc: object) -> None:
        c = self.counter
        self.calls, c.log, c.measuring, c.allowed = c.log, [], False, None


def summarise_calls(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes (total, SP-NGD's, DeepSpeed's) and call counts by function of one measured step."""
    by_fn: dict[str, dict[str, float]] = {}
    for c in calls:
        row = by_fn.setdefault(c["fn"], {"calls": 0, "bytes": 0.0})
        row["calls"] += 1
        row["bytes"] += c["bytes"]
    return {
        "bytes": sum(c["bytes"] for c in calls),
        "ours_bytes": sum(c["bytes"] for c in calls if c["ours"]),
        "deepspeed_bytes": sum(c["bytes"] for c in calls if not c["ours"]),
        "calls": len(calls),
        "ours_calls": sum(1 for c in calls if c["ours"]),
        "by_function": by_fn,
    }


# -- analytic counts from the real code ---------------------------------------------------------------


def default_bucket_numel() -> int:
    """The bucket size (elements) that :class:`spngd_ds.comm.DistributedCommunicator` uses by default."""
    from spngd_ds.comm import DistributedCommunicator

    return int(inspect.signature(DistributedCommunicator.__init__).parameters["bucket_numel"].default)


def all_reduce_count(nbytes: int, world: int) -> int:
    """What the library counts for one all-reduce (``spngd_ds.reductions``)."""
    return int(2 * (world - 1) * nbytes / world) if world > 1 else 0


def first_order_bytes(n_params: int, world: int) -> float:
    """A first-order ring all-reduce of fp32 gradients: 2(N-1)/N · 4 · P."""
    return 2 * (world - 1) / world * FP32 * n_params


def layouts(blocks: Sequence[Any], owners: dict[str, int], world: int) -> dict[str, Any]:
    """The fast path's layouts for ``blocks`` under ``owners``: gradients (as paths/fast.py builds
    it), the packed statistics when every one is due, and the parameters gathered back with the
    refresh decisions after them (two elements per statistic, as ``FastPath._gather_parameters``
    builds it on a step where every statistic is due)."""
    from spngd_ds.blocks.shapes import full_shape
    from spngd_ds.comm import OwnerLayout, triu_numel

    due = [(b, s) for b in blocks for s in b.stats.values()]

    def packed(pairs: Sequence[tuple[Any, Any]]) -> Any:
        return OwnerLayout.build(
            [(triu_numel(s.shape[-1]) * math.prod(s.shape[:-2]), owners[b.name]) for b, s in pairs], world
        )

    # with more than one rank the A factors travel in a layout of their own, started behind the
    # backward (spngd_ds/paths/overlap.py); G and BatchNorm's F follow in the step
    early = [(b, s) for b, s in due if s.name == "A"] if world > 1 else []
    params = [(tuple(full_shape(p)), owners[b.name]) for b in blocks for p in b.params]
    return {
        "grads": OwnerLayout.build(params, world),
        "params_and_decisions": OwnerLayout.build(params + [(2, owners[b.name]) for b, _ in due], world),
        "stats": packed(due),
        "stats_parts": [packed(early), packed([(b, s) for b, s in due if s.name != "A"])] if early else [packed(due)],
        "n_params": sum(1 for b in blocks for _ in b.params),
        "n_stats": len(due),
    }


def predicted(lay: dict[str, Any], world: int, itemsize: int = FP32, bucket: int | None = None) -> dict[str, list[int]]:
    """Per rank, what the fast path sends on a step that refreshes nothing and the extra on a step
    that refreshes every statistic (``itemsize``: comm_dtype on the wire), from ``layout_bytes``."""
    from spngd_ds.comm import layout_bytes

    grads = layout_bytes(lay["grads"], FP32, "both", bucket)
    # one float64 all-reduce: the flags, and on a refresh step the due statistics' sample counts after them
    flags = all_reduce_count(FP64 * (1 + lay["n_params"]), world)
    parts = [layout_bytes(part, itemsize, "to", bucket) for part in lay["stats_parts"]]
    stats = [sum(x) for x in zip(*parts, strict=True)]
    # the decisions' share of the gather back: what the parameters' layout with them sends more
    back = layout_bytes(lay["grads"], FP32, "from", bucket)
    dec = [w - b for w, b in zip(layout_bytes(lay["params_and_decisions"], FP32, "from", bucket), back, strict=True)]
    counts = all_reduce_count(FP64 * (1 + lay["n_params"] + lay["n_stats"]), world) - flags
    return {
        "no_refresh": [g + flags for g in grads],
        "grads": grads,
        "flags": [flags] * world,
        "refresh_extra": [s + d + counts for s, d in zip(stats, dec, strict=True)],
        "stats": stats,
        "decisions": dec,
        "counts": [counts] * world,
    }


def stats_bounds(lay: dict[str, Any], world: int, itemsize: int) -> dict[str, Any]:
    """The refresh-step yardsticks: the ideal (N-1)/N of the packed statistics, what the all-to-all
    moves per rank (shard parts owned elsewhere), and what a layout padded to the most-loaded
    owner (the old one) would send."""
    geo = lay["stats"].geometry
    ideal = (world - 1) / world * itemsize * geo.total
    moved = [0] * world
    for part in lay["stats_parts"]:  # each layout's all-to-all moves the parts of its shards owned elsewhere
        for r in range(world):
            send, _ = part.geometry.to_owner_splits(r)
            moved[r] += itemsize * sum(x for q, x in enumerate(send) if q != r)
    return {"packed_elements": geo.total, "ideal_bytes": ideal, "a2a_moved_bytes": moved,
            "padded_old_bytes": (world - 1) * itemsize * max(geo.counts)}


# -- the distributed parts -------------------------------------------------------------------------------


def batches(steps: int, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random images and labels, this rank's share of each step's global batch."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        x = torch.randn(MICRO * world, 3, IMAGE, IMAGE, generator=g)
        y = torch.randint(0, 10, (MICRO * world,), generator=g)
        out.append((x[rank * MICRO : (rank + 1) * MICRO], y[rank * MICRO : (rank + 1) * MICRO]))
    return out


def ds_config(optimizer: dict[str, Any], stage: int) -> dict[str, Any]:
    cfg = common.ds_config(optimizer, MICRO, stage=stage)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cfg["zero_allow_untested_optimizer"] = True  # torch.optim.SGD under ZeRO; initialize adds it for SP-NGD
    return cfg


def spngd_optimizer() -> dict[str, Any]:
    # overlap on, as "auto" has it on an accelerator (the layouts and the analytic part assume it)
    return {"type": "SPNGD", "params": dict(common.SPNGD_PARAMS, staleness=dict(ALL_STALE), comm_dtype="fp32",
                                            overlap_statistics=True)}


def train(counter: CollectiveCounter, optimizer: dict[str, Any], stage: int, steps: int,
          allowed: frozenset[str] | None) -> tuple[list[dict[str, Any]], Any, int]:
    """A fresh engine on the seeded ResNet-20; per step (forward, backward, step) the intercepted
    summary plus, for SP-NGD, ``comm_nbytes`` and the number of statistics refreshed."""
    import spngd_ds

    model = common.build_model("resnet20", seed=0)
    n_params = common.param_count(model)
    engine, opt, _, _ = spngd_ds.initialize(model=model, model_parameters=model.parameters(),
                                            config=ds_config(optimizer, stage))
    spngd = opt if optimizer["type"] == "SPNGD" else None
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for step, (x, y) in enumerate(batches(steps, rank, world)):
        dist.barrier()
        with counter.window(allowed) as w:
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
        row = {"step": step} | summarise_calls(w.calls)
        if spngd is not None:
            row["comm_nbytes"] = int(spngd.comm_nbytes)
            row["refreshed"] = int(spngd._last_refreshed)
        rows.append(row)
    if hasattr(engine, "destroy"):
        engine.destroy()
    return rows, spngd, n_params


def gather_rows(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Every rank's rows, on every rank (indexed [rank][step])."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, rows)
    return out


def part_fast(counter: CollectiveCounter) -> dict[str, Any]:
    """Targets (a), (b), (c) on the fast path at this world size."""
    world = dist.get_world_size()
    rows, opt, n_params = train(counter, spngd_optimizer(), 0, FAST_STEPS, FAST_ALLOWED)
    per_rank = gather_rows(rows)
    lay = layouts(list(opt.blocks.values()), opt.assignment, world)
    pred = predicted(lay, world, FP32, opt.comm.bucket_numel)
    bounds = stats_bounds(lay, world, FP32)
    n_stats = lay["n_stats"]
    fo = first_order_bytes(n_params, world)
    steps_none = [r["step"] for r in rows if r["refreshed"] == 0]
    steps_all = [r["step"] for r in rows if r["refreshed"] == n_stats and r["step"] > 0]
    ranks = []
    for r in range(world):
        mine = per_rank[r]
        none = [mine[s] for s in steps_none]
        full = [mine[s] for s in steps_all]
        base = sum(x["bytes"] for x in none) / len(none)
        extra = [x["bytes"] - base for x in full]
        ranks.append({
            "rank": r,
            "owned_grad_elements": lay["grads"].geometry.counts[r],
            "owned_packed_elements": lay["stats"].geometry.counts[r],
            "no_refresh_bytes": base,
            "no_refresh_ratio": base / fo,
            "no_refresh_predicted": pred["no_refresh"][r],
            "no_refresh_comm_nbytes": [x["comm_nbytes"] for x in none],
            "no_refresh_intercepted": [x["bytes"] for x in none],
            "no_refresh_calls": [x["calls"] for x in none],
            "refresh_extra_bytes": extra,
            "refresh_extra_predicted": pred["refresh_extra"][r],
            "refresh_extra_parts_predicted": {k: pred[k][r] for k in ("stats", "decisions", "counts")},
            "refresh_comm_nbytes": [x["comm_nbytes"] for x in full],
            "refresh_intercepted": [x["bytes"] for x in full],
            "refresh_calls": [x["calls"] for x in full],
            "refresh_extra_over_ideal": max(extra) / bounds["ideal_bytes"],
            "refresh_bound_bytes": bounds["ideal_bytes"] + bounds["a2a_moved_bytes"][r]
            + pred["decisions"][r] + pred["counts"][r] + FP32 * (world - 1),
            "by_function_no_refresh": none[0]["by_function"],
            "by_function_refresh": full[0]["by_function"],
        })
    # the library's own count against the interception (an all-reduce it rounds down to a byte)
    agree = all(abs(c - i) <= 2 for rk in ranks for c, i in
                zip(rk["no_refresh_comm_nbytes"] + rk["refresh_comm_nbytes"],
                    rk["no_refresh_intercepted"] + rk["refresh_intercepted"], strict=True))
    exact = all(abs(rk["no_refresh_bytes"] - rk["no_refresh_predicted"]) <= 2
                and all(abs(e - rk["refresh_extra_predicted"]) <= 3 for e in rk["refresh_extra_bytes"])
                for rk in ranks)
    worst = max(rk["no_refresh_ratio"] for rk in ranks)
    return {
        "world_size": world,
        "model": "resnet20",
        "params": n_params,
        "blocks": len(opt.blocks),
        "statistics": n_stats,
        "assignment": opt.assignment,
        "first_order_bytes": fo,
        "steps_no_refresh": steps_none,
        "steps_refresh_all": steps_all,
        "ranks": ranks,
        "no_refresh_ratio_max": worst,
        "target_no_refresh": TARGET_FAST,
        "met_no_refresh": worst <= TARGET_FAST,
        "refresh": bounds | {"extra_max": max(max(rk["refresh_extra_bytes"]) for rk in ranks),
                             "met_no_padding": all(max(rk["refresh_extra_bytes"]) <= rk["refresh_bound_bytes"] + 2
                                                   for rk in ranks)},
        "collectives_per_step": {"no_refresh": sorted({c for rk in ranks for c in rk["no_refresh_calls"]}),
                                 "refresh_all": sorted({c for rk in ranks for c in rk["refresh_calls"]})},
        "comm_nbytes_matches_interception": agree,
        "layout_prediction_matches": exact,
        "micro_batch": MICRO,
        "image": IMAGE,
        "staleness": ALL_STALE,
    }


def part_compatible(counter: CollectiveCounter, stages: Sequence[int]) -> dict[str, Any]:
    """SP-NGD's ZeRO step (no statistic due) against DeepSpeed's SGD step, per stage."""
    world = dist.get_world_size()
    out: dict[str, Any] = {"world_size": world, "model": "resnet20", "stages": {}}
    for stage in stages:
        sgd_rows, _, n_params = train(counter, common.sgd_block(), stage, COMPATIBLE_STEPS, None)
        sp_rows, opt, _ = train(counter, spngd_optimizer(), stage, COMPATIBLE_STEPS, None)
        sgd_all, sp_all = gather_rows(sgd_rows), gather_rows(sp_rows)
        steps = [r["step"] for r in sp_rows if r["refreshed"] == 0 and r["step"] > 0]
        ranks = []
        for r in range(world):
            sgd = [sgd_all[r][s] for s in range(1, COMPATIBLE_STEPS)]
            sp = [sp_all[r][s] for s in steps]
            sgd_b = sum(x["bytes"] for x in sgd) / len(sgd)
            sp_b = sum(x["bytes"] for x in sp) / len(sp)
            ranks.append({
                "rank": r,
                "sgd_bytes": sgd_b,
                "spngd_bytes": sp_b,
                "spngd_ours_bytes": sum(x["ours_bytes"] for x in sp) / len(sp),
                "spngd_deepspeed_bytes": sum(x["deepspeed_bytes"] for x in sp) / len(sp),
                "comm_nbytes": [x["comm_nbytes"] for x in sp],
                "ratio": sp_b / sgd_b,
                "sgd_calls": [x["calls"] for x in sgd],
                "spngd_calls": [x["calls"] for x in sp],
                "spngd_ours_calls": [x["ours_calls"] for x in sp],
                "sgd_by_function": sgd[-1]["by_function"],
                "spngd_by_function": sp[-1]["by_function"],
            })
        worst = max(rk["ratio"] for rk in ranks)
        out["stages"][str(stage)] = {
            "params": n_params,
            "first_order_bytes": first_order_bytes(n_params, world),
            "steps_measured_spngd": steps,
            "ranks": ranks,
            "ratio_max": worst,
            "target": TARGET_COMPATIBLE,
            "met": worst <= TARGET_COMPATIBLE,
            "comm_nbytes_matches_interception": all(
                abs(c - rk["spngd_ours_bytes"]) <= 2 for rk in ranks for c in rk["comm_nbytes"]),
        }
        if dist.get_rank() == 0:
            print(f"compatible ZeRO {stage}: done", flush=True)
    out |= {"micro_batch": MICRO, "image": IMAGE, "staleness": ALL_STALE}
    return out


# -- the analytic part -------------------------------------------------------------------------------------


def compatible_analytic(blocks: Sequence[Any], model: torch.nn.Module, world: int) -> dict[str, float]:
    """The compatible path's two fragment exchanges for ``blocks`` at ``world`` ranks, most-loaded
    rank, over DeepSpeed's own SGD bytes, from the real assignment code on a model of DeepSpeed's
    partitions: ZeRO 1/2 cut the flat fp32 buffer of the trainable parameters (model order) into
    N contiguous equal partitions and owners come from ``assign_to_holders`` (as
    ``paths/compatible.py`` computes them); ZeRO 3 cuts every parameter into N pieces of
    ceil(numel/N) and keeps ``assign_owners``. DeepSpeed's SGD bytes, as measured at 2 and 4 ranks:
    ZeRO 1/2 an all-reduce of the gradients plus an all-gather of the parameters, 3(N-1)/N·4P;
    ZeRO 3 one all-gather plus one reduce-scatter, 2(N-1)/N·4P (a backward re-gather, which large
    models need, would add (N-1)/N·4P and only lower the ratio). Ours adds the flag all-reduce."""
    from spngd_ds.assignment import assign_owners, assign_to_holders, block_cost

    costs = [block_cost(b) for b in blocks]
    start, at = {}, 0
    for p in model.parameters():
        start[id(p)] = at
        at += p.numel()
    total = at
    part = math.ceil(total / world)
    out: dict[str, float] = {}
    for stage in ("1/2", "3"):
        held = []
        for b in blocks:
            row = [0.0] * world
            for p in b.params:
                if stage == "3":
                    piece = math.ceil(p.numel() / world)
                    for r in range(world):
                        row[r] += max(0, min(p.numel(), (r + 1) * piece) - r * piece)
                else:
                    lo, hi = start[id(p)], start[id(p)] + p.numel()
                    for r in range(world):
                        row[r] += max(0, min(hi, (r + 1) * part) - max(lo, r * part))
            held.append(row)
        owners = assign_to_holders(costs, held, world) if stage == "1/2" else assign_owners(costs, world)
        to = [0.0] * world  # elements each rank sends to other owners, and sends back as an owner
        back = [0.0] * world
        for c, row in zip(costs, held, strict=True):
            o = owners[c.name]
            for r in range(world):
                if r != o:
                    to[r] += row[r]
                    back[o] += row[r]
        n_params = sum(len(b.params) for b in blocks)
        ours = max(FP32 * (t + f) for t, f in zip(to, back, strict=True)) + all_reduce_count(FP32 * (1 + n_params),
                                                                                              world)
        ds = (3 if stage == "1/2" else 2) * (world - 1) / world * FP32 * total
        out[stage] = 1.0 + ours / ds
    return out


def part_analytic(worlds: Sequence[int] = ANALYTIC_WORLDS) -> dict[str, Any]:
    """ResNet-50 under the real assignment at each N (no ranks needed)."""
    import torchvision

    from spngd_ds.assignment import assign_owners, block_cost
    from spngd_ds.blocks import build_blocks
    from spngd_ds.staleness import RefreshSchedule

    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None)
    blocks, _ = build_blocks(model, lambda: RefreshSchedule(threshold=None), 64.0)
    costs = [block_cost(b) for b in blocks]
    n_params = common.param_count(model)
    bucket = default_bucket_numel()
    rows = []
    for n in worlds:
        t0 = time.perf_counter()
        owners = assign_owners(costs, n)
        lay = layouts(blocks, owners, n)
        fo = first_order_bytes(n_params, n)
        row: dict[str, Any] = {"N": n, "assign_s": time.perf_counter() - t0,
                               "owning_ranks": len(set(owners.values())),
                               "grad_max_over_share": max(lay["grads"].geometry.counts) * n / n_params,
                               "compatible_vs_sgd": compatible_analytic(blocks, model, n)}
        for dtype, size in WIRE.items():
            pred = predicted(lay, n, size, bucket)
            bounds = stats_bounds(lay, n, size)
            no_ref = pred["no_refresh"]
            full = [a + b for a, b in zip(no_ref, pred["refresh_extra"], strict=True)]
            if dtype == "fp32":
                row |= {"no_refresh_ratio_max": max(no_ref) / fo, "no_refresh_ratio_mean": sum(no_ref) / n / fo,
                        "flags_bytes": pred["flags"][0]}
            row[dtype] = {
                "refresh_extra_max": max(pred["refresh_extra"]),
                "refresh_extra_over_ideal_max": max(pred["refresh_extra"]) / bounds["ideal_bytes"],
                "refresh_step_ratio_max": max(full) / fo,
                "padded_old_over_ideal": bounds["padded_old_bytes"] / bounds["ideal_bytes"],
                "ideal_bytes": bounds["ideal_bytes"],
                "packed_elements": bounds["packed_elements"],
            }
        rows.append(row)
    worst = max(r["no_refresh_ratio_max"] for r in rows)
    return {"model": "torchvision resnet50", "params": n_params, "blocks": len(blocks),
            "statistics": sum(len(b.stats) for b in blocks), "bucket_numel": bucket, "rows": rows,
            "target": TARGET_FAST, "met": worst <= TARGET_FAST, "no_refresh_ratio_max": worst}


# -- output ------------------------------------------------------------------------------------------------------


def load() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def merge(key: str, sub: str | None, payload: dict[str, Any], argv: list[str], wall: float) -> dict[str, Any]:
    """Put ``payload`` (with the command, machine and load average) into the JSON under key[/sub]."""
    res = load()
    if res.get("format") != "comm_volume/2":  # the old layout's file: start afresh
        res = {"format": "comm_volume/2"}
    payload = payload | {"command": " ".join(argv), "wall_s": wall, "machine": common.machine_info(),
                         "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if sub is None:
        res[key] = payload
    else:
        res.setdefault(key, {})[sub] = payload
    res["targets"] = {"fast_no_refresh_max": TARGET_FAST, "compatible_vs_sgd_max": TARGET_COMPATIBLE}
    common.write_json("comm_volume", res)
    return res


def report(res: dict[str, Any]) -> None:
    """Print every table the JSON allows."""
    fast = res.get("fast", {})
    if fast:
        print("Fast path (ZeRO 0), ResNet-20 fp32, intercepted bytes per rank per step:")
        rows = []
        for n, f in sorted(fast.items(), key=lambda kv: int(kv[0])):
            for rk in f["ranks"]:
                rows.append([n, rk["rank"], rk["owned_grad_elements"], round(rk["no_refresh_bytes"]),
                             rk["no_refresh_predicted"], rk["no_refresh_ratio"], round(max(rk["refresh_extra_bytes"])),
                             rk["refresh_extra_predicted"], rk["refresh_extra_over_ideal"],
                             f"{rk['no_refresh_calls'][0]}/{rk['refresh_calls'][0]}"])
        print(common.format_table(["N", "rank", "owned grads", "no-refresh B", "predicted", "x first-order",
                                   "refresh extra B", "predicted", "extra / ideal", "collectives"], rows))
        for n, f in sorted(fast.items(), key=lambda kv: int(kv[0])):
            r = f["refresh"]
            print(f"  N={n}: P={f['params']:,}; no-refresh max {f['no_refresh_ratio_max']:.4f}x first-order "
                  f"(target <= {TARGET_FAST}: {'met' if f['met_no_refresh'] else 'MISSED'}); refresh extra max "
                  f"{r['extra_max']:,.0f} B vs ideal (N-1)/N·packed {r['ideal_bytes']:,.0f} B (padded layout would "
                  f"send {r['padded_old_bytes']:,} B; no padding: {'met' if r['met_no_padding'] else 'MISSED'}); "
                  f"collectives {f['collectives_per_step']}; comm_nbytes == interception: "
                  f"{f['comm_nbytes_matches_interception']}; layout_bytes == interception: "
                  f"{f['layout_prediction_matches']}")
    comp = res.get("compatible", {})
    if comp:
        print("Compatible path (no-refresh step, all collectives of forward+backward+step), vs DeepSpeed SGD:")
        rows = []
        for n, c in sorted(comp.items(), key=lambda kv: int(kv[0])):
            for st, s in c["stages"].items():
                for rk in s["ranks"]:
                    rows.append([n, st, rk["rank"], round(rk["sgd_bytes"]), round(rk["spngd_bytes"]),
                                 round(rk["spngd_deepspeed_bytes"]), round(rk["spngd_ours_bytes"]), rk["ratio"],
                                 f"{rk['sgd_calls'][0]}/{rk['spngd_calls'][0]}"])
        print(common.format_table(["N", "ZeRO", "rank", "SGD B", "SP-NGD B", "of it DS", "of it ours", "ratio",
                                   "calls SGD/SP-NGD"], rows))
        for n, c in sorted(comp.items(), key=lambda kv: int(kv[0])):
            for st, s in c["stages"].items():
                print(f"  N={n} ZeRO {st}: {s['ratio_max']:.3f}x SGD (target <= {TARGET_COMPATIBLE}: "
                      f"{'met' if s['met'] else 'MISSED'}); first-order all-reduce {s['first_order_bytes']:,.0f} B")
    ana = res.get("analytic")
    if ana:
        print(f"ResNet-50 analytic ({ana['params']:,} parameters, {ana['blocks']} blocks, {ana['statistics']} "
              f"statistics), fast path per rank, max over ranks:")
        rows = [[r["N"], r["owning_ranks"], r["grad_max_over_share"], r["no_refresh_ratio_max"],
                 r["no_refresh_ratio_mean"], r["fp32"]["refresh_extra_over_ideal_max"],
                 r["fp32"]["refresh_step_ratio_max"],
                 r["bf16"]["refresh_extra_over_ideal_max"], r["bf16"]["refresh_step_ratio_max"],
                 r["fp32"]["padded_old_over_ideal"]] for r in ana["rows"]]
        print(common.format_table(["N", "owners", "max grads/share", "no-refresh x FO", "mean", "fp32 extra/ideal",
                                   "fp32 refresh x FO", "bf16 extra/ideal", "bf16 refresh x FO",
                                   "padded/ideal (old)"], rows))
        print(f"  no-refresh max {ana['no_refresh_ratio_max']:.4f}x (target <= {TARGET_FAST} at every N: "
              f"{'met' if ana['met'] else 'MISSED'})")
        if all("compatible_vs_sgd" in r for r in ana["rows"]):
            print("ResNet-50 analytic, compatible path, a no-refresh step / DeepSpeed's SGD step, most-loaded rank:")
            print(common.format_table(["N", "ZeRO 1/2", "ZeRO 3", "1 + 1/N"],
                                      [[r["N"], r["compatible_vs_sgd"]["1/2"], r["compatible_vs_sgd"]["3"],
                                        1 + 1 / r["N"]] for r in ana["rows"]]))


def plot(res: dict[str, Any], path: Path = PLOT) -> None:
    """Three panels: no-refresh fast-path step / first-order all-reduce vs N; refresh-step extra /
    (N-1)/N packed statistics vs N; compatible path / DeepSpeed SGD per ZeRO stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    ax = axes[0]
    ana, fast, comp = res.get("analytic"), res.get("fast", {}), res.get("compatible", {})
    if ana:
        ns = [r["N"] for r in ana["rows"]]
        ax.plot(ns, [r["no_refresh_ratio_max"] for r in ana["rows"]], "o-", color="C0",
                label="ResNet-50, analytic, max rank")
        ax.plot(ns, [r["no_refresh_ratio_mean"] for r in ana["rows"]], "o--", color="C0", alpha=0.6,
                label="ResNet-50, analytic, mean")
    if fast:
        ns = sorted(int(n) for n in fast)
        ax.plot(ns, [fast[str(n)]["no_refresh_ratio_max"] for n in ns], "s", ms=8, color="C3",
                label="ResNet-20, measured (gloo), max rank")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(TARGET_FAST, color="k", ls="--", lw=1, label=f"target {TARGET_FAST}x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ranks N")
    ax.set_ylabel("bytes per rank / first-order all-reduce")
    ax.set_title("fast path, step refreshing nothing", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    if ana:
        ns = [r["N"] for r in ana["rows"]]
        for dtype, color in (("fp32", "C0"), ("bf16", "C2")):
            ax.plot(ns, [r[dtype]["refresh_extra_over_ideal_max"] for r in ana["rows"]], "o-", color=color,
                    label=f"ResNet-50, {dtype}, analytic")
        ax.plot(ns, [r["fp32"]["padded_old_over_ideal"] for r in ana["rows"]], "x:", color="0.5",
                label="padded to most-loaded owner (old)")
    if fast:
        ns = sorted(int(n) for n in fast)
        ax.plot(ns, [max(rk["refresh_extra_over_ideal"] for rk in fast[str(n)]["ranks"]) for n in ns], "s", ms=8,
                color="C3", label="ResNet-20, fp32, measured")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks N")
    ax.set_ylabel("refresh extra / ((N-1)/N · packed statistics)")
    ax.set_title("fast path, every statistic due", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[2]
    labels, vals = [], []
    for n, c in sorted(comp.items(), key=lambda kv: int(kv[0])):
        for st, s in sorted(c["stages"].items()):
            labels.append(f"ZeRO {st}\nN={n}")
            vals.append(s["ratio_max"])
    if vals:
        ax.bar(range(len(vals)), vals, color=["C1" if v > TARGET_COMPATIBLE else "C2" for v in vals])
        ax.set_xticks(range(len(vals)), labels, fontsize=8)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(TARGET_COMPATIBLE, color="k", ls="--", lw=1, label=f"target {TARGET_COMPATIBLE}x")
    ax.set_ylabel("bytes per rank / DeepSpeed SGD step (max rank)")
    ax.set_title("compatible path, ResNet-20, step refreshing nothing", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["fast", "compatible", "analytic", "report"])
    p.add_argument("--stages", type=int, nargs="*", default=[1, 2, 3], help="compatible: ZeRO stages")
    p.add_argument("--worlds", type=int, nargs="*", default=list(ANALYTIC_WORLDS), help="analytic: world sizes")
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    wall = time.perf_counter()
    argv = ["torchrun", f"--nproc_per_node {dist_world()}"] if a.part in ("fast", "compatible") else ["python"]
    argv += ["bench/comm_volume.py", *sys.argv[1:]]
    if a.part in ("analytic", "report"):
        if a.part == "analytic":
            res = merge("analytic", None, part_analytic(a.worlds), argv, time.perf_counter() - wall)
        else:
            res = load()
        report(res)
        plot(res)
        print(f"wrote {RESULTS} and {PLOT}")
        return
    common.prepare_environment()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    counter = CollectiveCounter()
    payload = part_fast(counter) if a.part == "fast" else part_compatible(counter, a.stages)
    payload["calls_outside_steps"] = counter.outside
    if dist.get_rank() == 0:
        res = merge(a.part, str(dist.get_world_size()), payload, argv, time.perf_counter() - wall)
        report({a.part: res[a.part]})
        plot(res)
        print(f"wrote {RESULTS} and {PLOT} ({time.perf_counter() - wall:.0f} s)")
    dist.barrier()
    dist.destroy_process_group()


def dist_world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


if __name__ == "__main__":
    main()
    from spngd_ds.process_exit import exit_process

    exit_process(0)  # not the interpreter's teardown, which gloo's threads can abort
