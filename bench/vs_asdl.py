"""One SP-NGD step that refreshes every statistic against ASDL's K-FAC refreshing every step.

ASDL (``pip install asdfghjkl``, imported as ``asdl``) is the library of the SP-NGD paper's first
author. Both sides get the same model (a copy of one initialisation), the same digits batches, fp32 on
the CPU, one process, one thread:

- SP-NGD: ``spngd_ds.SPNGD(model, staleness=None)`` (empirical Fisher, K-FAC for Conv2d/Linear,
  unit-wise BatchNorm), one step = forward + backward + ``opt.step()``;
- ASDL: ``asdl.KfacGradientMaker(model, PreconditioningConfig(curvature_upd_interval=1,
  preconditioner_upd_interval=1), fisher_type="fisher_emp")`` (K-FAC for Conv2d/Linear, unit-wise
  BatchNorm, the empirical Fisher, curvature and inverses refreshed every step), one step =
  ``forward_and_backward()`` + ``torch.optim.SGD.step()``.

The two alternate step by step (the order flips every step) so that machine noise hits both; the
figure is the median over steps of SP-NGD's time / ASDL's time in the same pair.

    python bench/vs_asdl.py [--model resnet20|resnet18] [--steps 10]

Writes ``bench/results/vs_asdl.json``.
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
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

TARGET = 0.8


def build(kind: str) -> nn.Module:
    """ResNet-20 (common.build_model) or torchvision's ResNet-18 with 10 classes, seed 0."""
    if kind == "resnet18":
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None, num_classes=10)
    return common.build_model(kind, seed=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet18"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="measured pairs of steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--damping", type=float, default=1e-3)
    a = p.parse_args()
    common.prepare_environment()
    torch.set_num_threads(1)
    import asdl
    from asdl import KfacGradientMaker, PreconditioningConfig

    import spngd_ds

    base = build(a.model)
    m_ours, m_asdl = copy.deepcopy(base), copy.deepcopy(base)
    ours = spngd_ds.SPNGD(m_ours, lr=0.01, momentum=0.9, damping=a.damping, staleness=None)
    cfg = PreconditioningConfig(
        data_size=a.batch, damping=a.damping, curvature_upd_interval=1, preconditioner_upd_interval=1
    )
    maker = KfacGradientMaker(m_asdl, cfg, fisher_type="fisher_emp")
    sgd = torch.optim.SGD(m_asdl.parameters(), lr=0.01, momentum=0.9)
    x, y = common.digits_rgb(a.image_size)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))

    def step_ours(xb: torch.Tensor, yb: torch.Tensor) -> float:
        start = time.perf_counter()
        F.cross_entropy(m_ours(xb), yb).backward()
        ours.step()
        ours.zero_grad()
        return time.perf_counter() - start

    def step_asdl(xb: torch.Tensor, yb: torch.Tensor) -> float:
        start = time.perf_counter()
        dummy = maker.setup_model_call(m_asdl, xb)
        maker.setup_loss_call(F.cross_entropy, dummy, yb)
        maker.forward_and_backward()
        sgd.step()
        sgd.zero_grad()
        return time.perf_counter() - start

    pairs: list[dict[str, float]] = []
    for i in range(a.warmup + a.steps):
        idx = order[(torch.arange(a.batch) + i * a.batch) % order.numel()]
        xb, yb = x[idx], y[idx]
        t: dict[str, float] = {}
        for name in ("spngd", "asdl") if i % 2 == 0 else ("asdl", "spngd"):
            t[name] = step_ours(xb, yb) if name == "spngd" else step_asdl(xb, yb)
        if i >= a.warmup:
            pairs.append(t)
        print(f"step {i + 1}: SP-NGD {t['spngd'] * 1e3:.0f} ms, ASDL {t['asdl'] * 1e3:.0f} ms", flush=True)
    ratio = statistics.median(q["spngd"] / q["asdl"] for q in pairs)
    res: dict[str, Any] = {
        "setup": {
            "model": a.model,
            "batch": a.batch,
            "image_size": a.image_size,
            "dtype": "fp32",
            "threads": 1,
            "damping": a.damping,
            "steps": a.steps,
            "warmup": a.warmup,
            "asdl_version": asdl_version(),
            "asdl_module": getattr(asdl, "__file__", ""),
        },
        "spngd_median_step_s": statistics.median(q["spngd"] for q in pairs),
        "asdl_median_step_s": statistics.median(q["asdl"] for q in pairs),
        "ratio_median": ratio,
        "ratio_of_means": sum(q["spngd"] for q in pairs) / sum(q["asdl"] for q in pairs),
        "pairs": pairs,
        "target": {"ratio_max": TARGET, "met": ratio <= TARGET},
        "machine": common.machine_info(),
    }
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(
        f"SP-NGD {res['spngd_median_step_s'] * 1e3:.0f} ms, ASDL K-FAC {res['asdl_median_step_s'] * 1e3:.0f} ms "
        f"(median): SP-NGD / ASDL = {ratio:.3f} (target <= {TARGET}: {verdict})"
    )
    path = common.write_json(f"vs_asdl{'' if a.model == 'resnet20' else '_' + a.model}", res)
    print(f"wrote {path}")


def asdl_version() -> str:
    from importlib.metadata import version

    try:
        return version("asdfghjkl")
    except Exception:  # noqa: BLE001 - a source checkout has no metadata
        return "unknown"


if __name__ == "__main__":
    main()
    from spngd_ds.process_exit import exit_process

    exit_process(0)  # not the interpreter's teardown, which gloo's threads can abort
