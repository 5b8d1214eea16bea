"""Host synchronisations and aten ops (kernel launches on a GPU) of one optimizer step.

torchvision ResNet-18 and ResNet-50 (no weights), batch 2 at 32x32, standalone ``spngd_ds.SPNGD``
with its defaults, on the CPU: a step that refreshes nothing (every statistic made stale) and a
step that refreshes everything (every statistic made due), after two warm-up steps; against
``torch.optim.SGD(momentum=0.9)`` with ``foreach=False`` and ``foreach=True`` (its second step).
The forward and backward of the SP-NGD steps are counted apart (the capture hooks run there).
Counted by ``bench/dispatch_counts.py`` (a dispatch mode, outside the optimizer's own counters)::

    OMP_NUM_THREADS=1 python bench/step_counts.py [--models resnet18 resnet50]

Writes ``bench/results/step_counts.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from dispatch_counts import count_dispatch  # noqa: E402
from torch import nn  # noqa: E402

import spngd_ds  # noqa: E402

BATCH, SIZE, CLASSES = 2, 32, 10


def build(kind: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, kind)(weights=None, num_classes=CLASSES)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def force(opt: spngd_ds.SPNGD, due: bool) -> None:
    """Make every statistic due now (``due``) or stale until far ahead, and tell the hooks."""
    step = opt.step_count
    for b in opt.blocks.values():
        for s in b.stats.values():
            interval = s.schedule.interval
            s.schedule.load((interval, step if due else step + 1000))
    opt.capture.start_step(opt._due(step))


def spngd_counts(kind: str, **spngd_kwargs: Any) -> dict[str, Any]:
    """Counts of SP-NGD's steps on ``kind`` (``spngd_kwargs``: SPNGD arguments beside the defaults)."""
    model = build(kind)
    opt = spngd_ds.SPNGD(model, **spngd_kwargs)
    out: dict[str, Any] = {}
    for step in range(2):  # warm-up: the first refresh, momentum buffers, cached plans
        x, y = batch(step)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    for label, due in (("refresh_all", True), ("refresh_none", False)):
        force(opt, due)
        x, y = batch(10 + int(due))
        with count_dispatch() as fb:
            F.cross_entropy(model(x), y).backward()
        with count_dispatch() as st:
            opt.step()
        opt.zero_grad()
        out[label] = {
            "step_syncs": st.syncs,
            "step_ops": st.ops,
            "step_sync_names": dict(st.sync_names),
            "forward_backward_syncs": fb.syncs,
            "forward_backward_sync_names": dict(fb.sync_names),
            "refreshed": opt.metrics()["spngd/refresh_fraction"],
        }
    out["blocks"] = len(opt.blocks)
    out["params"] = len(opt._params)
    return out


def sgd_counts(kind: str, foreach: bool) -> dict[str, Any]:
    """Counts of ``torch.optim.SGD(momentum=0.9)``'s second step on ``kind``."""
    model = build(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=foreach)
    for step in range(2):
        x, y = batch(step)
        F.cross_entropy(model(x), y).backward()
        if step == 1:
            with count_dispatch() as st:
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
    return {"step_syncs": st.syncs, "step_ops": st.ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "step_counts.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    rows = []
    for kind in args.models:
        sp = spngd_counts(kind)
        sgd = sgd_counts(kind, foreach=False)
        sgd_fe = sgd_counts(kind, foreach=True)
        results[kind] = {"spngd": sp, "sgd": sgd, "sgd_foreach": sgd_fe}
        rows.append(
            [
                kind,
                sp["refresh_none"]["step_syncs"],
                sp["refresh_all"]["step_syncs"],
                sp["refresh_none"]["step_ops"],
                sp["refresh_all"]["step_ops"],
                sp["refresh_all"]["forward_backward_syncs"],
                sgd["step_ops"],
                sgd_fe["step_ops"],
            ]
        )
    headers = [
        "model",
        "syncs quiet",
        "syncs refresh",
        "ops quiet",
        "ops refresh",
        "syncs fwd+bwd (refresh)",
        "SGD ops",
        "SGD foreach ops",
    ]
    print(common.format_table(headers, rows))
    payload = {
        "batch": BATCH,
        "image_size": SIZE,
        "command": "python bench/step_counts.py",
        "models": results,
        "machine": common.machine_info(),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    import json

    path.write_text(json.dumps(common.finite(payload), indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
