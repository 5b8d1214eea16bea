"""Regime ``small`` of ``bench/step_time.py`` (the default): one micro-batch a step.

Three engines live in one process, on three identical copies of one model: momentum SGD (``"type": "SGD"``, built by
DeepSpeed), SP-NGD with stale statistics off, and SP-NGD with the default staleness. They take turns on the same batches
(the order rotates every step), so machine noise hits all three. Warm-up steps are excluded; the ratio is mean SP-NGD
step / mean SGD step, where one step is forward + ``engine.backward`` + ``engine.step`` and its time is the slowest
rank's. SP-NGD's own split (capture, communication, inversion, preconditioning) comes from ``opt.metrics()``.

Writes ``bench/results/step_time_<device>.json`` and ``docs/step_time_split_<device>.png``.
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
from driver import SPLIT_KEYS, mean, slowest_rank  # noqa: E402
from step_time_capture import capture_cost  # noqa: E402
from step_time_noise import statistic_noise  # noqa: E402

ENGINES = ("sgd", "spngd_stale_off", "spngd_stale_on")
#: the step-time targets: 64 samples a step on the CPU, ResNet-50 bf16 on a GPU
SMALL_TARGET = 2.0
GPU_TARGET = 1.10


def target_for(setup: dict[str, Any]) -> float:
    """The step-time target of the small regime on this device."""
    return GPU_TARGET if setup.get("device") == "cuda" else SMALL_TARGET


@dataclass
class Trace:
    """What one engine did over the measured steps (times are this rank's, in seconds)."""

    times: list[float] = field(default_factory=list)
    split: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SPLIT_KEYS})
    refresh: list[float] = field(default_factory=list)
    interval: list[float] = field(default_factory=list)
    due: dict[str, list[float]] = field(default_factory=dict)


