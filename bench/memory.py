"""Curvature memory and inversion cost per rank for torchvision ResNet-50.

Curvature memory and inversion cost per rank for torchvision ResNet-50 under the real block
construction (``spngd_ds.blocks.build_blocks``) and the real ownership (``spngd_ds.assignment``).

No ranks are needed: the assignment is a pure function of the blocks and the world size. For
N = 1, 2, 4, 8, 16, 64 it reports the most-loaded rank against the ideal total/N and against the
bound set by the largest unit of work (with whole-layer ownership, the 3x3x512 convolutions of
layer4: A is 4608x4608). Bytes are what SP-NGD keeps: each statistic and its inverse, fp32
(2·(d_A² + d_G²)·4 per Kronecker block, 2·4C·4 per BatchNorm).

It then simulates a finer unit, factor-level ownership (A and G of one layer as separate jobs,
assigned by the same ``assign_owners``), without changing ``spngd_ds/assignment.py``. A cross-check
runs one real standalone SP-NGD step on ResNet-50 (64x64 inputs: factor shapes do not depend on
the resolution) and compares every block's ``curvature_nbytes()`` with the formula.

    python bench/memory.py

Writes ``bench/results/memory.json`` and ``docs/memory_per_rank.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from spngd_ds.assignment import BlockCost, assign_owners  # noqa: E402
from spngd_ds.blocks import Block, KronBlock, UnitwiseBlock, build_blocks  # noqa: E402
from spngd_ds.staleness import RefreshSchedule  # noqa: E402

WORLD_SIZES = (1, 2, 4, 8, 16, 64)
UNITS = {
    "layer": "whole-layer ownership, the real assign_owners (LPT on inversion cost)",
    "factor": "factor-level ownership (A, G separate jobs), simulated with the real assign_owners",
    "layer_memory_first": "whole-layer ownership, LPT on memory first (simulated)",
}
FP32 = 4


@dataclass(frozen=True)
class Job:
    """A unit of ownership.

    The cost ``assign_owners`` sees, the bytes it keeps on its owner and its inversion cost (Σ d³ of
    the factors it holds).
    """

    cost: BlockCost
    nbytes: int
    inversion: float


def block_nbytes(b: Block) -> int:
    """fp32 bytes of the statistics and inverses ``b`` keeps once inverted."""
    if isinstance(b, KronBlock):
        return 2 * (b.d_A**2 + b.d_G**2) * FP32
    if isinstance(b, UnitwiseBlock):
        return 2 * b.channels * 4 * FP32
    return 0


def resnet50_blocks(device: str = "meta") -> list[Block]:
    """SP-NGD's blocks for torchvision ResNet-50 (built on ``device``; shapes only on meta)."""
    import torchvision

    with torch.device(device):
        model = torchvision.models.resnet50(weights=None)
    blocks, _ = build_blocks(model, lambda: RefreshSchedule(threshold=None), 64.0)
    return blocks


def layer_jobs(blocks: list[Block]) -> list[Job]:
    """Whole-layer ownership, exactly the costs :class:`spngd_ds.SPNGD` hands to ``assign_owners``."""
    return [
        Job(BlockCost(b.name, b.inversion_cost(), b.memory_cost()), block_nbytes(b), b.inversion_cost()) for b in blocks
    ]


def memory_first_jobs(blocks: list[Block]) -> list[Job]:
    """Assign whole layers with the two criteria of ``assign_owners`` swapped.

    Whole-layer ownership with the two criteria of ``assign_owners`` swapped: longest job first on
    memory d_A² + d_G², ties broken by inversion cost (what the one-line change would do).
    """
    return [
        Job(BlockCost(b.name, b.memory_cost(), b.inversion_cost()), block_nbytes(b), b.inversion_cost()) for b in blocks
    ]


def factor_jobs(blocks: list[Block]) -> list[Job]:
    """Factor-level ownership: A and G of a Kronecker block are two jobs (cost d³, memory d²)."""
    jobs: list[Job] = []
    for b in blocks:
        if isinstance(b, KronBlock):
            for tag, d in (("A", b.d_A), ("G", b.d_G)):
                cost = BlockCost(f"{b.name}:{tag}", float(d**3), float(d**2))
                jobs.append(Job(cost, 2 * d * d * FP32, float(d**3)))
        else:
            jobs.extend(layer_jobs([b]))
    return jobs


def loads(jobs: list[Job], world: int) -> tuple[list[float], list[float]]:
    """Bytes and inversion cost per rank under the real ``assign_owners``."""
    owners = assign_owners([j.cost for j in jobs], world)
    mem, inv = [0.0] * world, [0.0] * world
    for j in jobs:
        mem[owners[j.cost.name]] += j.nbytes
        inv[owners[j.cost.name]] += j.inversion
    return mem, inv


