"""What sending the A factors behind the backward hides (spngd_ds/paths/overlap.py, docs/design.md section 3).

Two SP-NGD engines on copies of one ResNet-20, ZeRO 0, fp32, staleness off (every step refreshes
every statistic, so every step has A factors to send): ``overlap_statistics: true`` ("early") and
``false`` ("in step"). They alternate step by step (the order flips every step) on the same
batches. Per step and engine: the wall time of the whole step (all micro-batches' forward and
backward, and the optimizer step) and the optimizer step's own communication time
(``spngd/time_comm``: gradients, flags, statistics, parameters; for "early" it includes waiting for
the A exchange). What the overlap hides is the difference of the medians. The two runs must end
with bitwise-equal parameters (checked: the same sums, only started earlier).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/overlap.py [--gas 1 4] [--steps 30]

Writes ``bench/results/overlap.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.prepare_environment()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def engines(gas: int, micro: int) -> dict[str, tuple[Any, Any]]:
    import spngd_ds

    base = common.build_model("resnet20", seed=0)
    out = {}
    for name, overlap in (("early", True), ("in_step", False)):
        block = common.spngd_block(staleness=False, overlap_statistics=overlap, stat_micro_batches=gas)
        model = copy.deepcopy(base)
        engine, opt, _, _ = spngd_ds.initialize(
            model=model, model_parameters=model.parameters(), config=common.ds_config(block, micro, gas=gas)
        )
        out[name] = (engine, opt)
    return out


def one_step(engine: Any, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    dist.barrier()
    start = time.perf_counter()
    for xb, yb in zip(xs, ys, strict=True):
        engine.backward(F.cross_entropy(engine(xb), yb))
        engine.step()
    return time.perf_counter() - start


def measure(gas: int, a: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    pair = engines(gas, a.micro_batch)
    x, y = common.digits_rgb(32)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {n: [] for n in pair}
    comm: dict[str, list[float]] = {n: [] for n in pair}
    per_step = a.micro_batch * world * gas
    for step in range(a.warmup + a.steps):
        idx = order[(torch.arange(per_step) + step * per_step) % order.numel()].view(gas, world, a.micro_batch)
        xs = [x[idx[k, rank]] for k in range(gas)]
        ys = [y[idx[k, rank]] for k in range(gas)]
        names = list(pair) if step % 2 == 0 else list(pair)[::-1]
        for name in names:
            engine, opt = pair[name]
            seconds = one_step(engine, xs, ys)
            if step >= a.warmup:
                times[name].append(seconds)
                comm[name].append(opt.metrics()["spngd/time_comm"])
    early_opt, late_opt = pair["early"][1], pair["in_step"][1]
    assert early_opt.stats_log.factors_sent_early > 0 and late_opt.stats_log.factors_sent_early == 0
    same = all(
        torch.equal(p, q)
        for p, q in zip(pair["early"][0].module.parameters(), pair["in_step"][0].module.parameters(), strict=True)
    )
    med = {n: statistics.median(v) for n, v in times.items()}
    med_comm = {n: statistics.median(v) for n, v in comm.items()}
    return {
        "gas": gas,
        "samples_per_step": per_step,
        "median_step_s": med,
        "median_step_comm_s": med_comm,
        "hidden_comm_s": med_comm["in_step"] - med_comm["early"],
        "step_time_saved_s": med["in_step"] - med["early"],
        "step_time_ratio_early_to_in_step": med["early"] / med["in_step"],
        "factors_sent_early": early_opt.stats_log.factors_sent_early,
        "parameters_bitwise_equal": same,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gas", type=int, nargs="*", default=[1, 4], help="micro-batches per step")
    p.add_argument("--micro_batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = [measure(g, a, rank, world) for g in a.gas]
    if rank == 0:
        table = [
            [
                r["gas"],
                r["samples_per_step"],
                f"{r['median_step_s']['in_step'] * 1e3:.0f}",
                f"{r['median_step_s']['early'] * 1e3:.0f}",
                f"{r['median_step_comm_s']['in_step'] * 1e3:.1f}",
                f"{r['median_step_comm_s']['early'] * 1e3:.1f}",
                f"{r['hidden_comm_s'] * 1e3:.1f}",
                f"{r['step_time_ratio_early_to_in_step']:.3f}",
                r["parameters_bitwise_equal"],
            ]
            for r in rows
        ]
        print(
            common.format_table(
                [
                    "gas",
                    "samples",
                    "step ms (in step)",
                    "step ms (early)",
                    "comm ms (in step)",
                    "comm ms (early)",
                    "hidden ms",
                    "early / in step",
                    "same params",
                ],
                table,
            )
        )
        path = common.write_json("overlap", {"world_size": world, "rows": rows, "machine": common.machine_info()})
        print(f"wrote {path}")
    dist.barrier()


if __name__ == "__main__":
    main()
    from spngd_ds.process_exit import exit_process

    exit_process(0)  # not the interpreter's teardown, which gloo's threads can abort
