"""The capture paths a large-batch step takes, on 3 forked gloo ranks against one process fed the same passes (float64).

A of a stride-1 convolution by the shift Gram (bias included), BatchNorm's F from one-pass moments,
and gradient accumulation with ``stat_micro_batches: 1``, where the second forward of each step runs
without the blocks' forward hooks. Two blocks (the conv and its BatchNorm) on three ranks, so one
rank owns nothing; the learning rate changes every step and staleness makes some steps capture
nothing at all.

The reference is a standalone SP-NGD on one process that runs micro-batch k of every rank, in
rank order, with ``stat_micro_batches`` = the number of ranks (so it captures exactly the ranks'
first micro-batches) and the capture's gradient scale set to what N ranks x gas micro-batches
divide the loss by.

The owners' refresh decisions reach the other ranks with the gathered parameters; the variant
``decisions_alone`` forces the exchange of their own that a dtype unable to hold the step numbers
exactly takes (paths/fast.py). A decision that did not arrive would change what the next step
captures, and the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds
import spngd_ds.blocks.conv_gram as conv_gram
from tests.support.distributed import fork_ranks

DECISIONS_ALONE = "SPNGD_TEST_DECISIONS_ALONE"  # set before forking: the ranks inherit it

WORLD, GAS, PER, STEPS, CHANNELS = 3, 2, 4, 5, 8
STALENESS = {"threshold": 1e9, "max_interval": 2}  # refreshed at steps 0, 1, 3: steps 2 and 4 are stale


pytestmark = pytest.mark.dist


def _model() -> nn.Module:
    torch.manual_seed(7)  # 8 channels and 4x4 maps: the conv takes the shift Gram
    return nn.Sequential(
        nn.Conv2d(CHANNELS, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).double()


def _passes(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batch k of rank r at index k·WORLD + r."""
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(WORLD * GAS * PER, CHANNELS, 4, 4, generator=g, dtype=torch.float64) * 1.5 + 0.3
    y = torch.randint(0, 5, (WORLD * GAS * PER,), generator=g)
    return list(zip(x.split(PER), y.split(PER), strict=True))


def _lr(step: int) -> float:
    return 0.3 / (1 + step)


def _train(opt: spngd_ds.SPNGD, model: nn.Module, passes_of: Any, splits: int) -> dict[str, Any]:
    """STEPS steps; per forward, which blocks carry a forward hook (seen by a pre-hook that runs after SP-NGD's own)."""
    opt.capture.grad_scale = lambda: float(splits)
    hooked: list[bool] = []
    model.register_forward_pre_hook(lambda m, i: hooked.append(bool(model[0]._forward_hooks)))  # type: ignore[index]
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = _lr(step)
        for x, y in passes_of(step):
            (F.cross_entropy(model(x), y) / splits).backward()
        opt.step()
        opt.zero_grad()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "hooked": hooked}


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from spngd_ds.comm import DistributedCommunicator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    if os.environ.get(DECISIONS_ALONE) == "1":
        spngd_ds.SPNGD.decisions_exact_in = lambda self, dtype: False
    shifted: list[int] = []
    real = conv_gram.shift_gram
    conv_gram.shift_gram = lambda x, *a: shifted.append(x.shape[0]) or real(x, *a)  # type: ignore[func-returns-value]
    model = _model()
    opt = spngd_ds.SPNGD(
        model, lr=_lr(0), momentum=0.9, damping=1e-2, staleness=STALENESS, communicator=DistributedCommunicator()
    )
    res = _train(opt, model, lambda step: [_passes(step)[k * WORLD + rank] for k in range(GAS)], GAS)
    res["owned"] = [b.name for b in opt.owned()]
    res["shifted"] = shifted
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _reference(stat_micro_batches: int) -> dict[str, Any]:
    model = _model()
    opt = spngd_ds.SPNGD(
        model, lr=_lr(0), momentum=0.9, damping=1e-2, staleness=STALENESS, stat_micro_batches=stat_micro_batches
    )
    return _train(opt, model, _passes, WORLD * GAS)


@pytest.mark.parametrize("decisions_alone", [False, True], ids=["decisions_with_params", "decisions_alone"])
def test_three_ranks_with_accumulation_equal_one_process(
    tmp_path: Path, decisions_alone: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DECISIONS_ALONE, "1" if decisions_alone else "0")
    results = fork_ranks(_rank, WORLD, tmp_path)
    assert sorted(len(r["owned"]) for r in results) == [0, 1, 1]  # one rank owns nothing
    # the shift Gram ran on the first micro-batch of each due step (0, 1, 3), and only there
    assert all(r["shifted"] == [PER] * 3 for r in results)
    # forward hooks on the first forward of a due step only: steps 0, 1 and 3 of 5, two forwards each
    assert all(r["hooked"] == [True, False, True, False, False, False, True, False, False, False] for r in results)
    ref = _reference(WORLD)
    for r in results:
        for name, value in ref["params"].items():
            torch.testing.assert_close(r["params"][name], value, rtol=1e-10, atol=1e-12)
    # the check can fail: capturing every micro-batch (what the ranks do not do) gives another run
    every = _reference(WORLD * GAS)
    assert any(not torch.allclose(every["params"][n], ref["params"][n], rtol=1e-6, atol=1e-9) for n in ref["params"])