def table_for(jobs: list[Job], worlds: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per N: most-loaded rank, ideal total/N, the largest-job bound, and the ratios to both."""
    total_mem = sum(j.nbytes for j in jobs)
    total_inv = sum(j.inversion for j in jobs)
    big_mem = max(j.nbytes for j in jobs)
    big_inv = max(j.inversion for j in jobs)
    rows = []
    for n in worlds:
        mem, inv = loads(jobs, n)
        ideal_m, ideal_i = total_mem / n, total_inv / n
        bound_m, bound_i = max(ideal_m, big_mem), max(ideal_i, big_inv)
        rows.append(
            {
                "N": n,
                "max_bytes": max(mem),
                "min_bytes": min(mem),
                "ideal_bytes": ideal_m,
                "bound_bytes": bound_m,
                "max_over_ideal_bytes": max(mem) / ideal_m,
                "max_over_bound_bytes": max(mem) / bound_m,
                "max_inversion": max(inv),
                "ideal_inversion": ideal_i,
                "bound_inversion": bound_i,
                "max_over_ideal_inversion": max(inv) / ideal_i,
                "max_over_bound_inversion": max(inv) / bound_i,
            }
        )
    return rows


def cross_check(batch: int = 2, size: int = 64) -> dict[str, Any]:
    """Check the memory model against one real standalone SP-NGD step on ResNet-50.

    One real standalone SP-NGD step on ResNet-50 (CPU): every block's ``curvature_nbytes()`` against
    :func:`block_nbytes`.
    """
    import torchvision

    import spngd_ds

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    opt = spngd_ds.SPNGD(model, staleness=None)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    start = time.perf_counter()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    seconds = time.perf_counter() - start
    mismatches = {
        b.name: (b.curvature_nbytes(), block_nbytes(b))
        for b in opt.blocks.values()
        if b.curvature_nbytes() != block_nbytes(b)
    }
    return {
        "blocks": len(opt.blocks),
        "total_real_bytes": sum(b.curvature_nbytes() for b in opt.blocks.values()),
        "total_formula_bytes": sum(block_nbytes(b) for b in opt.blocks.values()),
        "mismatches": mismatches,
        "step_seconds": seconds,
        "inversion_failures": opt.metrics()["spngd/inversion_failures"],
    }


def describe(blocks: list[Block]) -> dict[str, Any]:
    """Totals and the largest units of work."""
    kron = [b for b in blocks if isinstance(b, KronBlock)]
    big = max(kron, key=block_nbytes)
    largest = sorted(kron, key=block_nbytes, reverse=True)[:5]
    return {
        "kron_blocks": len(kron),
        "bn_blocks": sum(isinstance(b, UnitwiseBlock) for b in blocks),
        "plain_blocks": sum(not b.stats for b in blocks),
        "total_bytes": sum(block_nbytes(b) for b in blocks),
        "bn_bytes": sum(block_nbytes(b) for b in blocks if isinstance(b, UnitwiseBlock)),
        "largest_block": {
            "name": big.name,
            "d_A": big.d_A,
            "d_G": big.d_G,
            "bytes": block_nbytes(big),
            "A_with_inverse_bytes": 2 * big.d_A**2 * FP32,
        },
        "largest_blocks": [{"name": b.name, "d_A": b.d_A, "d_G": b.d_G, "bytes": block_nbytes(b)} for b in largest],
        "blocks_at_largest_size": sum(block_nbytes(b) == block_nbytes(big) for b in kron),
    }


def print_report(res: dict[str, Any]) -> None:
    """The model summary, one table per ownership unit, the factor-level gain and the cross-check."""
    d = res["model"]
    print(
        f"ResNet-50: {d['kron_blocks']} Kronecker blocks, {d['bn_blocks']} BatchNorm blocks; curvature total "
        f"{common.mib(d['total_bytes']):.1f} MiB (BN {common.mib(d['bn_bytes']):.2f} MiB); largest block "
        f"{d['largest_block']['name']} (A {d['largest_block']['d_A']}^2, G {d['largest_block']['d_G']}^2) "
        f"{common.mib(d['largest_block']['bytes']):.1f} MiB, x{d['blocks_at_largest_size']}"
    )
    for unit, title in UNITS.items():
        print(f"\n{title}")
        rows = [
            [
                r["N"],
                common.mib(r["max_bytes"]),
                common.mib(r["ideal_bytes"]),
                common.mib(r["bound_bytes"]),
                r["max_over_ideal_bytes"],
                r["max_over_bound_bytes"],
                r["max_over_ideal_inversion"],
                r["max_over_bound_inversion"],
            ]
            for r in res[unit]
        ]
        print(
            common.format_table(
                [
                    "N",
                    "max MiB",
                    "total/N MiB",
                    "bound MiB",
                    "max/ideal",
                    "max/bound",
                    "inv max/ideal",
                    "inv max/bound",
                ],
                rows,
            )
        )
    print("\nfactor-level gain (most-loaded rank, layer -> factor):")
    rows = [
        [
            g["N"],
            common.mib(g["layer_max_bytes"]),
            common.mib(g["factor_max_bytes"]),
            g["memory_gain"],
            g["inversion_gain"],
        ]
        for g in res["factor_gain"]
    ]
    print(common.format_table(["N", "layer MiB", "factor MiB", "memory x", "inversion x"], rows))
    c = res["cross_check"]
    if not c:
        return
    print(
        f"\ncross-check, one real SP-NGD step on ResNet-50: {c['blocks']} blocks, real "
        f"{common.mib(c['total_real_bytes']):.2f} MiB vs formula {common.mib(c['total_formula_bytes']):.2f} MiB, "
        f"mismatches: {len(c['mismatches'])}, step {c['step_seconds']:.1f} s"
    )


def plot(res: dict[str, Any], path: Path) -> None:
    """Memory and inversion cost of the most-loaded rank against N, with ideal and bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    ns = [r["N"] for r in res["layer"]]
    specs = (
        ("bytes", "curvature on the most-loaded rank (MiB)", 2**-20),
        ("inversion", "inversion cost on the most-loaded rank (Σ d³ / 1e12)", 1e-12),
    )
    for ax, (key, label, scale) in zip(axes, specs, strict=True):
        ax.plot(ns, [r[f"max_{key}"] * scale for r in res["layer"]], "o-", label="whole-layer ownership (real)")
        ax.plot(ns, [r[f"max_{key}"] * scale for r in res["factor"]], "s--", label="factor-level (simulated)")
        ax.plot(
            ns,
            [r[f"max_{key}"] * scale for r in res["layer_memory_first"]],
            "^-.",
            label="whole-layer, LPT on memory (simulated)",
        )
        ax.plot(ns, [r[f"ideal_{key}"] * scale for r in res["layer"]], "k:", label="ideal total / N")
        ax.plot(
            ns,
            [r[f"bound_{key}"] * scale for r in res["layer"]],
            color="0.6",
            lw=3,
            alpha=0.6,
            label="max(total/N, largest layer)",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("data-parallel ranks N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    big = res["model"]["largest_block"]
    axes[0].annotate(
        f"{common.mib(big['bytes']):.0f} MiB: {big['name']}\n(A {big['d_A']}², G {big['d_G']}²)",
        xy=(16, common.mib(big["bytes"])),
        xytext=(1.05, common.mib(big["bytes"]) * 0.2),
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "0.4"},
    )
    axes[0].legend(fontsize=8)
    fig.suptitle("SP-NGD curvature per rank, torchvision ResNet-50 (fp32 statistics + inverses)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Build the blocks, tabulate every ownership unit, cross-check, print, write JSON and the plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no_cross_check", action="store_true", help="skip the real ResNet-50 step")
    a = p.parse_args()
    wall = time.perf_counter()
    blocks = resnet50_blocks()
    res: dict[str, Any] = {"model": describe(blocks), "world_sizes": list(WORLD_SIZES)}
    res["layer"] = table_for(layer_jobs(blocks), WORLD_SIZES)
    res["factor"] = table_for(factor_jobs(blocks), WORLD_SIZES)
    res["layer_memory_first"] = table_for(memory_first_jobs(blocks), WORLD_SIZES)
    res["factor_gain"] = [
        {
            "N": lr["N"],
            "layer_max_bytes": lr["max_bytes"],
            "factor_max_bytes": fr["max_bytes"],
            "memory_gain": lr["max_bytes"] / fr["max_bytes"],
            "inversion_gain": lr["max_inversion"] / fr["max_inversion"],
        }
        for lr, fr in zip(res["layer"], res["factor"], strict=True)
    ]
    res["cross_check"] = {} if a.no_cross_check else cross_check()
    res["machine"] = common.machine_info()
    res["wall_s"] = time.perf_counter() - wall
    print_report(res)
    path = common.write_json("memory", res)
    common.DOCS_DIR.mkdir(exist_ok=True)
    plot(res, common.DOCS_DIR / "memory_per_rank.png")
    print(f"wrote {path} and docs/memory_per_rank.png; wall {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
    from spngd_ds.process_exit import exit_process

    exit_process(0)  # not the interpreter's teardown, which gloo's threads can abort
