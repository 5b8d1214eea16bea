"""Regime ``capture`` of ``bench/step_time.py``.

Milliseconds to capture every statistic once for one micro-batch (A and G of each Linear/Conv2d, F
of each BatchNorm), measured alone in one process by calling the blocks' own capture code on
recorded layer inputs and output gradients, next to the plain forward + backward of the same
micro-batch. The small regime prints the same table for its model and device.

    python bench/step_time.py --regime capture

Writes ``bench/results/capture_cost_cpu.json``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import driver  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

KIND_KEYS = {"A": "A (Kronecker, forward)", "G": "G (Kronecker, backward)", "F": "F (BatchNorm)"}
PLAIN_KEY = "forward + backward, no capture"


def capture_one(block: Any, inputs: torch.Tensor, grad: torch.Tensor, kind: str) -> None:
    """The block's own capture of one statistic (forward part, then the backward part if any)."""
    back = block.capture_forward(inputs, {kind})
    if back is not None:
        back(grad, 1.0)


def capture_cost(
    model_kind: str,
    xb: torch.Tensor,
    yb: torch.Tensor,
    device: torch.device,
    reps: int,
    reduce: Callable[[list[float]], float],
) -> dict[str, float]:
    """Time capturing every statistic once for the micro-batch.

    Milliseconds, per kind summed over the layers, to capture every statistic once for the
    micro-batch ``xb`` (N, 3, H, W), ``yb`` (N,), and of one plain forward + backward of it;
    ``reduce`` turns the ``reps`` timings of each call into one (``min``: best of; ``driver.mean``).
    """
    import spngd_ds
    from spngd_ds.blocks import KronBlock

    model = common.build_model(model_kind).to(device)
    opt = spngd_ds.SPNGD(model, staleness=None, stat_micro_batches=None)  # every micro-batch counts
    opt.capture.remove()
    blocks = {n: b for n, b in opt.blocks.items() if b.stats}
    xb, yb = xb.to(device), yb.to(device)
    inputs, grads = driver.record_layer_io(model, list(blocks), xb, yb)
    n = xb.shape[0]

    def clock(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(reps):
            driver.sync(device)
            start = time.perf_counter()
            fn()
            driver.sync(device)
            times.append(time.perf_counter() - start)
        return reduce(times) * 1e3

    cost = dict.fromkeys(KIND_KEYS.values(), 0.0)
    for name, b in blocks.items():
        g = grads[name] / n  # recorded for the mean loss; the blocks expect it per sample times 1/n
        inp = inputs[name]
        for kind in ("A", "G") if isinstance(b, KronBlock) else ("F",):
            cost[KIND_KEYS[kind]] += clock(functools.partial(capture_one, b, inp, g, kind))
        for s in b.stats.values():
            s.take_local()
    plain = common.build_model(model_kind).to(device)
    cost[PLAIN_KEY] = clock(lambda: F.cross_entropy(plain(xb), yb).backward())
    return cost


def micro_batch(model_kind: str, image_size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the input batches of the two models.

    The first ``batch_size`` digits images for ResNet-20; seeded random ImageNet-shaped ones (1000
    classes) for ResNet-50.
    """
    if model_kind == "resnet20":
        x, y = common.digits_rgb(image_size)
        return x[:batch_size], y[:batch_size]
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch_size, 3, image_size, image_size, generator=g),
        torch.randint(0, 1000, (batch_size,), generator=g),
    )


def main_capture(a: argparse.Namespace) -> None:
    """Time the capture for ResNet-20 and ResNet-50.

    ResNet-20 at 32x32 (``--micro_batch``) and ResNet-50 at 224x224 (``--r50_batch``), one thread,
    best of ``--reps``; prints and writes the table.
    """
    torch.set_num_threads(1)
    wall, load_before = time.perf_counter(), list(os.getloadavg())
    res: dict[str, Any] = {"setup": {"threads": 1, "reps": a.reps, "dtype": "fp32"}}
    shapes = [("resnet20", 32, a.micro_batch)] + ([("resnet50", 224, a.r50_batch)] if a.r50_batch > 0 else [])
    for kind, size, bs in shapes:
        xb, yb = micro_batch(kind, size, bs)
        cost = capture_cost(kind, xb, yb, torch.device("cpu"), a.reps, min)
        cost["all statistics"] = sum(cost[k] for k in KIND_KEYS.values())
        key = f"{kind}_{size}px_batch{bs}"
        res[key] = {k: round(v, 2) for k, v in cost.items()}
        print(key, res[key], flush=True)
    path = driver.finish(res, "capture_cost_cpu", load_before, wall)
    print(f"wrote {path}")
