"""Step time of SP-NGD against momentum SGD under the same DeepSpeed config (ZeRO 0, fp32).

Three engines live in one process, on three identical copies of one model: momentum SGD
(``"type": "SGD"``, built by DeepSpeed), SP-NGD with stale statistics off, and SP-NGD with the
default staleness. They take turns on the same batches (the order rotates every step), so machine
noise hits all three. Warm-up steps are excluded; the ratio is mean SP-NGD step / mean SGD step,
where one step is forward + ``engine.backward`` + ``engine.step`` and its time is the slowest rank's.
SP-NGD's own split (capture, communication, inversion, preconditioning) comes from
``opt.metrics()``, summed over the measured steps.

CPU (default): CIFAR-style ResNet-20 on 32x32 digits (3 channels), 32 per rank, 2 gloo ranks::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/step_time.py

With CUDA: torchvision ResNet-50 at 224x224, 32 per GPU, NCCL (one rank per GPU)::

    torchrun --nproc_per_node <gpus> bench/step_time.py

Writes ``bench/results/step_time_<device>.json`` and ``docs/step_time_split_<device>.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ENGINES = ("sgd", "spngd_stale_off", "spngd_stale_on")
SPLIT_KEYS = ("capture", "comm", "inversion", "precondition")
#: issue 13: the small regime on the CPU (64 samples a step) and ResNet-50 bf16 on a GPU
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


def parse_args() -> argparse.Namespace:
    """Command-line options; the defaults depend on whether CUDA is present."""
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50" if cuda else "resnet20", choices=["resnet20", "resnet50"])
    p.add_argument("--image_size", type=int, default=224 if cuda else 32)
    p.add_argument("--micro_batch", type=int, default=32, help="samples per rank per step")
    p.add_argument("--warmup", type=int, default=5, help="steps per engine excluded from the means")
    p.add_argument("--steps", type=int, default=150, help="measured steps of SGD and SP-NGD with staleness (>= 50)")
    p.add_argument("--steps_off", type=int, default=30, help="measured steps of SP-NGD without staleness")
    p.add_argument("--profile_steps", type=int, default=3, help="profiled SP-NGD steps (0: no profile)")
    p.add_argument("--noise_sizes", type=int, nargs="*", default=[32, 64, 128, 256, 512, 896],
                   help="global batch sizes of the statistic-noise diagnostic (none: skip)")
    p.add_argument("--regime", default="small", choices=["small", "accum", "capture", "noise"],
                   help="small: 64 samples a step (gas 1); accum: --gas micro-batches a step, a whole run; "
                   "capture: capture cost before/after (one process); noise: r against samples (one process)")
    p.add_argument("--gas", type=int, default=16, help="accum: micro-batches per step (32 x 2 ranks x 16 = 1,024)")
    p.add_argument("--accum_steps", type=int, default=15, help="accum: steps of the run (15 = 10 digits epochs)")
    p.add_argument("--repeats", type=int, default=1,
                   help="accum: whole runs, each with fresh engines; the figure is the run of median ratio")
    p.add_argument("--smb", type=int, nargs="*", default=[1],
                   help="accum: extra SP-NGD engines with these stat_micro_batches (none: only the default)")
    p.add_argument("--a_samples", type=int, default=None,
                   help="every SP-NGD engine takes A from at most this many samples per micro-batch (default: all)")
    p.add_argument("--collective_times", action="store_true",
                   help="accum: time every torch.distributed collective of each step (wrapped, as in comm_volume.py) "
                   "and report the first blocking one (where a rank waits for the slower one) apart from the others")
    p.add_argument("--overlap_variant", action="store_true",
                   help="accum: an extra SP-NGD engine with overlap_statistics: true (A sent behind the backward)")
    p.add_argument("--noise_in_small", action="store_true", help="small: also the old noise diagnostic")
    p.add_argument("--reps", type=int, default=3, help="capture: repetitions (best of)")
    p.add_argument("--r50_batch", type=int, default=2, help="capture: ResNet-50 224x224 batch (0: skip)")
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    if a.repeats < 1:
        p.error(f"--repeats must be an integer >= 1, got {a.repeats}")
    return a


def init_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device; sets the environment DeepSpeed reads."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def a_samples_params(a: argparse.Namespace) -> dict[str, Any]:
    """The SP-NGD parameters ``--a_samples`` adds (none when it is not given)."""
    return {} if a.a_samples is None else {"a_samples": a.a_samples}


def build_engines(a: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    """name -> (engine, SPNGD or None), each on its own copy of the same initial model."""
    import spngd_ds

    base = common.build_model(a.model, seed=0)
    extra = a_samples_params(a)
    blocks = {
        "sgd": common.sgd_block(),
        "spngd_stale_off": common.spngd_block(staleness=False, **extra),
        "spngd_stale_on": common.spngd_block(staleness=True, **extra),
    }
    out: dict[str, tuple[Any, Any]] = {}
    for name in ENGINES:
        cfg = common.ds_config(blocks[name], a.micro_batch, stage=0)
        model = copy.deepcopy(base)
        engine, opt, _, _ = spngd_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        out[name] = (engine, opt if name != "sgd" else None)
    return out


def batch(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, step: int, micro: int, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of global batch ``step`` (epochs of a fixed permutation, wrapping)."""
    glob = micro * world
    idx = order[(torch.arange(glob) + step * glob) % order.numel()]
    mine = idx[rank * micro : (rank + 1) * micro]
    return x[mine], y[mine]


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA kernels are asynchronous; nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(engine: Any, xb: torch.Tensor, yb: torch.Tensor, device: torch.device) -> float:
    """Wall seconds of forward + backward + step on this rank (ranks aligned by a barrier first)."""
    xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
    sync(device)
    dist.barrier()
    start = time.perf_counter()
    loss = F.cross_entropy(engine(xb), yb)
    engine.backward(loss)
    engine.step()
    sync(device)
    return time.perf_counter() - start


