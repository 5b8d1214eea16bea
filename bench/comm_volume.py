"""Bytes each rank sends per step: SP-NGD's fast path (ZeRO 0), its compatible path (ZeRO 1 and 2)
and the first-order all-reduce of the same model, with fp32 and bf16 statistics on the wire.

Three figures per step, all under the ring model ((N-1)·chunk per reduce-scatter or all-gather,
2(N-1)/N·bytes per all-reduce):

- **ours**: ``opt.comm_nbytes``, what spngd_ds's communicator counted for the step;
- **analytic**: the same predicted here from the assignment, the parameter shapes and the set of
  statistics due that step (plus, for the compatible path, DeepSpeed's own part, which our code does
  not count: its gradient all-reduce and parameter all-gather, and the all-reduce behind
  ``safe_get_full_grad`` that the compatible path calls for every parameter; see
  :func:`analytic_deepspeed`);
- **intercepted**: every ``torch.distributed`` collective issued during the step (forward,
  backward and step; DeepSpeed's and ours), counted by wrapping the functions.

CPU, 2 gloo ranks, the ResNet-20 of bench/step_time.py at 32 samples per rank, default staleness::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/comm_volume.py

Writes ``bench/results/comm_volume.json`` and ``docs/comm_volume.png``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGET = 1.3
FP32, FP64 = 4, 8
WIRE = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Case:
    """One configuration to measure."""

    name: str
    optimizer: str  # "sgd" or "spngd"
    stage: int = 0
    staleness: bool = True
    comm_dtype: str = "fp32"
    steps: int | None = None  # None: --steps
    bucket_allreduce: bool = True  # DeepSpeed's zero_optimization.use_multi_rank_bucket_allreduce


CASES = (
    Case("first_order_allreduce", "sgd"),
    Case("fast_fp32", "spngd"),
    Case("fast_bf16", "spngd", comm_dtype="bf16"),
    Case("fast_fp32_staleness_off", "spngd", staleness=False, steps=8),
    Case("compatible_zero1_fp32", "spngd", stage=1, steps=10),
    Case("compatible_zero2_fp32", "spngd", stage=2),
    Case("compatible_zero2_fp32_reduce", "spngd", stage=2, steps=10, bucket_allreduce=False),
)


# -- counting every collective ------------------------------------------------------------------------
def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, list | tuple):
        return sum(_nbytes(x) for x in t)
    return 0


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, *names: str) -> Any:
    for n in names:
        if n in kwargs:
            return kwargs[n]
    return args[i] if len(args) > i else None


def ring_bytes(fn: str, args: tuple[Any, ...], kwargs: dict[str, Any], rank: int, world: int) -> float:
    """Bytes this rank sends for one collective under the ring model (point-to-point for reduce and
    broadcast: the root receives, the others send the whole tensor)."""
    n = world
    if fn in ("all_reduce", "all_reduce_coalesced"):
        return 2 * (n - 1) / n * _nbytes(_arg(args, kwargs, 0, "tensor", "tensors"))
    if fn in ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter"):
        return (n - 1) * _nbytes(_arg(args, kwargs, 0, "output"))
    if fn in ("all_gather_into_tensor", "_all_gather_base"):
        return (n - 1) * _nbytes(_arg(args, kwargs, 1, "input_tensor"))
    if fn == "all_gather":
        return (n - 1) * _nbytes(_arg(args, kwargs, 1, "tensor"))
    if fn == "reduce":
        return 0 if _arg(args, kwargs, 1, "dst") == rank else _nbytes(_arg(args, kwargs, 0, "tensor"))
    if fn == "broadcast":
        return (n - 1) * _nbytes(_arg(args, kwargs, 0, "tensor")) if _arg(args, kwargs, 1, "src") == rank else 0
    return 0


class CollectiveCounter:
    """Wraps ``torch.distributed`` collectives (and DeepSpeed's cached references to them) and
    adds up :func:`ring_bytes` per call; nested calls count once."""

    FUNCS = ("all_reduce", "all_reduce_coalesced", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter",
             "all_gather_into_tensor", "_all_gather_base", "all_gather", "reduce", "broadcast")

    def __init__(self) -> None:
        self.bytes = 0.0
        self.calls: dict[str, int] = {}
        self.bytes_by_fn: dict[str, float] = {}
        self._depth = 0
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        for fn in self.FUNCS:
            if hasattr(dist, fn):
                setattr(dist, fn, self._wrap(fn, getattr(dist, fn)))
        from deepspeed.comm import comm as ds_comm

        cdb = ds_comm.cdb
        for attr in ("all_gather_function", "reduce_scatter_function"):
            orig = getattr(cdb, attr, None)
            if orig is not None:
                setattr(cdb, attr, self._wrap(orig.__name__, orig))

    def _wrap(self, fn: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                nbytes = ring_bytes(fn, args, kwargs, self.rank, self.world)
                self.bytes += nbytes
                self.calls[fn] = self.calls.get(fn, 0) + 1
                self.bytes_by_fn[fn] = self.bytes_by_fn.get(fn, 0.0) + nbytes
            self._depth += 1
            try:
                return orig(*args, **kwargs)
            finally:
                self._depth -= 1

        return wrapper

    def take(self) -> float:
        out, self.bytes = self.bytes, 0.0
        return out


# -- the analytic formula --------------------------------------------------------------------------------
def packed_numel(shape: tuple[int, ...]) -> int:
    """Elements of a symmetric statistic of ``shape`` (d, d) or (C, 2, 2) as its packed upper triangle."""
    d = shape[-1]
    lead = 1
    for s in shape[:-2]:
        lead *= s
    return lead * d * (d + 1) // 2


def by_owner(opt: Any, size: Callable[[Any], int], world: int) -> list[int]:
    """Sum of ``size(block)`` over the blocks each rank owns."""
    out = [0] * world
    for b in opt.blocks.values():
        out[opt.assignment[b.name]] += size(b)
    return out


def analytic_ours(opt: Any, due: list[tuple[Any, Any]], world: int, compatible: bool) -> float:
    """Bytes spngd_ds's communicator sends in one step (ring model, one bucket per collective)."""
    n1 = world - 1
    grads = by_owner(opt, lambda b: sum(p.numel() for p in b.params), world)
    stats, count = [0] * world, [0] * world
    for b, s in due:
        r = opt.assignment[b.name]
        stats[r] += packed_numel(tuple(s.shape))
        count[r] += 1
    total = 0.0
    if due:
        total += n1 * max(stats) * WIRE[opt.config.comm_dtype]  # reduce-scatter of packed statistics
        total += n1 * max(count) * FP64  # reduce-scatter of sample counts
        total += n1 * max(count) * 2 * FP64  # all-gather of refresh decisions
    if compatible:
        return total + n1 * max(grads) * FP32  # all-gather of preconditioned gradients
    return total + 2 * n1 * max(grads) * FP32  # reduce-scatter of gradients + all-gather of parameters


def analytic_deepspeed(n_params: int, world: int, stage: int, bucket_allreduce: bool = True) -> float:
    """DeepSpeed's own bytes per step that our code does not count. Fast path (ZeRO 0): none (the
    engine's all-reduce is off). ZeRO 1/2 in DeepSpeed 0.19.8: the gradient buckets are all-reduced
    when ``use_multi_rank_bucket_allreduce`` is true, its default (2(N-1)/N), else reduced to the rank
    owning each partition ((N-1)/N); the updated partitions are all-gathered ((N-1)/N); and
    ``safe_get_full_grad``, which the compatible path calls for every parameter on every rank, is one
    all-reduce per parameter (2(N-1)/N)."""
    if stage == 0:
        return 0.0
    grads = 2 if bucket_allreduce else 1
    return (grads + 1 + 2) * (world - 1) / world * n_params * FP32


def first_order_bytes(n_params: int, world: int) -> float:
    """The first-order all-reduce of fp32 gradients: 2(N-1)/N · 4 · P."""
    return 2 * (world - 1) / world * n_params * FP32


# -- running one case -------------------------------------------------------------------------------------
@dataclass
class Series:
    """Per-step bytes of one case on this rank."""

    ours: list[float] = field(default_factory=list)
    analytic: list[float] = field(default_factory=list)
    intercepted: list[float] = field(default_factory=list)
    refresh: list[float] = field(default_factory=list)
    by_fn: dict[str, float] = field(default_factory=dict)
    calls: dict[str, float] = field(default_factory=dict)


def build(case: Case, micro: int) -> tuple[Any, Any]:
    """A fresh engine (and SPNGD, or None for SGD) for ``case`` on the seeded ResNet-20."""
    import spngd_ds

    block = common.sgd_block() if case.optimizer == "sgd" else common.spngd_block(case.staleness, case.comm_dtype)
    model = common.build_model("resnet20", seed=0)
    cfg = common.ds_config(block, micro, stage=case.stage)
    if not case.bucket_allreduce:
        cfg["zero_optimization"]["use_multi_rank_bucket_allreduce"] = False
    engine, opt, _, _ = spngd_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine, opt if case.optimizer == "spngd" else None


def run_case(case: Case, steps: int, micro: int, counter: CollectiveCounter) -> Series:
    """Train ``steps`` steps on the digits batches; record the three byte counts of every step."""
    engine, opt = build(case, micro)
    rank, world = dist.get_rank(), dist.get_world_size()
    n_params = common.param_count(engine.module)
    x, y = common.digits_rgb(32)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    series = Series()
    bytes0, calls0 = dict(counter.bytes_by_fn), dict(counter.calls)
    for step in range(steps):
        idx = order[(torch.arange(micro * world) + step * micro * world) % order.numel()]
        mine = idx[rank * micro : (rank + 1) * micro]
        due = [] if opt is None else [
            (b, s) for b in opt.blocks.values() for s in b.stats.values() if s.schedule.is_due(opt.step_count)
        ]
        counter.take()
        loss = F.cross_entropy(engine(x[mine]), y[mine])
        engine.backward(loss)
        engine.step()
        series.intercepted.append(counter.take())
        if opt is None:
            series.ours.append(0.0)
            series.analytic.append(first_order_bytes(n_params, world))
            continue
        series.ours.append(float(opt.comm_nbytes))
        series.analytic.append(
            analytic_ours(opt, due, world, case.stage > 0)
            + analytic_deepspeed(n_params, world, case.stage, case.bucket_allreduce)
        )
        series.refresh.append(opt.metrics()["spngd/refresh_fraction"])
    series.by_fn = {k: (v - bytes0.get(k, 0.0)) / steps for k, v in counter.bytes_by_fn.items()}
    series.calls = {k: (v - calls0.get(k, 0)) / steps for k, v in counter.calls.items()}
    return series


def mean(v: list[float]) -> float:
    """Arithmetic mean; 0 for an empty list."""
    return sum(v) / len(v) if v else 0.0


def rank_mean(values: list[float]) -> list[float]:
    """Element-wise mean over ranks (a collective)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def summarise(case: Case, s: Series, window: int, n_params: int, world: int) -> dict[str, Any]:
    """Steady-state means (last ``window`` steps, averaged over ranks) and ratios to first order."""
    fo = first_order_bytes(n_params, world)
    ours, ana, inter = rank_mean(s.ours), rank_mean(s.analytic), rank_mean(s.intercepted)
    w = min(window, len(ours))
    ds_part = 0.0
    if case.optimizer == "spngd":
        ds_part = analytic_deepspeed(n_params, world, case.stage, case.bucket_allreduce)
    out: dict[str, Any] = {
        "case": case.__dict__,
        "steps": len(ours),
        "window": w,
        "ours_mean": mean(ours[-w:]),
        "deepspeed_analytic": ds_part,
        "analytic_mean": mean(ana[-w:]),
        "intercepted_mean": mean(inter[-w:]),
        "first_order_bytes": fo,
        "refresh_fraction_mean": mean(s.refresh[-w:]),
        "intercepted_by_function_per_step": s.by_fn,
        "intercepted_calls_per_step": s.calls,
        "per_step": {"ours": ours, "analytic": ana, "intercepted": inter, "refresh_fraction": s.refresh},
    }
    total = out["intercepted_mean"] if case.optimizer == "sgd" else out["ours_mean"] + ds_part
    out["total_mean"] = total
    out["ratio_to_first_order"] = total / fo
    if case.optimizer == "sgd":  # nothing of ours to count: check DeepSpeed's all-reduce against the formula
        out["analytic_matches"] = all(abs(i - a) <= 1e-3 * a for i, a in zip(inter, ana, strict=True))
    else:
        out["analytic_matches"] = all(abs(o + ds_part - a) <= 1e-9 * a for o, a in zip(ours, ana, strict=True))
    return out


def print_report(res: dict[str, Any]) -> None:
    """The results table, the verdict against the target and the analytic projections."""
    rows = []
    for r in res["cases"].values():
        rows.append([r["case"]["name"], r["steps"], r["window"], common.mib(r["ours_mean"]),
                     common.mib(r["deepspeed_analytic"]), common.mib(r["total_mean"]), common.mib(r["analytic_mean"]),
                     common.mib(r["intercepted_mean"]), r["ratio_to_first_order"], r["refresh_fraction_mean"],
                     "yes" if r["analytic_matches"] else "NO"])
    heads = ["case", "steps", "window", "ours MiB", "+DS MiB", "total MiB", "analytic MiB", "intercepted MiB",
             "x first-order", "refresh frac", "matches formula"]
    print(common.format_table(heads, rows))
    if res["target"]["met"] is not None:
        fast = res["cases"]["fast_fp32"]["ratio_to_first_order"]
        print(f"fast path, fp32, staleness on, steady window: {fast:.3f}x first-order "
              f"(target <= {TARGET}: {'met' if res['target']['met'] else 'MISSED'})")
    f = res["floor"]
    print(f"fast path, analytic: no statistic due {f['no_statistics_ratio']:.3f}x; every statistic every step "
          f"{f['all_statistics_ratio']:.3f}x; all at max_interval {f['max_interval_ratio']:.3f}x; G and F every "
          f"step, A at max_interval {f['a_stale_ratio']:.3f}x first-order")
    print(f"gradient elements owned per rank: {res['grad_elements_per_rank']} of {res['params']}")
    print("ResNet-50, fast path, analytic under the real assignment (x first-order all-reduce):")
    rows = [[r["N"], r["grad_imbalance"], r["no_statistics_ratio"], r["max_interval_ratio"], r["a_stale_ratio"],
             r["all_statistics_ratio"]] for r in res["resnet50_projection"]]
    print(common.format_table(["N", "N*max P_r/P", "no statistics", "all at max_interval", "A stale, G/F every step",
                               "every statistic"], rows))


def steady_floor(opt: Any, n_params: int, world: int, max_interval: int) -> dict[str, float]:
    """Analytic fast-path bytes per step for a few refresh patterns: no statistic due (the floor, set
    by the gradient bytes of the most-loaded owner), every statistic every step, every statistic
    once per ``max_interval`` steps, and G and F every step with A once per ``max_interval``
    (what the measured intervals tend to). Each collective is padded to the most-loaded owner."""
    stats = [(b, s) for b in opt.blocks.values() for s in b.stats.values()]
    fo = first_order_bytes(n_params, world)

    def avg(interval: dict[str, int]) -> float:
        # statistics of kind k refresh in turn, a 1/interval share each step: average over one period
        period = max(interval.values())
        total = 0.0
        for t in range(period):
            due = [(b, s) for i, (b, s) in enumerate(stats) if (i + t) % interval[s.name] == 0]
            total += analytic_ours(opt, due, world, False)
        return total / period

    every = {"A": 1, "G": 1, "F": 1}
    stale = {k: max_interval for k in every}
    out = {"no_statistics_bytes": analytic_ours(opt, [], world, False), "all_statistics_bytes": avg(every),
           "max_interval_bytes": avg(stale), "a_stale_bytes": avg({"A": max_interval, "G": 1, "F": 1})}
    for key in list(out):
        out[key.replace("_bytes", "_ratio")] = out[key] / fo
    return out


def resnet50_projection(worlds: tuple[int, ...] = (2, 4, 8, 16, 64)) -> list[dict[str, Any]]:
    """The fast path's analytic bytes for torchvision ResNet-50 under the real assignment at N ranks
    (built on the meta device, no ranks needed), in units of the first-order all-reduce."""
    import torchvision

    import spngd_ds

    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None)
    n_params = common.param_count(model)
    rows = []
    for n in worlds:
        probe = spngd_ds.SPNGD(model, communicator=OfflineWorld(n))
        probe.capture.remove()
        grads = by_owner(probe, lambda b: sum(q.numel() for q in b.params), n)
        f = steady_floor(probe, n_params, n, common.DEFAULT_STALENESS["max_interval"])
        rows.append({"N": n, "max_owned_grad_elements": max(grads), "grad_imbalance": max(grads) * n / n_params}
                    | {k: v for k, v in f.items() if k.endswith("_ratio")})
    return rows


def rolling(v: list[float], k: int) -> list[float]:
    """Trailing mean over up to ``k`` values."""
    return [sum(v[max(0, i - k + 1) : i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(v))]


def plot(res: dict[str, Any], path: Path) -> None:
    """Bytes per step in units of the first-order all-reduce, per case (thin: each step; thick: the
    trailing mean over 10 steps), with the target and the fast path's analytic floors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fo = first_order_bytes(res["params"], res["setup"]["world_size"])
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    for i, (name, r) in enumerate((k, v) for k, v in res["cases"].items() if k != "first_order_allreduce"):
        color = f"C{i}"
        ys = [(o + r["deepspeed_analytic"]) / fo for o in r["per_step"]["ours"]]
        xs = range(1, len(ys) + 1)
        if len(ys) < 20:  # a short check run: markers, drawn on top
            ax.plot(xs, ys, color=color, lw=1.2, marker="o", ms=3, zorder=3, label=f"{name.replace('_', ' ')} (check)")
            continue
        ax.plot(xs, ys, color=color, lw=0.6, alpha=0.45)
        ax.plot(xs, rolling(ys, 10), color=color, lw=2.0, label=name.replace("_", " "))
    floor = res["floor"]
    ax.axhline(1.0, color="k", lw=1, label="first-order all-reduce (1.0)")
    ax.axhline(TARGET, color="k", ls="--", lw=1, label=f"target {TARGET}x")
    ax.axhline(floor["no_statistics_ratio"], color="0.5", ls=":", lw=1.2, label="fast path, no statistic due")
    ax.axhline(floor["max_interval_ratio"], color="0.5", ls="-.", lw=1.2, label="fast path, all at max_interval")
    ax.set_ylim(0, None)
    ax.set_xlabel("step")
    ax.set_ylabel("bytes sent per rank per step / first-order")
    s = res["setup"]
    ax.set_title(f"{s['model']} ({s['params']:,} parameters), {s['world_size']} ranks, staleness "
                 f"{s['staleness']['threshold']}/{s['staleness']['max_interval']}; thick: 10-step mean", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Run every case on 2 ranks, summarise, print, write JSON and the plot (rank 0)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--window", type=int, default=30, help="steady state: the last this many steps")
    p.add_argument("--micro_batch", type=int, default=32)
    p.add_argument("--cases", nargs="*", default=[c.name for c in CASES], help="a subset of the cases")
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    common.prepare_environment()
    from step_time import init_distributed

    rank, world, _ = init_distributed()
    wall = time.perf_counter()
    counter = CollectiveCounter()
    model = common.build_model("resnet20")
    n_params = common.param_count(model)
    res: dict[str, Any] = {"cases": {}, "params": n_params}
    for case in (c for c in CASES if c.name in a.cases):
        series = run_case(case, case.steps or a.steps, a.micro_batch, counter)
        res["cases"][case.name] = summarise(case, series, a.window, n_params, world)
        if rank == 0:
            print(f"{case.name}: done ({time.perf_counter() - wall:.0f} s)", flush=True)
    import spngd_ds

    probe = spngd_ds.SPNGD(common.build_model("resnet20"), communicator=OfflineWorld(world))
    res["floor"] = steady_floor(probe, n_params, world, common.DEFAULT_STALENESS["max_interval"])
    res["grad_elements_per_rank"] = by_owner(probe, lambda b: sum(q.numel() for q in b.params), world)
    res["assignment"] = probe.assignment
    res["resnet50_projection"] = resnet50_projection()
    res["setup"] = {"model": "resnet20", "params": n_params, "world_size": world, "micro_batch": a.micro_batch,
                    "steps": a.steps, "window": a.window, "staleness": common.DEFAULT_STALENESS,
                    "spngd": common.SPNGD_PARAMS, "precision": "fp32"}
    res["collective_calls_total"] = counter.calls
    fast = res["cases"].get("fast_fp32")
    res["target"] = {"ratio_max": TARGET, "met": None if fast is None else fast["ratio_to_first_order"] <= TARGET}
    res["machine"] = common.machine_info()
    res["wall_s"] = time.perf_counter() - wall
    if rank == 0:
        print_report(res)
        path = common.write_json("comm_volume", res)
        plot(res, common.DOCS_DIR / "comm_volume.png")
        print(f"wrote {path} and docs/comm_volume.png; wall {res['wall_s']:.0f} s")
    dist.barrier()
    dist.destroy_process_group()


def OfflineWorld(world: int) -> Any:  # noqa: N802 - a factory that reads like the class it builds
    """A communicator that only states a world size: enough for SPNGD to build its assignment."""
    from spngd_ds.comm import Communicator

    comm = Communicator()
    comm.world_size = world
    return comm


if __name__ == "__main__":
    main()
