"""Regime ``noise`` of ``bench/step_time.py``.

The relative change r = ||X1 - X2||_F / ||X1||_F of
every statistic between two disjoint batches of n samples at fixed (initial) weights, against n,
next to the floor ν = sqrt(ρ (1/n + 1/n)) the staleness rule predicts for it (docs/design.md,
section 2, rule 6). One process, the CPU, one thread::

    python bench/step_time.py --regime noise

Writes ``bench/results/statistic_noise_cpu.json``. :func:`statistic_noise` is the shorter table the
small regime adds with ``--noise_in_small``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import driver  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from driver import THRESHOLD, mean, median  # noqa: E402


def paired_statistics(
    model: torch.nn.Module,
    opt: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    n: int,
    micro: int,
    device: torch.device,
) -> list[dict[tuple[str, str], tuple[torch.Tensor, float]]]:
    """Compute every statistic of ``opt`` from each of two disjoint batches.

    Every statistic of ``opt`` (an SPNGD without staleness on ``model``) from each of two disjoint batches of n samples
    (``order[:n]``, ``order[n:2n]``) at the same weights, captured in micro-batches of ``micro`` as n/micro ranks would:
    (block, statistic) -> (value, ρ of the value, spngd_ds.staleness.wishart_rho). The one capture loop of both noise
    tables.
    """
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


def fresh_model(model_kind: str, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The seeded model and an SPNGD on it that captures every statistic of every micro-batch."""
    import spngd_ds

    model = common.build_model(model_kind).to(device)
    return model, spngd_ds.SPNGD(model, staleness=None, stat_micro_batches=None)


def statistic_noise(
    a: argparse.Namespace,
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    device: torch.device,
    sizes: tuple[int, ...] = (32, 128, 512),
) -> dict[str, Any]:
    """Summarise the relative change r per global batch and statistic kind.

    Per global batch n of ``sizes`` and statistic kind: the median r and the share of r below the
    threshold, each batch captured in micro-batches of ``a.micro_batch`` as n/micro_batch ranks
    would.
    """
    from spngd_ds.staleness import relative_change

    model, opt = fresh_model(a.model, device)
    out: dict[str, Any] = {}
    for n in sizes:
        values = paired_statistics(model, opt, x, y, order, n, a.micro_batch, device)
        ratios: dict[str, list[float]] = {}
        for key, (v, _) in values[0].items():
            ratios.setdefault(key[1], []).append(relative_change(v, values[1][key][0]))
        out[str(n)] = {
            kind: {
                "median_r": sorted(r)[len(r) // 2],
                "share_below_threshold": sum(q < THRESHOLD for q in r) / len(r),
                "count": len(r),
            }
            for kind, r in ratios.items()
        }
    return out


def noise_vs_samples(model_kind: str, image_size: int, sizes: list[int], micro: int) -> dict[str, Any]:
    """Measure r for each batch size n.

    For each n: A, G, F of every layer from two disjoint batches of n samples of digits (train and
    validation images, 1,797 in all) at the initial weights; r and the floor ν of each, and per kind
    their medians, the share of r below the threshold and the share the rule would grow.
    """
    from spngd_ds.recipes.data import load_digits_split
    from spngd_ds.staleness import relative_change

    train, val = load_digits_split(image_size=image_size)
    x = torch.cat([train.tensors[0], val.tensors[0]]).expand(-1, 3, -1, -1).contiguous()
    y = torch.cat([train.tensors[1], val.tensors[1]])
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    model, opt = fresh_model(model_kind, torch.device("cpu"))
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
            kind: {
                "median_r": median([r for r, _ in v]),
                "median_floor": median([f for _, f in v]),
                "median_r_over_floor": median([r / f for r, f in v if f > 0]),
                "share_r_below_threshold": mean([float(r < THRESHOLD) for r, _ in v]),
                "share_rule_grows": mean([float(r * r < THRESHOLD**2 + f * f) for r, f in v]),
                "c_median": median([r for r, _ in v]) * math.sqrt(n),
                "count": len(v),
            }
            for kind, v in per_kind.items()
        }
        brief = {k: (round(v["median_r"], 4), round(v["median_floor"], 4)) for k, v in out[str(n)].items()}
        print(n, brief, flush=True)
    return out


def main_noise(a: argparse.Namespace) -> None:
    """The table over ``--noise_sizes`` (one thread), printed and written."""
    torch.set_num_threads(1)
    wall, load_before = time.perf_counter(), list(os.getloadavg())
    res = {
        "setup": {
            "model": a.model,
            "image_size": a.image_size,
            "micro_batch": a.micro_batch,
            "threshold": THRESHOLD,
            "weights": "initial (seed 0)",
        },
        "by_samples": noise_vs_samples(a.model, a.image_size, a.noise_sizes, a.micro_batch),
    }
    rows = [
        [
            n,
            kind,
            v["median_r"],
            v["median_floor"],
            v["median_r_over_floor"],
            v["c_median"],
            v["share_r_below_threshold"],
            v["share_rule_grows"],
        ]
        for n, kinds in res["by_samples"].items()
        for kind, v in kinds.items()
    ]
    print(
        common.format_table(
            ["n", "kind", "median r", "median floor", "r/floor", "c = r sqrt(n)", "r < 0.1", "rule grows"], rows
        )
    )
    path = driver.finish(res, "statistic_noise_cpu", load_before, wall)
    print(f"wrote {path}")