def due_by_kind(opt: Any) -> dict[str, float]:
    """Share of the statistics of each kind (A, G, F) due at the coming step."""
    acc: dict[str, list[bool]] = {}
    for b in opt.blocks.values():
        for st in b.stats.values():
            acc.setdefault(st.name, []).append(st.schedule.is_due(opt.step_count))
    return {k: sum(v) / len(v) for k, v in acc.items()}


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
    """Alternate the engines for warm-up + measured steps, rotating the order every step; then
    profile SP-NGD without staleness. Returns the traces, the profile and the final refresh
    intervals per statistic kind of SP-NGD with staleness."""
    engines = build_engines(a)
    x, y = common.digits_rgb(a.image_size)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    traces = {n: Trace() for n in ENGINES}
    for step in range(a.warmup + a.steps):
        xb, yb = batch(x, y, order, step, a.micro_batch, rank, world)
        active = ENGINES if step < a.warmup + a.steps_off else ("sgd", "spngd_stale_on")
        for k in range(len(active)):
            name = active[(step + k) % len(active)]
            engine, opt = engines[name]
            due = due_by_kind(opt) if opt is not None else {}
            seconds = timed_step(engine, xb, yb, device)
            if step >= a.warmup:
                record(traces[name], seconds, opt, due)
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}/{a.warmup + a.steps}", flush=True)
    if a.profile_steps > 0:
        profiled = profile(engines["spngd_stale_off"][0], x, y, order, a, rank, world, device)
    else:
        profiled = []
    return traces, profiled, intervals_by_kind(engines["spngd_stale_on"][1])


