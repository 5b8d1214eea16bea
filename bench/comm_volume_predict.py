"""What the exchange sends per rank per step, predicted from the library's own code.

What the exchange sends per rank per step, predicted from the library's own code (no ranks):
the fast path's layouts and ``layout_bytes``, the compatible path's fragment exchanges on a model of
DeepSpeed's partitions, and the ResNet-50 table of ``bench/comm_volume.py analytic``
(docs/design.md, section 3). Bytes are what one rank sends, ring model.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

TARGET_FAST = 1.10  # a no-refresh fast-path step vs the first-order all-reduce
TARGET_COMPATIBLE = 1.15  # SP-NGD's ZeRO step vs DeepSpeed's SGD step, same config
FP32, FP64 = 4, 8
WIRE = {"fp32": 4, "bf16": 2}
ANALYTIC_WORLDS = (2, 8, 64, 256, 1024)


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
    """Build the fast path's exchange layouts for ``blocks`` under ``owners``.

    The fast path's layouts for ``blocks`` under ``owners``: gradients (as paths/fast.py builds it),
    the packed statistics when every one is due, and the parameters gathered back with the refresh
    decisions after them (two elements per statistic, as ``FastPath._gather_parameters`` builds it
    on a step where every statistic is due).
    """
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


def predicted(
    lay: dict[str, Any], world: int, itemsize: int = FP32, bucket: int | None = None, bounded: bool = True
) -> dict[str, list[int]]:
    """Predict the bytes the fast path sends per rank without and with a refresh.

    Per rank, what the fast path sends on a step that refreshes nothing and the extra on a step that
    refreshes every statistic (``itemsize``: comm_dtype on the wire), from ``layout_bytes``.
    ``bounded``: the step bound (or ``clip_norm``) is on, which adds one all-reduce of 4 float64
    sums (the squared norms of P(∇) and ∇, the loss, the ranks that observed one).
    """
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
    bound = all_reduce_count(FP64 * 4, world) if bounded else 0
    return {
        "no_refresh": [g + flags + bound for g in grads],
        "grads": grads,
        "flags": [flags] * world,
        "bound": [bound] * world,
        "refresh_extra": [s + d + counts for s, d in zip(stats, dec, strict=True)],
        "stats": stats,
        "decisions": dec,
        "counts": [counts] * world,
    }


def stats_bounds(lay: dict[str, Any], world: int, itemsize: int) -> dict[str, Any]:
    """Compute the refresh-step yardsticks.

    The refresh-step yardsticks: the ideal (N-1)/N of the packed statistics, what the all-to-all
    moves per rank (shard parts owned elsewhere), and what a layout padded to the most-loaded owner
    (the old one) would send.
    """
    geo = lay["stats"].geometry
    ideal = (world - 1) / world * itemsize * geo.total
    moved = [0] * world
    for part in lay["stats_parts"]:  # each layout's all-to-all moves the parts of its shards owned elsewhere
        for r in range(world):
            send, _ = part.geometry.to_owner_splits(r)
            moved[r] += itemsize * sum(x for q, x in enumerate(send) if q != r)
    return {
        "packed_elements": geo.total,
        "ideal_bytes": ideal,
        "a2a_moved_bytes": moved,
        "padded_old_bytes": (world - 1) * itemsize * max(geo.counts),
    }


def compatible_analytic(blocks: Sequence[Any], model: torch.nn.Module, world: int) -> dict[str, float]:
    """Predict the compatible path's two fragment exchanges.

    The compatible path's two fragment exchanges for ``blocks`` at ``world`` ranks, most-loaded
    rank, over DeepSpeed's own SGD bytes, from the real assignment code on a model of DeepSpeed's
    partitions: ZeRO 1/2 cut the flat fp32 buffer of the trainable parameters (model order) into
    N contiguous equal partitions and owners come from ``assign_to_holders`` (as
    ``paths/compatible.py`` computes them); ZeRO 3 cuts every parameter into N pieces of
    ceil(numel/N) and keeps ``assign_owners``. DeepSpeed's SGD bytes, as measured at 2 and 4 ranks:
    ZeRO 1/2 an all-reduce of the gradients plus an all-gather of the parameters, 3(N-1)/N·4P;
    ZeRO 3 one all-gather plus one reduce-scatter, 2(N-1)/N·4P (a backward re-gather, which large
    models need, would add (N-1)/N·4P and only lower the ratio). Ours adds the flag all-reduce.
    """
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
        ours = max(FP32 * (t + f) for t, f in zip(to, back, strict=True)) + all_reduce_count(
            FP32 * (1 + n_params), world
        )
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
        row: dict[str, Any] = {
            "N": n,
            "assign_s": time.perf_counter() - t0,
            "owning_ranks": len(set(owners.values())),
            "grad_max_over_share": max(lay["grads"].geometry.counts) * n / n_params,
            "compatible_vs_sgd": compatible_analytic(blocks, model, n),
        }
        for dtype, size in WIRE.items():
            pred = predicted(lay, n, size, bucket)
            bounds = stats_bounds(lay, n, size)
            no_ref = pred["no_refresh"]
            full = [a + b for a, b in zip(no_ref, pred["refresh_extra"], strict=True)]
            if dtype == "fp32":
                row |= {
                    "no_refresh_ratio_max": max(no_ref) / fo,
                    "no_refresh_ratio_mean": sum(no_ref) / n / fo,
                    "flags_bytes": pred["flags"][0],
                }
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
    return {
        "model": "torchvision resnet50",
        "params": n_params,
        "blocks": len(blocks),
        "statistics": sum(len(b.stats) for b in blocks),
        "bucket_numel": bucket,
        "rows": rows,
        "target": TARGET_FAST,
        "met": worst <= TARGET_FAST,
        "no_refresh_ratio_max": worst,
    }