def batch(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, step: int, micro: int, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of global batch ``step`` (epochs of a fixed permutation, wrapping)."""
    glob = micro * world
    idx = order[(torch.arange(glob) + step * glob) % order.numel()]
    mine = idx[rank * micro : (rank + 1) * micro]
    return x[mine], y[mine]


def step_on(engine: Any, xb: torch.Tensor, yb: torch.Tensor, device: torch.device) -> float:
    """:func:`driver.timed_step` of one micro-batch, copied to the device before the clock starts."""
    xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
    return driver.timed_step(engine, [(xb, yb)], device)


def record(trace: Trace, seconds: float, opt: Any, due: dict[str, float]) -> None:
    """Append one measured step (and SP-NGD's split of it) to ``trace``."""
    trace.times.append(seconds)
    if opt is None:
        return
    for k, v in due.items():
        trace.due.setdefault(k, []).append(v)
    m = opt.metrics()
    for k in SPLIT_KEYS:
        trace.split[k].append(m[f"spngd/time_{k}"])
    trace.refresh.append(m["spngd/refresh_fraction"])
    trace.interval.append(m["spngd/mean_interval"])


def run(
    a: argparse.Namespace, rank: int, world: int, device: torch.device
) -> tuple[dict[str, Trace], list[dict[str, Any]], dict[str, float]]:
    """Time the engines alternately, then profile SP-NGD's split.

    Alternate the engines for warm-up + measured steps, rotating the order every step; then profile
    SP-NGD without staleness. Returns the traces, the profile and the final refresh intervals per
    statistic kind of SP-NGD with staleness.
    """
    extra = driver.a_samples_params(a.a_samples)
    blocks = {
        "sgd": common.sgd_block(),
        "spngd_stale_off": common.spngd_block(staleness=False, **extra),
        "spngd_stale_on": common.spngd_block(staleness=True, **extra),
    }
    engines = driver.build_engines(a.model, blocks, a.micro_batch)
    x, y = common.digits_rgb(a.image_size)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    traces = {n: Trace() for n in ENGINES}
    for step in range(a.warmup + a.steps):
        xb, yb = batch(x, y, order, step, a.micro_batch, rank, world)
        active = ENGINES if step < a.warmup + a.steps_off else ("sgd", "spngd_stale_on")
        for name in driver.rotation(active, step):
            engine, opt = engines[name]
            due = driver.due_by_kind(opt) if opt is not None else {}
            seconds = step_on(engine, xb, yb, device)
            if step >= a.warmup:
                record(traces[name], seconds, opt, due)
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}/{a.warmup + a.steps}", flush=True)
    if a.profile_steps > 0:
        profiled = profile(engines["spngd_stale_off"][0], x, y, order, a, rank, world, device)
    else:
        profiled = []
    return traces, profiled, driver.intervals_by_kind(engines["spngd_stale_on"][1])


def profile(
    engine: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    a: argparse.Namespace,
    rank: int,
    world: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Top operators by self time over ``profile_steps`` SP-NGD steps with every statistic refreshed."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(a.profile_steps):
            xb, yb = batch(x, y, order, 10_000 + i, a.micro_batch, rank, world)
            step_on(engine, xb, yb, device)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:12]
    return [
        {
            "op": e.key,
            "self_ms_per_step": getattr(e, attr) / 1e3 / a.profile_steps,
            "share": getattr(e, attr) / total,
            "calls_per_step": e.count / a.profile_steps,
        }
        for e in top
    ]


def allreduce_reference(n: int, device: torch.device, reps: int = 10) -> float:
    """Mean seconds of one all-reduce of ``n`` fp32 elements (what SGD's gradient reduction costs)."""
    buf = torch.ones(n, device=device)
    dist.all_reduce(buf)
    driver.sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(buf)
    driver.sync(device)
    return (time.perf_counter() - start) / reps


def summarise(traces: dict[str, Trace], world: int, late: int = 50) -> dict[str, Any]:
    """Means per engine (slowest rank per step), ratios to SGD over the same steps, SP-NGD's split.

    SP-NGD without staleness runs only the first ``len(its steps)`` measured steps: its ratio uses
    SGD's times over those steps. ``late_ratio_to_sgd`` is the ratio over the last ``late`` steps.
    """
    out: dict[str, Any] = {"engines": {}}
    sgd_times = slowest_rank(traces["sgd"].times, world)
    for name in ENGINES:
        tr = traces[name]
        times = sgd_times if name == "sgd" else slowest_rank(tr.times, world)
        ref = sgd_times[: len(times)]
        entry: dict[str, Any] = {
            "steps": len(times),
            "mean_step_s": mean(times),
            "median_step_s": sorted(times)[len(times) // 2],
            "sgd_mean_step_s_same_steps": mean(ref),
            "ratio_to_sgd": mean(times) / mean(ref),
            "late_ratio_to_sgd": mean(times[-late:]) / mean(ref[-late:]),
            "per_step_s": times,
        }
        if name != "sgd":
            split = driver.split_means(tr.split, world, entry["mean_step_s"])
            entry["split_mean_s"] = split
            entry["split_total_s"] = {k: v * len(times) for k, v in split.items()}
            entry["extra_over_sgd_s"] = entry["mean_step_s"] - mean(ref)
            entry["mean_refresh_fraction"] = mean(tr.refresh)
            entry["late_refresh_fraction"] = mean(tr.refresh[-late:])
            entry["refresh_fraction_per_step"] = tr.refresh
            entry["due_share_by_kind"] = {k: mean(v) for k, v in tr.due.items()}
            entry["late_due_share_by_kind"] = {k: mean(v[-late:]) for k, v in tr.due.items()}
            entry["final_mean_interval"] = tr.interval[-1] if tr.interval else 0.0
        out["engines"][name] = entry
    return out


def print_report(res: dict[str, Any]) -> None:
    """Step-time table, verdict, capture breakdown, staleness, noise diagnostic and profile."""
    eng = res["engines"]
    rows = []
    for name in ENGINES:
        e = eng[name]
        split = e.get("split_mean_s", {})
        rows.append(
            [
                name,
                e["mean_step_s"] * 1e3,
                e["median_step_s"] * 1e3,
                e["ratio_to_sgd"],
                *(split.get(k, 0.0) * 1e3 for k in (*SPLIT_KEYS, "rest")),
                e.get("mean_refresh_fraction", ""),
            ]
        )
    heads = [
        "engine",
        "mean ms",
        "median ms",
        "ratio",
        "capture ms",
        "comm ms",
        "invert ms",
        "precond ms",
        "rest ms",
        "refresh frac",
    ]
    print(common.format_table(heads, rows))
    ratio_on = eng["spngd_stale_on"]["ratio_to_sgd"]
    target = target_for(res["setup"])
    verdict = "met" if ratio_on <= target else "MISSED"
    print(f"amortized ratio with staleness on: {ratio_on:.3f} (target <= {target}: {verdict})")
    print(f"ratio with staleness off: {eng['spngd_stale_off']['ratio_to_sgd']:.3f}")
    print(f"reference all-reduce of the gradients: {res['allreduce_ref_s'] * 1e3:.2f} ms")
    rows = [[k, v] for k, v in res["capture_breakdown_ms"].items()]
    print("capture of every statistic once, one micro-batch, one process (ms):")
    print(common.format_table(["part", "ms"], rows))
    on = eng["spngd_stale_on"]
    print(
        "staleness on: mean refresh interval at the end per kind",
        {k: round(v, 2) for k, v in res["final_interval_by_kind"].items()},
        "; share of steps refreshing, whole run",
        {k: round(v, 2) for k, v in on["due_share_by_kind"].items()},
        ", last 50 steps",
        {k: round(v, 2) for k, v in on["late_due_share_by_kind"].items()},
    )
    print(f"staleness on, last 50 steps: ratio {on['late_ratio_to_sgd']:.3f}")
    if res.get("statistic_noise"):
        print(f"sampling noise of the statistics at fixed weights (threshold {common.DEFAULT_STALENESS['threshold']}):")
        rows = [
            [n, kind, v["median_r"], v["share_below_threshold"]]
            for n, kinds in res["statistic_noise"].items()
            for kind, v in kinds.items()
        ]
        print(common.format_table(["global batch", "statistic", "median r", "share r < threshold"], rows))
    if res.get("profile"):
        print("top operators, SP-NGD with staleness off (self time per step, rank 0):")
        rows = [[p["op"], p["self_ms_per_step"], p["share"], p["calls_per_step"]] for p in res["profile"]]
        print(common.format_table(["op", "ms/step", "share", "calls/step"], rows))


def plot_split(res: dict[str, Any], path: Path) -> None:
    """Stacked bars: SGD's step, SP-NGD's step split into rest/capture/comm/inversion/precondition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eng = res["engines"]
    labels = ["momentum SGD", "SP-NGD\nstaleness off", "SP-NGD\nstaleness on"]
    parts = ["rest", *SPLIT_KEYS]
    names = {
        "rest": "forward/backward/update",
        "capture": "statistics capture",
        "comm": "communication",
        "inversion": "inversion",
        "precondition": "preconditioning",
    }
    colors = {
        "rest": "#9e9e9e",
        "capture": "#1f77b4",
        "comm": "#ff7f0e",
        "inversion": "#2ca02c",
        "precondition": "#d62728",
    }
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    ax.bar(0, 1.0, color="#616161", label="SGD step (fwd/bwd/all-reduce/update)")
    for i, name in enumerate(ENGINES[1:], start=1):
        sgd = eng[name]["sgd_mean_step_s_same_steps"]  # each bar in units of SGD over the same steps
        bottom = 0.0
        for k in parts:
            h = eng[name]["split_mean_s"][k] / sgd
            ax.bar(i, h, bottom=bottom, color=colors[k], label=names[k] if i == 1 else None)
            bottom += h
        ax.text(
            i,
            bottom,
            f"{eng[name]['ratio_to_sgd']:.2f}x\n({eng[name]['steps']} steps)",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    target = target_for(res["setup"])
    ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target}x (staleness on)")
    ax.set_xticks(range(3), labels)
    ax.set_ylabel("mean step time / SGD's over the same steps")
    m = res["setup"]
    sgd_ms = eng["sgd"]["mean_step_s"] * 1e3
    ax.set_title(
        f"{m['model']} {m['image_size']}x{m['image_size']}, batch {m['micro_batch']}/rank, "
        f"{m['world_size']} ranks, {m['device']}, ZeRO 0 fp32; SGD step {sgd_ms:.0f} ms",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylim(0, max(e["ratio_to_sgd"] for e in eng.values()) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_small(a: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    """Measure on every rank and summarise on rank 0.

    Measure on every rank, summarise, and on rank 0 add the capture table (and with
    ``--noise_in_small`` the noise table), print, write the JSON and the plot.
    """
    wall, load_before = time.perf_counter(), list(os.getloadavg())
    traces, prof, intervals = run(a, rank, world, device)
    res = summarise(traces, world)
    n_params = common.param_count(common.build_model(a.model))
    res["allreduce_ref_s"] = max(slowest_rank([allreduce_reference(n_params, device)], world))
    res["profile"] = prof
    res["final_interval_by_kind"] = intervals
    if rank == 0:
        x, y = common.digits_rgb(a.image_size)
        res["capture_breakdown_ms"] = capture_cost(
            a.model, x[: a.micro_batch], y[: a.micro_batch], device, reps=3, reduce=mean
        )
        if a.noise_sizes and a.noise_in_small:
            order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
            res["statistic_noise"] = statistic_noise(a, x, y, order, device, tuple(a.noise_sizes))
    dist.barrier()
    res["setup"] = {
        "model": a.model,
        "image_size": a.image_size,
        "micro_batch": a.micro_batch,
        "world_size": world,
        "warmup": a.warmup,
        "steps": a.steps,
        "device": device.type,
        "params": n_params,
        "zero_stage": 0,
        "precision": "fp32",
        "spngd": common.SPNGD_PARAMS,
        "staleness": common.DEFAULT_STALENESS,
        "sgd": common.SGD_PARAMS,
        "a_samples": a.a_samples,
    }
    target = target_for(res["setup"])
    res["target"] = {"ratio_stale_on_max": target, "met": res["engines"]["spngd_stale_on"]["ratio_to_sgd"] <= target}
    if rank == 0:
        tag = device.type
        path = driver.finish(res, f"step_time_{tag}", load_before, wall)
        print_report(res)
        common.DOCS_DIR.mkdir(exist_ok=True)
        plot_split(res, common.DOCS_DIR / f"step_time_split_{tag}.png")
        print(f"wrote {path} and docs/step_time_split_{tag}.png; wall {res['wall_s']:.0f} s")
