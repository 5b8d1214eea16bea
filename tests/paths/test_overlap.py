"""A factors sent behind the backward (spngd_ds/paths/overlap.py) give the same step as sending them in the step.

3 forked gloo ranks (one owns nothing), float64, a BatchNorm CNN, three forwards a step of which the
first two capture statistics, a learning rate that changes every step, and a step skipped for a
non-finite gradient while the exchange is in flight.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds
from spngd_ds.paths.overlap import can_send_early
from tests.support.distributed import fork_ranks

WORLD, FORWARDS, CAPTURED, STEPS, NAN_STEP = 3, 3, 2, 5, 2


def _model() -> nn.Module:
    torch.manual_seed(0)  # two blocks (conv, BatchNorm) for three ranks: one rank owns nothing
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).double()


def _batch(step: int, k: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * k + rank)
    return torch.randn(4, 2, 6, 6, generator=g, dtype=torch.float64) * 2.0, torch.randint(0, 3, (4,), generator=g)


def _run(
    rank: int, overlap: bool | str, captured: int = CAPTURED
) -> tuple[dict[str, torch.Tensor], dict[str, float], int]:
    from spngd_ds.comm import DistributedCommunicator

    model = _model()
    opt = spngd_ds.SPNGD(
        model,
        lr=0.3,
        damping=1e-2,
        staleness=None,
        stat_micro_batches=captured,
        overlap_statistics=overlap,
        communicator=DistributedCommunicator(),
    )
    opt.capture.forwards_per_step = FORWARDS
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = 0.3 / (1 + step)
        for k in range(FORWARDS):
            x, y = _batch(step, k, rank)
            loss = F.cross_entropy(model(x), y) / FORWARDS
            if step == NAN_STEP and rank == 0 and k == FORWARDS - 1:
                loss = loss * float("nan")
            loss.backward()
        opt.step()
        opt.zero_grad()
    owned = sum(1 for _ in opt.owned())
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt.metrics(), owned


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    runs = {
        "early": _run(rank, True),
        "in_step": _run(rank, False),
        "auto": _run(rank, "auto"),
        # every forward captures: on a CPU communicator "auto" has nothing left to hide behind
        "auto_all": _run(rank, "auto", FORWARDS),
        "in_step_all": _run(rank, False, FORWARDS),
    }
    torch.save(runs, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.dist
def test_early_factors_give_the_same_steps(tmp_path: Path) -> None:
    results = fork_ranks(_rank, WORLD, tmp_path)
    assert sorted(res["early"][2] for res in results) == [0, 1, 1]
    for res in results:
        early, in_step = res["early"], res["in_step"]
        assert early[1]["spngd/skipped_steps"] == in_step[1]["spngd/skipped_steps"] == 1
        # every step sends its one due A (the conv's) early; the skipped step's exchange is finished, unused
        assert early[1]["spngd/factors_sent_early"] == STEPS and in_step[1]["spngd/factors_sent_early"] == 0
        # "auto" on a CPU communicator: early while a forward of the step is still to come, else in the step
        assert res["auto"][1]["spngd/factors_sent_early"] == STEPS
        assert all(torch.equal(res["auto"][0][n], early[0][n]) for n in early[0])
        assert res["auto_all"][1]["spngd/factors_sent_early"] == 0
        assert all(torch.equal(res["auto_all"][0][n], res["in_step_all"][0][n]) for n in in_step[0])
        assert not all(torch.equal(res["auto_all"][0][n], in_step[0][n]) for n in in_step[0])  # 3 captures, not 2
        for name, value in early[0].items():
            assert torch.isfinite(value).all()
            torch.testing.assert_close(value, in_step[0][name], rtol=1e-12, atol=1e-14)
    first = results[0]["early"][0]
    assert all(torch.equal(first[n], res["early"][0][n]) for res in results for n in first)  # ranks agree
    assert max(float((first[n] - _model().state_dict()[n]).abs().max()) for n in first) > 1e-2  # the run moved


def _capture_fires(stat_micro_batches: int | None, forwards_per_step: int | None, forwards: int) -> list[int]:
    model = nn.Sequential(nn.Linear(3, 2))
    opt = spngd_ds.SPNGD(model, staleness=None, stat_micro_batches=stat_micro_batches)
    fired: list[int] = []
    opt.capture.forwards_per_step = forwards_per_step
    opt.capture.on_factors_complete = lambda: fired.append(opt.capture.micro_batch)
    for _ in range(forwards):
        model(torch.randn(4, 3)).sum().backward()
    with torch.no_grad():
        model(torch.randn(4, 3))  # an evaluation forward neither counts nor fires
    return fired


@pytest.mark.parametrize(
    ("smb", "fps", "expected"), [(None, 3, [3]), (2, 3, [2]), (5, 3, [3]), (2, None, [2]), (None, None, [])]
)
def test_the_exchange_starts_after_the_last_forward_that_captures_a(
    smb: int | None, fps: int | None, expected: list[int]
) -> None:
    assert _capture_fires(smb, fps, 3) == expected


def test_no_early_sending_where_it_cannot_be_right() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    assert not can_send_early(spngd_ds.SPNGD(model))  # one rank: nothing to hide
    assert spngd_ds.SPNGD(model).config.overlap_statistics == "auto"
    assert spngd_ds.SPNGD(model).capture.on_factors_complete is None
    with pytest.raises(ValueError, match="overlap_statistics"):
        spngd_ds.SPNGD(model, overlap_statistics="yes")