def profile(
    engine: Any, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, a: argparse.Namespace, rank: int,
    world: int, device: torch.device,
) -> list[dict[str, Any]]:
    """Top operators by self time over ``profile_steps`` SP-NGD steps with every statistic refreshed."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(a.profile_steps):
            xb, yb = batch(x, y, order, 10_000 + i, a.micro_batch, rank, world)
            timed_step(engine, xb, yb, device)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:12]
    return [
        {"op": e.key, "self_ms_per_step": getattr(e, attr) / 1e3 / a.profile_steps,
         "share": getattr(e, attr) / total, "calls_per_step": e.count / a.profile_steps}
        for e in top
    ]


def record_layer_io(model: torch.nn.Module, names: list[str], xb: torch.Tensor, yb: torch.Tensor) -> tuple[
    dict[str, torch.Tensor], dict[str, torch.Tensor]
]:
    """Inputs and output gradients of the named modules over one forward/backward of ``model``."""
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook_for(name: str) -> Any:
        def hook(module: torch.nn.Module, inp: Any, out: torch.Tensor) -> None:
            inputs[name] = inp[0].detach().clone()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    F.cross_entropy(model(xb), yb).backward()
    for h in handles:
        h.remove()
    return inputs, grads


def capture_breakdown(a: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                      reps: int = 3) -> dict[str, float]:
    """Milliseconds to capture every statistic once for one micro-batch, per kind, measured alone
    (one process, no hooks) by calling the blocks' own capture code on recorded layer inputs and
    output gradients, next to the plain forward + backward of the same micro-batch."""
    import spngd_ds
    from spngd_ds.blocks import KronBlock

    model = common.build_model(a.model).to(device)
    opt = spngd_ds.SPNGD(model, staleness=None, stat_micro_batches=None)  # every micro-batch counts
    opt.capture.remove()
    blocks = {n: b for n, b in opt.blocks.items() if b.stats}
    xb, yb = x[: a.micro_batch].to(device), y[: a.micro_batch].to(device)
    inputs, grads = record_layer_io(model, list(blocks), xb, yb)
    n = xb.shape[0]
    cost = {"A (Kronecker, forward)": 0.0, "G (Kronecker, backward)": 0.0, "F (BatchNorm)": 0.0}

    def clock(fn: Any) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        return (time.perf_counter() - start) / reps * 1e3

    for name, b in blocks.items():
        g = grads[name] / n  # the recorded gradient is of the mean loss; the blocks expect it per sample * n
        if isinstance(b, KronBlock):
            cost["A (Kronecker, forward)"] += clock(lambda b=b, name=name: b.capture_forward(inputs[name], {"A"}))
            back = b.capture_forward(inputs[name], {"G"})
            cost["G (Kronecker, backward)"] += clock(lambda back=back, g=g: back(g, 1.0))
        else:
            cost["F (BatchNorm)"] += clock(lambda b=b, name=name, g=g: b.capture_forward(inputs[name], {"F"})(g, 1.0))
    plain = common.build_model(a.model).to(device)
    cost["forward + backward, no capture"] = clock(lambda: F.cross_entropy(plain(xb), yb).backward())
    return cost


def paired_statistics(
    model: torch.nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n: int, micro: int,
    device: torch.device,
) -> list[dict[tuple[str, str], tuple[torch.Tensor, float]]]:
    """Every statistic of ``opt`` (an SPNGD without staleness on ``model``) from each of two
    disjoint batches of n samples (``order[:n]``, ``order[n:2n]``) at the same weights, captured in
    micro-batches of ``micro`` as n/micro ranks would: (block, statistic) -> (value, ρ of the value,
    spngd_ds.staleness.wishart_rho). The one capture loop of both noise diagnostics."""
    from spngd_ds.staleness import wishart_rho

    values: list[dict[tuple[str, str], tuple[torch.Tensor, float]]] = []
    for k in range(2):
        idx = order[k * n : (k + 1) * n]
        for c in range(0, n, micro):
            sub = idx[c : c + micro]
            F.cross_entropy(model(x[sub].to(device)), y[sub].to(device)).backward()  # g = N_mb · dL_mb/ds
        model.zero_grad()
        vals = {}
        for b in opt.blocks.values():
            for st in b.stats.values():
                total, count = st.take_local()
                assert total is not None
                v = b.normalise(st.name, total, count)
                vpp = getattr(b, "vectors_per_sample", {}).get(st.name, 1.0)
                vals[(b.name, st.name)] = (v, wishart_rho(v, vpp))
        values.append(vals)
    return values


def statistic_noise(a: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor,
                    device: torch.device, sizes: tuple[int, ...] = (32, 128, 512)) -> dict[str, Any]:
    """Relative change r = ||X1 - X2||_F / ||X1||_F of every statistic between two disjoint global
    batches of n samples at the same (initial) weights: the sampling noise rule 6 compares with its
    threshold. Each batch is captured in micro-batches of ``micro_batch``, as n/micro_batch ranks would."""
    import spngd_ds
    from spngd_ds.staleness import relative_change

    model = common.build_model(a.model).to(device)
    opt = spngd_ds.SPNGD(model, staleness=None, stat_micro_batches=None)  # every micro-batch counts
    threshold = common.DEFAULT_STALENESS["threshold"]
    out: dict[str, Any] = {}
    for n in sizes:
        values = paired_statistics(model, opt, x, y, order, n, a.micro_batch, device)
        ratios: dict[str, list[float]] = {}
        for key, (v, _) in values[0].items():
            ratios.setdefault(key[1], []).append(relative_change(v, values[1][key][0]))
        out[str(n)] = {kind: {"median_r": sorted(r)[len(r) // 2], "share_below_threshold": sum(q < threshold for q in r)
                              / len(r), "count": len(r)} for kind, r in ratios.items()}
    return out


def intervals_by_kind(opt: Any) -> dict[str, float]:
    """Mean refresh interval of the statistics of each kind (A, G, F) at the end of the run."""
    acc: dict[str, list[int]] = {}
    for b in opt.blocks.values():
        for st in b.stats.values():
            acc.setdefault(st.name, []).append(st.schedule.interval)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def slowest_rank(values: list[float], world: int) -> list[float]:
    """Element-wise max over ranks of a per-step list (a collective)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def allreduce_reference(n: int, device: torch.device, reps: int = 10) -> float:
    """Mean seconds of one all-reduce of ``n`` fp32 elements (what SGD's gradient reduction costs)."""
    buf = torch.ones(n, device=device)
    dist.all_reduce(buf)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(buf)
    sync(device)
    return (time.perf_counter() - start) / reps


