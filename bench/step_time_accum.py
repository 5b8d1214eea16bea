"""Regime ``accum`` of ``bench/step_time.py``: thousands of samples a step through ranks x gradient accumulation.

SGD and SP-NGD engines (default settings, plus the ``--smb`` and ``--overlap_variant`` variants) each run a whole
``--accum_steps`` run from step 0 on the same global batches, in turns (the order rotates every step); the figure is the
amortized ratio, total SP-NGD time / total SGD time, of the median of ``--repeats`` runs::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/step_time.py --regime accum --smb --repeats 5

With ``--collective_times`` every ``torch.distributed`` collective of each step is wrapped and timed
(:class:`common.CollectiveCounter`). Writes ``bench/results/step_time_accum_<device>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import driver  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from driver import SPLIT_KEYS, THRESHOLD, mean, median, slowest_rank  # noqa: E402

ACCUM_TARGET = 1.10


@dataclass
class AccumTrace:
    """One engine over a whole accumulation run (this rank's view)."""

    times: list[float] = field(default_factory=list)
    split: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SPLIT_KEYS})
    due: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)  # kind -> (step, r, floor)
    #: per step, (seconds, asynchronous) of each collective in call order
    collectives: list[list[tuple[float, bool]]] = field(default_factory=list)


def accum_blocks(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The ``"optimizer"`` block of each engine: SGD, SP-NGD with the defaults, and the variants."""
    extra = driver.a_samples_params(a.a_samples)
    blocks = {"sgd": common.sgd_block(), "spngd": common.spngd_block(staleness=True, **extra)}
    for k in a.smb:
        blocks[f"spngd_smb{k}"] = common.spngd_block(staleness=True, stat_micro_batches=k, **extra)
    if a.overlap_variant:
        blocks["spngd_overlap"] = common.spngd_block(staleness=True, overlap_statistics=True, **extra)
    return blocks


def owned_refresh_counts(opt: Any) -> dict[tuple[str, str], int]:
    """(block, statistic) -> refreshes so far, for the blocks this rank owns."""
    return {(b.name, s.name): s.refreshes for b in opt.owned() for s in b.stats.values()}


def run_accum(
    a: argparse.Namespace, rank: int, world: int, device: torch.device, counter: common.CollectiveCounter | None = None
) -> dict[str, Any]:
    """Run every engine in turn from step 0 on the same global batches.

    A whole run from step 0 for every engine in turn on the same global batches (the order
    alternates every step); amortized ratio = total SP-NGD time / total SGD time.
    """
    engines = driver.build_engines(a.model, accum_blocks(a), a.micro_batch, gas=a.gas)
    x, y = common.digits_rgb(a.image_size)
    glob = a.micro_batch * world * a.gas
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    traces = {n: AccumTrace() for n in engines}
    for step in range(a.accum_steps):
        idx = order[(torch.arange(glob) + step * glob) % order.numel()]
        for name in driver.rotation(list(engines), step):
            engine, opt = engines[name]
            tr = traces[name]
            before = owned_refresh_counts(opt) if opt is not None else {}
            if opt is not None:
                for kind, v in driver.due_by_kind(opt).items():
                    tr.due.setdefault(kind, []).append(v)
            starts = ((mb * world + rank) * a.micro_batch for mb in range(a.gas))
            micro = ((x[idx[lo : lo + a.micro_batch]], y[idx[lo : lo + a.micro_batch]]) for lo in starts)
            tr.times.append(driver.timed_step(engine, micro, device, counter, tr.collectives))
            if opt is None:
                continue
            m = opt.metrics()
            for key in SPLIT_KEYS:
                tr.split[key].append(m[f"spngd/time_{key}"])
            for b in opt.owned():
                for s in b.stats.values():
                    if s.refreshes > before[(b.name, s.name)] and step > 0:
                        sch = s.schedule
                        tr.ratios.setdefault(s.name, []).append((step, float(sch.last_ratio), float(sch.last_floor)))
        if rank == 0:
            print(f"accum step {step + 1}/{a.accum_steps}", flush=True)
    out: dict[str, Any] = {"engines": {}}
    sgd = slowest_rank(traces["sgd"].times, world)
    for name, tr in traces.items():
        times = slowest_rank(tr.times, world)
        entry: dict[str, Any] = {
            "steps": len(times),
            "total_s": sum(times),
            "mean_step_s": mean(times),
            "per_step_s": times,
            "ratio_to_sgd": sum(times) / sum(sgd),
        }
        if name != "sgd":
            entry["split_mean_s"] = driver.split_means(tr.split, world, entry["mean_step_s"])
            entry["sgd_mean_step_s"] = mean(sgd)
            entry["refresh_fraction_by_kind"] = {k: mean(v) for k, v in tr.due.items()}
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, tr.ratios)
            kinds: dict[str, list[tuple[int, float, float]]] = {}
            for part in gathered:
                for kind, vals in part.items():
                    kinds.setdefault(kind, []).extend(vals)
            entry["r_by_kind"] = {
                kind: {
                    "median_r": median([v[1] for v in vals]),
                    "median_noise_floor": median([v[2] for v in vals]),
                    "refreshes_after_step0": len(vals),
                    "share_r_below_threshold": mean([float(v[1] < THRESHOLD) for v in vals]),
                }
                for kind, vals in kinds.items()
            }
            entry["r_per_refresh"] = kinds
        if tr.collectives:
            entry["collectives"] = collective_summary(tr.collectives, world)
        out["engines"][name] = entry
    return out


def collective_summary(steps: list[list[tuple[float, bool]]], world: int) -> dict[str, Any]:
    """Mean seconds per rank of the step's first blocking collective.

    Per rank, the mean over steps of the seconds of the step's first blocking collective (where a
    rank waits for the slower one: the skew of the step's compute; an asynchronous one issued
    earlier, SP-NGD's A factors behind the backward, does not block there) and of the sum of all the
    others; calls per step.
    """
    firsts, rests = [], []
    for calls in steps:
        blocking = next((i for i, (_, is_async) in enumerate(calls) if not is_async), None)
        firsts.append(calls[blocking][0] if blocking is not None else 0.0)
        rests.append(sum(sec for i, (sec, _) in enumerate(calls) if i != blocking))
    first, rest = mean(firsts), mean(rests)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (first, rest))
    return {
        "calls_per_step": mean([float(len(s)) for s in steps]),
        "first_s_by_rank": [g[0] for g in gathered],
        "others_s_by_rank": [g[1] for g in gathered],
    }


def print_accum(res: dict[str, Any]) -> None:
    """Step-time table with SP-NGD's split, verdict and r per kind per engine, collectives."""
    eng = res["engines"]
    s = res["setup"]
    print(
        f"accumulation regime: {s['model']} {s['image_size']}x{s['image_size']}, {s['micro_batch']} per rank per "
        f"micro-batch x {s['gas']} micro-batches x {s['world_size']} ranks = {s['global_batch']} samples a step, "
        f"{s['accum_steps']} steps from step 0"
        + (f"; the median of {s['repeats']} whole runs" if s["repeats"] > 1 else "")
    )
    for name, vals in res.get("repeat_ratios", {}).items():
        if len(vals) > 1 and name != "sgd":
            print(f"{name}: ratio per run {', '.join(f'{v:.3f}' for v in vals)}")
    rows = []
    for name, e in eng.items():
        sp = e.get("split_mean_s", {})
        parts = (sp.get(k, 0.0) * 1e3 for k in (*SPLIT_KEYS, "rest"))
        rows.append([name, e["mean_step_s"] * 1e3, e["ratio_to_sgd"], *parts])
    print(
        common.format_table(
            [
                "engine",
                "mean step ms",
                "amortized ratio",
                "capture ms",
                "comm ms",
                "invert ms",
                "precond ms",
                "rest ms",
            ],
            rows,
        )
    )
    for name, e in eng.items():
        if name == "sgd":
            continue
        verdict = "met" if e["ratio_to_sgd"] <= ACCUM_TARGET else "MISSED"
        print(f"{name}: amortized {e['ratio_to_sgd']:.3f}x SGD (target <= {ACCUM_TARGET}: {verdict})")
        rows = [
            [
                k,
                e["refresh_fraction_by_kind"].get(k, 0.0),
                v["median_r"],
                v["median_noise_floor"],
                v["share_r_below_threshold"],
                v["refreshes_after_step0"],
            ]
            for k, v in e["r_by_kind"].items()
        ]
        print(
            common.format_table(
                ["kind", "refresh fraction", "median r", "median noise floor", "share r < 0.1", "refreshes"], rows
            )
        )
    rows = [
        [
            name,
            c["calls_per_step"],
            " / ".join(f"{v * 1e3:.1f}" for v in c["first_s_by_rank"]),
            " / ".join(f"{v * 1e3:.1f}" for v in c["others_s_by_rank"]),
        ]
        for name, e in eng.items()
        if (c := e.get("collectives"))
    ]
    if rows:
        print("torch.distributed collectives per step (wrapped), mean ms per rank (rank 0 / rank 1 / ...):")
        print(
            common.format_table(
                ["engine", "calls/step", "first blocking collective (waits for the slower rank)", "the others"], rows
            )
        )


def main_accum(a: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    """``--repeats`` whole runs; the median run (by SP-NGD's ratio) is printed and written."""
    wall, load_before = time.perf_counter(), list(os.getloadavg())
    counter = common.CollectiveCounter() if a.collective_times else None
    runs = [run_accum(a, rank, world, device, counter) for _ in range(a.repeats)]
    ratios = [r["engines"]["spngd"]["ratio_to_sgd"] for r in runs]
    res = runs[sorted(range(len(runs)), key=lambda i: ratios[i])[len(runs) // 2]]  # the median run
    res["repeat_ratios"] = {name: [r["engines"][name]["ratio_to_sgd"] for r in runs] for name in res["engines"]}
    res["setup"] = {
        "model": a.model,
        "image_size": a.image_size,
        "micro_batch": a.micro_batch,
        "gas": a.gas,
        "world_size": world,
        "global_batch": a.micro_batch * a.gas * world,
        "accum_steps": a.accum_steps,
        "device": device.type,
        "zero_stage": 0,
        "precision": "fp32",
        "spngd": common.SPNGD_PARAMS,
        "staleness": common.DEFAULT_STALENESS,
        "sgd": common.SGD_PARAMS,
        "stat_micro_batches_variants": a.smb,
        "a_samples": a.a_samples,
        "repeats": a.repeats,
        "collective_times": a.collective_times,
    }
    res["target"] = {"ratio_max": ACCUM_TARGET, "met_default": res["engines"]["spngd"]["ratio_to_sgd"] <= ACCUM_TARGET}
    if rank == 0:
        path = driver.finish(res, f"step_time_accum_{device.type}", load_before, wall)
        print_accum(res)
        print(f"wrote {path}; wall {res['wall_s']:.0f} s")
