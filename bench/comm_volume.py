"""Bytes each rank sends per step under the exchange layout, against the targets.

Bytes each rank sends per step under the exchange layout (docs/design.md, section 3), against the
targets, counted outside the project by wrapping every ``torch.distributed`` collective
(:class:`common.CollectiveCounter`). The measured parts live in ``comm_volume_measure.py``, the
predictions from the library's own code in ``comm_volume_predict.py``; this file runs them, merges
the JSON, prints the tables and draws the plot.

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
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch.distributed as dist  # noqa: E402
from comm_volume_measure import part_compatible, part_fast  # noqa: E402
from comm_volume_predict import ANALYTIC_WORLDS, TARGET_COMPATIBLE, TARGET_FAST, part_analytic  # noqa: E402
from common import CollectiveCounter  # noqa: E402

RESULTS = common.RESULTS_DIR / "comm_volume.json"
PLOT = common.DOCS_DIR / "comm_volume.png"


def load() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def merge(key: str, sub: str | None, payload: dict[str, Any], argv: list[str], wall: float) -> dict[str, Any]:
    """Put ``payload`` (with the command, machine and load average) into the JSON under key[/sub]."""
    res = load()
    if res.get("format") != "comm_volume/2":  # the old layout's file: start afresh
        res = {"format": "comm_volume/2"}
    payload = payload | {
        "command": " ".join(argv),
        "wall_s": wall,
        "machine": common.machine_info(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
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
                rows.append(
                    [
                        n,
                        rk["rank"],
                        rk["owned_grad_elements"],
                        round(rk["no_refresh_bytes"]),
                        rk["no_refresh_predicted"],
                        rk["no_refresh_ratio"],
                        round(max(rk["refresh_extra_bytes"])),
                        rk["refresh_extra_predicted"],
                        rk["refresh_extra_over_ideal"],
                        f"{rk['no_refresh_calls'][0]}/{rk['refresh_calls'][0]}",
                    ]
                )
        print(
            common.format_table(
                [
                    "N",
                    "rank",
                    "owned grads",
                    "no-refresh B",
                    "predicted",
                    "x first-order",
                    "refresh extra B",
                    "predicted",
                    "extra / ideal",
                    "collectives",
                ],
                rows,
            )
        )
        for n, f in sorted(fast.items(), key=lambda kv: int(kv[0])):
            r = f["refresh"]
            print(
                f"  N={n}: P={f['params']:,}; no-refresh max {f['no_refresh_ratio_max']:.4f}x first-order "
                f"(target <= {TARGET_FAST}: {'met' if f['met_no_refresh'] else 'MISSED'}); refresh extra max "
                f"{r['extra_max']:,.0f} B vs ideal (N-1)/N·packed {r['ideal_bytes']:,.0f} B (padded layout would "
                f"send {r['padded_old_bytes']:,} B; no padding: {'met' if r['met_no_padding'] else 'MISSED'}); "
                f"collectives {f['collectives_per_step']}; comm_nbytes == interception: "
                f"{f['comm_nbytes_matches_interception']}; layout_bytes == interception: "
                f"{f['layout_prediction_matches']}"
            )
    comp = res.get("compatible", {})
    if comp:
        print("Compatible path (no-refresh step, all collectives of forward+backward+step), vs DeepSpeed SGD:")
        rows = []
        for n, c in sorted(comp.items(), key=lambda kv: int(kv[0])):
            for st, s in c["stages"].items():
                for rk in s["ranks"]:
                    rows.append(
                        [
                            n,
                            st,
                            rk["rank"],
                            round(rk["sgd_bytes"]),
                            round(rk["spngd_bytes"]),
                            round(rk["spngd_deepspeed_bytes"]),
                            round(rk["spngd_ours_bytes"]),
                            rk["ratio"],
                            f"{rk['sgd_calls'][0]}/{rk['spngd_calls'][0]}",
                        ]
                    )
        print(
            common.format_table(
                ["N", "ZeRO", "rank", "SGD B", "SP-NGD B", "of it DS", "of it ours", "ratio", "calls SGD/SP-NGD"], rows
            )
        )
        for n, c in sorted(comp.items(), key=lambda kv: int(kv[0])):
            for st, s in c["stages"].items():
                print(
                    f"  N={n} ZeRO {st}: {s['ratio_max']:.3f}x SGD (target <= {TARGET_COMPATIBLE}: "
                    f"{'met' if s['met'] else 'MISSED'}); first-order all-reduce {s['first_order_bytes']:,.0f} B"
                )
    ana = res.get("analytic")
    if ana:
        print(
            f"ResNet-50 analytic ({ana['params']:,} parameters, {ana['blocks']} blocks, {ana['statistics']} "
            f"statistics), fast path per rank, max over ranks:"
        )
        rows = [
            [
                r["N"],
                r["owning_ranks"],
                r["grad_max_over_share"],
                r["no_refresh_ratio_max"],
                r["no_refresh_ratio_mean"],
                r["fp32"]["refresh_extra_over_ideal_max"],
                r["fp32"]["refresh_step_ratio_max"],
                r["bf16"]["refresh_extra_over_ideal_max"],
                r["bf16"]["refresh_step_ratio_max"],
                r["fp32"]["padded_old_over_ideal"],
            ]
            for r in ana["rows"]
        ]
        print(
            common.format_table(
                [
                    "N",
                    "owners",
                    "max grads/share",
                    "no-refresh x FO",
                    "mean",
                    "fp32 extra/ideal",
                    "fp32 refresh x FO",
                    "bf16 extra/ideal",
                    "bf16 refresh x FO",
                    "padded/ideal (old)",
                ],
                rows,
            )
        )
        print(
            f"  no-refresh max {ana['no_refresh_ratio_max']:.4f}x (target <= {TARGET_FAST} at every N: "
            f"{'met' if ana['met'] else 'MISSED'})"
        )
        if all("compatible_vs_sgd" in r for r in ana["rows"]):
            print("ResNet-50 analytic, compatible path, a no-refresh step / DeepSpeed's SGD step, most-loaded rank:")
            print(
                common.format_table(
                    ["N", "ZeRO 1/2", "ZeRO 3", "1 + 1/N"],
                    [
                        [r["N"], r["compatible_vs_sgd"]["1/2"], r["compatible_vs_sgd"]["3"], 1 + 1 / r["N"]]
                        for r in ana["rows"]
                    ],
                )
            )


def plot(res: dict[str, Any], path: Path = PLOT) -> None:
    """Plot the three panels of the communication volume figure.

    Three panels: no-refresh fast-path step / first-order all-reduce vs N; refresh-step extra /
    (N-1)/N packed statistics vs N; compatible path / DeepSpeed SGD per ZeRO stage.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    ax = axes[0]
    ana, fast, comp = res.get("analytic"), res.get("fast", {}), res.get("compatible", {})
    if ana:
        ns = [r["N"] for r in ana["rows"]]
        ax.plot(
            ns,
            [r["no_refresh_ratio_max"] for r in ana["rows"]],
            "o-",
            color="C0",
            label="ResNet-50, analytic, max rank",
        )
        ax.plot(
            ns,
            [r["no_refresh_ratio_mean"] for r in ana["rows"]],
            "o--",
            color="C0",
            alpha=0.6,
            label="ResNet-50, analytic, mean",
        )
    if fast:
        ns = sorted(int(n) for n in fast)
        ax.plot(
            ns,
            [fast[str(n)]["no_refresh_ratio_max"] for n in ns],
            "s",
            ms=8,
            color="C3",
            label="ResNet-20, measured (gloo), max rank",
        )
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
            ax.plot(
                ns,
                [r[dtype]["refresh_extra_over_ideal_max"] for r in ana["rows"]],
                "o-",
                color=color,
                label=f"ResNet-50, {dtype}, analytic",
            )
        ax.plot(
            ns,
            [r["fp32"]["padded_old_over_ideal"] for r in ana["rows"]],
            "x:",
            color="0.5",
            label="padded to most-loaded owner (old)",
        )
    if fast:
        ns = sorted(int(n) for n in fast)
        ax.plot(
            ns,
            [max(rk["refresh_extra_over_ideal"] for rk in fast[str(n)]["ranks"]) for n in ns],
            "s",
            ms=8,
            color="C3",
            label="ResNet-20, fp32, measured",
        )
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
    return int(os.environ.get("WORLD_SIZE", "1"))


if __name__ == "__main__":
    main()
    from spngd_ds.process_exit import exit_process

    exit_process(0)  # not the interpreter's teardown, which gloo's threads can abort