def mean(v: list[float]) -> float:
    """Arithmetic mean; 0 for an empty list."""
    return sum(v) / len(v) if v else 0.0


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
            split = {k: mean(slowest_rank(tr.split[k], world)) for k in SPLIT_KEYS}
            split["rest"] = entry["mean_step_s"] - sum(split.values())
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
        rows.append([name, e["mean_step_s"] * 1e3, e["median_step_s"] * 1e3, e["ratio_to_sgd"],
                     *(split.get(k, 0.0) * 1e3 for k in (*SPLIT_KEYS, "rest")), e.get("mean_refresh_fraction", "")])
    heads = ["engine", "mean ms", "median ms", "ratio", "capture ms", "comm ms", "invert ms", "precond ms",
             "rest ms", "refresh frac"]
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
    print("staleness on: mean refresh interval at the end per kind", {
        k: round(v, 2) for k, v in res["final_interval_by_kind"].items()}, "; share of steps refreshing, whole run",
        {k: round(v, 2) for k, v in on["due_share_by_kind"].items()}, ", last 50 steps",
        {k: round(v, 2) for k, v in on["late_due_share_by_kind"].items()})
    print(f"staleness on, last 50 steps: ratio {on['late_ratio_to_sgd']:.3f}")
    if res.get("statistic_noise"):
        print(f"sampling noise of the statistics at fixed weights (threshold {common.DEFAULT_STALENESS['threshold']}):")
        rows = [[n, kind, v["median_r"], v["share_below_threshold"]]
                for n, kinds in res["statistic_noise"].items() for kind, v in kinds.items()]
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
    names = {"rest": "forward/backward/update", "capture": "statistics capture", "comm": "communication",
             "inversion": "inversion", "precondition": "preconditioning"}
    colors = {"rest": "#9e9e9e", "capture": "#1f77b4", "comm": "#ff7f0e", "inversion": "#2ca02c",
              "precondition": "#d62728"}
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    ax.bar(0, 1.0, color="#616161", label="SGD step (fwd/bwd/all-reduce/update)")
    for i, name in enumerate(ENGINES[1:], start=1):
        sgd = eng[name]["sgd_mean_step_s_same_steps"]  # each bar in units of SGD over the same steps
        bottom = 0.0
        for k in parts:
            h = eng[name]["split_mean_s"][k] / sgd
            ax.bar(i, h, bottom=bottom, color=colors[k], label=names[k] if i == 1 else None)
            bottom += h
        ax.text(i, bottom, f"{eng[name]['ratio_to_sgd']:.2f}x\n({eng[name]['steps']} steps)", ha="center",
                va="bottom", fontsize=9)
    target = target_for(res["setup"])
    ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target}x (staleness on)")
    ax.set_xticks(range(3), labels)
    ax.set_ylabel("mean step time / SGD's over the same steps")
    m = res["setup"]
    sgd_ms = eng["sgd"]["mean_step_s"] * 1e3
    ax.set_title(f"{m['model']} {m['image_size']}x{m['image_size']}, batch {m['micro_batch']}/rank, "
                 f"{m['world_size']} ranks, {m['device']}, ZeRO 0 fp32; SGD step {sgd_ms:.0f} ms", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_ylim(0, max(e["ratio_to_sgd"] for e in eng.values()) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Regime "accum": thousands of samples a step through ranks x gradient accumulation
# ------------------------------------------------------------------------------------------------

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


def accum_engines(a: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    """SGD and SP-NGD engines (same initial model, one DeepSpeed config each, ZeRO 0, fp32)."""
    import spngd_ds

    base = common.build_model(a.model, seed=0)
    extra = a_samples_params(a)
    blocks = {"sgd": common.sgd_block(), "spngd": common.spngd_block(staleness=True, **extra)}
    for k in a.smb:
        blocks[f"spngd_smb{k}"] = common.spngd_block(staleness=True, stat_micro_batches=k, **extra)
    if a.overlap_variant:
        blocks["spngd_overlap"] = common.spngd_block(staleness=True, overlap_statistics=True, **extra)
    out: dict[str, tuple[Any, Any]] = {}
    for name, block in blocks.items():
        cfg = common.ds_config(block, a.micro_batch, stage=0, gas=a.gas)
        model = copy.deepcopy(base)
        engine, opt, _, _ = spngd_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        out[name] = (engine, opt if name != "sgd" else None)
    return out


def accum_step(engine: Any, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, a: argparse.Namespace, rank: int,
               world: int, device: torch.device, counter: Any = None,
               collectives: list[list[tuple[float, bool]]] | None = None
               ) -> float:
    """Wall seconds of one optimizer step: ``gas`` micro-batches of forward + backward + engine.step.
    With a ``counter`` (comm_volume.CollectiveCounter), the seconds of each collective of the step
    and whether it was asynchronous, in call order, are appended to ``collectives``."""
    sync(device)
    dist.barrier()
    window = counter.window() if counter is not None else contextlib.nullcontext()
    with window as w:
        start = time.perf_counter()
        for mb in range(a.gas):
            lo = (mb * world + rank) * a.micro_batch
            sub = idx[lo : lo + a.micro_batch]
            loss = F.cross_entropy(engine(x[sub].to(device)), y[sub].to(device))
            engine.backward(loss)
            engine.step()
        sync(device)
        seconds = time.perf_counter() - start
    if counter is not None and collectives is not None:
        collectives.append([(c["seconds"], c["async"]) for c in w.calls])
    return seconds


def owned_refresh_counts(opt: Any) -> dict[tuple[str, str], int]:
    return {(b.name, s.name): s.refreshes for b in opt.owned() for s in b.stats.values()}


def run_accum(a: argparse.Namespace, rank: int, world: int, device: torch.device, counter: Any = None
              ) -> dict[str, Any]:
    """A whole run from step 0 for every engine in turn on the same global batches (the order
    alternates every step); amortized ratio = total SP-NGD time / total SGD time."""
    engines = accum_engines(a)
    x, y = common.digits_rgb(a.image_size)
    glob = a.micro_batch * world * a.gas
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    traces = {n: AccumTrace() for n in engines}
    names = list(engines)
    for step in range(a.accum_steps):
        idx = order[(torch.arange(glob) + step * glob) % order.numel()]
        for k in range(len(names)):
            name = names[(step + k) % len(names)]
            engine, opt = engines[name]
            tr = traces[name]
            before = owned_refresh_counts(opt) if opt is not None else {}
            if opt is not None:
                for kind, v in due_by_kind(opt).items():
                    tr.due.setdefault(kind, []).append(v)
            tr.times.append(accum_step(engine, x, y, idx, a, rank, world, device, counter, tr.collectives))
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
        entry: dict[str, Any] = {"steps": len(times), "total_s": sum(times), "mean_step_s": mean(times),
                                 "per_step_s": times, "ratio_to_sgd": sum(times) / sum(sgd)}
        if name != "sgd":
            split = {k: mean(slowest_rank(tr.split[k], world)) for k in SPLIT_KEYS}
            split["rest"] = entry["mean_step_s"] - sum(split.values())
            entry["split_mean_s"] = split
            entry["sgd_mean_step_s"] = mean(sgd)
            entry["refresh_fraction_by_kind"] = {k: mean(v) for k, v in tr.due.items()}
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, tr.ratios)
            kinds: dict[str, list[tuple[int, float, float]]] = {}
            for part in gathered:
                for kind, vals in part.items():
                    kinds.setdefault(kind, []).extend(vals)
            entry["r_by_kind"] = {
                kind: {"median_r": median([v[1] for v in vals]), "median_noise_floor": median([v[2] for v in vals]),
                       "refreshes_after_step0": len(vals),
                       "share_r_below_threshold": mean([float(v[1] < THRESHOLD) for v in vals])}
                for kind, vals in kinds.items()
            }
            entry["r_per_refresh"] = kinds
        if tr.collectives:
            entry["collectives"] = collective_summary(tr.collectives, world)
        out["engines"][name] = entry
    return out


def collective_summary(steps: list[list[tuple[float, bool]]], world: int) -> dict[str, Any]:
    """Per rank, the mean over steps of the seconds of the step's first blocking collective (where a
    rank waits for the slower one: the skew of the step's compute; an asynchronous one issued
    earlier, SP-NGD's A factors behind the backward, does not block there) and of the sum of all
    the others; calls per step."""
    firsts, rests = [], []
    for calls in steps:
        blocking = next((i for i, (_, is_async) in enumerate(calls) if not is_async), None)
        firsts.append(calls[blocking][0] if blocking is not None else 0.0)
        rests.append(sum(sec for i, (sec, _) in enumerate(calls) if i != blocking))
    first, rest = mean(firsts), mean(rests)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (first, rest))
    return {"calls_per_step": mean([float(len(s)) for s in steps]),
            "first_s_by_rank": [g[0] for g in gathered], "others_s_by_rank": [g[1] for g in gathered]}


def median(v: list[float]) -> float:
    """Median (upper middle); nan for an empty list."""
    finite = sorted(x for x in v if math.isfinite(x))
    return finite[len(finite) // 2] if finite else math.nan


THRESHOLD = common.DEFAULT_STALENESS["threshold"]


def print_accum(res: dict[str, Any]) -> None:
    eng = res["engines"]
    s = res["setup"]
    print(f"accumulation regime: {s['model']} {s['image_size']}x{s['image_size']}, {s['micro_batch']} per rank per "
          f"micro-batch x {s['gas']} micro-batches x {s['world_size']} ranks = {s['global_batch']} samples a step, "
          f"{s['accum_steps']} steps from step 0"
          + (f"; the median of {s['repeats']} whole runs" if s["repeats"] > 1 else ""))
    for name, vals in res.get("repeat_ratios", {}).items():
        if len(vals) > 1 and name != "sgd":
            print(f"{name}: ratio per run {', '.join(f'{v:.3f}' for v in vals)}")
    rows = []
    for name, e in eng.items():
        sp = e.get("split_mean_s", {})
        parts = (sp.get(k, 0.0) * 1e3 for k in (*SPLIT_KEYS, "rest"))
        rows.append([name, e["mean_step_s"] * 1e3, e["ratio_to_sgd"], *parts])
    print(common.format_table(["engine", "mean step ms", "amortized ratio", "capture ms", "comm ms", "invert ms",
                               "precond ms", "rest ms"], rows))
    for name, e in eng.items():
        if name == "sgd":
            continue
        verdict = "met" if e["ratio_to_sgd"] <= ACCUM_TARGET else "MISSED"
        print(f"{name}: amortized {e['ratio_to_sgd']:.3f}x SGD (target <= {ACCUM_TARGET}: {verdict})")
        rows = [[k, e["refresh_fraction_by_kind"].get(k, 0.0), v["median_r"], v["median_noise_floor"],
                 v["share_r_below_threshold"], v["refreshes_after_step0"]] for k, v in e["r_by_kind"].items()]
        print(common.format_table(["kind", "refresh fraction", "median r", "median noise floor", "share r < 0.1",
                                   "refreshes"], rows))
    rows = [[name, c["calls_per_step"], " / ".join(f"{v * 1e3:.1f}" for v in c["first_s_by_rank"]),
             " / ".join(f"{v * 1e3:.1f}" for v in c["others_s_by_rank"])]
            for name, e in eng.items() if (c := e.get("collectives"))]
    if rows:
        print("torch.distributed collectives per step (wrapped), mean ms per rank (rank 0 / rank 1 / ...):")
        print(common.format_table(["engine", "calls/step", "first blocking collective (waits for the slower rank)",
                                   "the others"], rows))


def main_accum(a: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
    wall = time.perf_counter()
    load_before = list(os.getloadavg())
    counter = None
    if a.collective_times:
        from comm_volume import CollectiveCounter

        counter = CollectiveCounter()
    runs = [run_accum(a, rank, world, device, counter) for _ in range(a.repeats)]
    ratios = [r["engines"]["spngd"]["ratio_to_sgd"] for r in runs]
    res = runs[sorted(range(len(runs)), key=lambda i: ratios[i])[len(runs) // 2]]  # the median run
    res["repeat_ratios"] = {name: [r["engines"][name]["ratio_to_sgd"] for r in runs] for name in res["engines"]}
    res["setup"] = {"model": a.model, "image_size": a.image_size, "micro_batch": a.micro_batch, "gas": a.gas,
                    "world_size": world, "global_batch": a.micro_batch * a.gas * world, "accum_steps": a.accum_steps,
                    "device": device.type, "zero_stage": 0, "precision": "fp32", "spngd": common.SPNGD_PARAMS,
                    "staleness": common.DEFAULT_STALENESS, "sgd": common.SGD_PARAMS,
                    "stat_micro_batches_variants": a.smb, "a_samples": a.a_samples, "repeats": a.repeats,
                    "collective_times": a.collective_times}
    res["target"] = {"ratio_max": ACCUM_TARGET,
                     "met_default": res["engines"]["spngd"]["ratio_to_sgd"] <= ACCUM_TARGET}
    res["machine"] = common.machine_info() | {"load_average_at_start": load_before}
    res["wall_s"] = time.perf_counter() - wall
    if rank == 0:
        print_accum(res)
        path = common.write_json(f"step_time_accum_{device.type}", res)
        print(f"wrote {path}; wall {res['wall_s']:.0f} s")


# ------------------------------------------------------------------------------------------------
# Regime "capture": cost of capturing every statistic once, this code against the previous one
# ------------------------------------------------------------------------------------------------


def legacy_capture(block: Any, inputs: torch.Tensor, grad: torch.Tensor, kind: str) -> torch.Tensor:
    """The capture code before issue 13 (F.unfold + transpose copy + column of ones; rows scaled
    before the Gram; x.mean + x.var + x-hat), kept here to time it against the blocks' own."""
    m = block.module
    if kind == "A":
        if block.is_conv:
            cols = F.unfold(inputs, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        else:
            rows = inputs.reshape(-1, inputs.shape[-1])
        rows = rows.to(block.dtype)
        if block.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows.t() @ rows
    n = grad.shape[0]
    if kind == "G":
        if block.is_conv:
            rows = grad.flatten(2).transpose(1, 2).reshape(-1, grad.shape[1])
        else:
            rows = grad.reshape(-1, grad.shape[-1])
        rows = rows.to(block.dtype) * n
        return (rows.t() @ rows) / (rows.shape[0] // n)
    x = inputs.detach().to(block.dtype)
    dims = [d for d in range(x.dim()) if d != 1]
    xhat = (x - x.mean(dim=dims, keepdim=True)) / torch.sqrt(x.var(dim=dims, unbiased=False, keepdim=True) + m.eps)
    g = grad.to(block.dtype) * n
    sd = list(range(2, x.dim()))
    u = torch.stack([(xhat * g).sum(dim=sd), g.sum(dim=sd)], dim=-1)
    return torch.einsum("nci,ncj->cij", u, u)


def new_capture(block: Any, inputs: torch.Tensor, grad: torch.Tensor, kind: str) -> None:
    """The blocks' own capture of one statistic (forward part, then the backward part if any)."""
    back = block.capture_forward(inputs, {kind})
    if back is not None:
        back(grad, 1.0)


def capture_before_after(model_kind: str, image_size: int, batch_size: int, reps: int) -> dict[str, Any]:
    """Milliseconds to capture every A, G and BatchNorm F once for one micro-batch (one process, on
    recorded layer inputs and output gradients), previous code against this code, interleaved
    layer by layer (best of ``reps``); and the plain forward + backward of that micro-batch."""
    import spngd_ds
    from spngd_ds.blocks import KronBlock

    torch.manual_seed(0)
    model = common.build_model(model_kind)
    opt = spngd_ds.SPNGD(model, staleness=None, stat_micro_batches=None)  # every micro-batch counts
    opt.capture.remove()
    blocks = {n: b for n, b in opt.blocks.items() if b.stats}
    if model_kind == "resnet20":
        x, y = common.digits_rgb(image_size)
        xb, yb = x[:batch_size], y[:batch_size]
    else:
        xb = torch.randn(batch_size, 3, image_size, image_size)
        yb = torch.randint(0, 1000, (batch_size,))
    inputs, grads = record_layer_io(model, list(blocks), xb, yb)
    n = xb.shape[0]

    def best(fn: Any) -> float:
        ts = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
        return min(ts) * 1e3

    cost = {f"{k} {w}": 0.0 for k in ("A", "G", "F") for w in ("before", "after")}
    for name, b in blocks.items():
        g = grads[name] / n  # recorded for the mean loss; the hooks expect it times 1/n (scale n)
        inp = inputs[name]
        kinds = ("A", "G") if isinstance(b, KronBlock) else ("F",)
        for kind in kinds:
            cost[f"{kind} before"] += best(lambda b=b, inp=inp, g=g, kind=kind: legacy_capture(b, inp, g, kind))
            cost[f"{kind} after"] += best(lambda b=b, inp=inp, g=g, kind=kind: new_capture(b, inp, g, kind))
        for s in b.stats.values():
            s.take_local()
    plain = common.build_model(model_kind)
    cost["forward + backward, no capture"] = best(lambda: F.cross_entropy(plain(xb), yb).backward())
    for w in ("before", "after"):
        cost[f"all {w}"] = sum(cost[f"{k} {w}"] for k in ("A", "G", "F"))
    return {k: round(v, 2) for k, v in cost.items()}


def main_capture(a: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    res: dict[str, Any] = {"setup": {"threads": 1, "reps": a.reps, "dtype": "fp32"}}
    shapes = [("resnet20", 32, a.micro_batch)] + ([("resnet50", 224, a.r50_batch)] if a.r50_batch > 0 else [])
    for kind, size, bs in shapes:
        key = f"{kind}_{size}px_batch{bs}"
        res[key] = capture_before_after(kind, size, bs, a.reps)
        print(key, res[key], flush=True)
    res["machine"] = common.machine_info()
    path = common.write_json("capture_cost_cpu", res)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
# Regime "noise": r between two independent batches of n samples at fixed weights, against n
# ------------------------------------------------------------------------------------------------


def noise_vs_samples(model_kind: str, image_size: int, sizes: list[int], micro: int) -> dict[str, Any]:
    """For each n: A, G, F of every layer from two disjoint batches of n samples of digits (train
    and validation images, 1,797 in all) at the initial weights; r = ||X1 - X2|| / ||X1|| and the
    floor ν = sqrt(ρ (1/n + 1/n)) the staleness rule predicts for it (ρ of X1, spngd_ds.staleness)."""
    import spngd_ds
    from spngd_ds.recipes.data import load_digits_split
    from spngd_ds.staleness import relative_change

    train, val = load_digits_split(image_size=image_size)
    x = torch.cat([train.tensors[0], val.tensors[0]]).expand(-1, 3, -1, -1).contiguous()
    y = torch.cat([train.tensors[1], val.tensors[1]])
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    model = common.build_model(model_kind)
    opt = spngd_ds.SPNGD(model, staleness=None, stat_micro_batches=None)  # every micro-batch counts
    out: dict[str, Any] = {}
    for n in sizes:
        if 2 * n > x.shape[0]:
            continue
        values = paired_statistics(model, opt, x, y, order, n, micro, torch.device("cpu"))
        per_kind: dict[str, list[tuple[float, float]]] = {}
        for key, (v1, rho) in values[0].items():
            r = relative_change(v1, values[1][key][0])
            per_kind.setdefault(key[1], []).append((r, math.sqrt(rho * 2.0 / n)))
        out[str(n)] = {
            kind: {"median_r": median([r for r, _ in v]), "median_floor": median([f for _, f in v]),
                   "median_r_over_floor": median([r / f for r, f in v if f > 0]),
                   "share_r_below_threshold": mean([float(r < THRESHOLD) for r, _ in v]),
                   "share_rule_grows": mean([float(r * r < THRESHOLD**2 + f * f) for r, f in v]),
                   "c_median": median([r for r, _ in v]) * math.sqrt(n), "count": len(v)}
            for kind, v in per_kind.items()
        }
        brief = {k: (round(v["median_r"], 4), round(v["median_floor"], 4)) for k, v in out[str(n)].items()}
        print(n, brief, flush=True)
    return out


def main_noise(a: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    res = {"setup": {"model": a.model, "image_size": a.image_size, "micro_batch": a.micro_batch,
                     "threshold": THRESHOLD, "weights": "initial (seed 0)"},
           "by_samples": noise_vs_samples(a.model, a.image_size, a.noise_sizes, a.micro_batch),
           "machine": common.machine_info()}
    rows = [[n, kind, v["median_r"], v["median_floor"], v["median_r_over_floor"], v["c_median"],
             v["share_r_below_threshold"], v["share_rule_grows"]]
            for n, kinds in res["by_samples"].items() for kind, v in kinds.items()]
    print(common.format_table(["n", "kind", "median r", "median floor", "r/floor", "c = r sqrt(n)", "r < 0.1",
                               "rule grows"], rows))
    path = common.write_json("statistic_noise_cpu", res)
    print(f"wrote {path}")


def main() -> None:
    """Measure on every rank, summarise, and on rank 0 print, write JSON and the plot."""
    a = parse_args()
    common.prepare_environment()
    if a.regime == "capture":
        main_capture(a)
        return
    if a.regime == "noise":
        main_noise(a)
        return
    rank, world, device = init_distributed()
    if a.regime == "accum":
        main_accum(a, rank, world, device)
        dist.barrier()
        dist.destroy_process_group()
        return
    wall = time.perf_counter()
    load_before = list(os.getloadavg())
    traces, prof, intervals = run(a, rank, world, device)
    res = summarise(traces, world)
    n_params = common.param_count(common.build_model(a.model))
    res["allreduce_ref_s"] = max(slowest_rank([allreduce_reference(n_params, device)], world))
    res["profile"] = prof
    res["final_interval_by_kind"] = intervals
    if rank == 0:
        x, y = common.digits_rgb(a.image_size)
        res["capture_breakdown_ms"] = capture_breakdown(a, x, y, device)
        if a.noise_sizes and a.noise_in_small:
            order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
            res["statistic_noise"] = statistic_noise(a, x, y, order, device, tuple(a.noise_sizes))
    dist.barrier()
    res["setup"] = {"model": a.model, "image_size": a.image_size, "micro_batch": a.micro_batch,
                    "world_size": world, "warmup": a.warmup, "steps": a.steps, "device": device.type,
                    "params": n_params, "zero_stage": 0, "precision": "fp32",
                    "spngd": common.SPNGD_PARAMS, "staleness": common.DEFAULT_STALENESS, "sgd": common.SGD_PARAMS,
                    "a_samples": a.a_samples}
    target = target_for(res["setup"])
    res["target"] = {"ratio_stale_on_max": target, "met": res["engines"]["spngd_stale_on"]["ratio_to_sgd"] <= target}
    res["machine"] = common.machine_info() | {"load_average_at_start": load_before}
    res["wall_s"] = time.perf_counter() - wall
    if rank == 0:
        print_report(res)
        tag = device.type
        path = common.write_json(f"step_time_{tag}", res)
        common.DOCS_DIR.mkdir(exist_ok=True)
        plot_split(res, common.DOCS_DIR / f"step_time_split_{tag}.png")
        print(f"wrote {path} and docs/step_time_split_{tag}.png; wall {res['wall_s']:.0f} s")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from spngd_ds.process_exit import exit_process

    exit_process(0)  # not the interpreter's teardown, which gloo's threads can abort
