"""Checkpoints (docs/configuration.md): state_dict / load_state_dict resume a run exactly.

A run of 3 + 3 steps and a run of 3 steps, checkpoint, a fresh model and optimizer, load, 3 steps
end with bit-identical float64 parameters. Stale statistics are on, so the steps after the resume
reuse restored inverses and restored refresh intervals.
"""

from __future__ import annotations

import copy
import io
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds

KW = dict(lr=0.1, momentum=0.9, damping=1e-2, weight_decay=1e-4, staleness={"threshold": 1e9, "max_interval": 3})


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)
    ).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(12, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (12,), generator=g)


def _train(model: nn.Module, opt: spngd_ds.SPNGD, steps: range) -> None:
    for step in steps:
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        # the lr changes mid-run so that momentum correction depends on the restored previous lr
        for group in opt.param_groups:
            group["lr"] *= 0.9


T = TypeVar("T")


def _roundtrip(obj: T) -> T:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only: the state dict holds tensors and plain containers only


@pytest.mark.parametrize("n_before", [3, 4])
@pytest.mark.parametrize("through_disk", [True, False])
def test_resume_is_exact(n_before: int, through_disk: bool) -> None:
    model = _model()
    opt = spngd_ds.SPNGD(model, **KW)
    _train(model, opt, range(n_before))
    saved_opt = opt.state_dict()
    saved_model = copy.deepcopy(model.state_dict())
    if through_disk:
        saved_opt = _roundtrip(saved_opt)
        saved_model = _roundtrip(saved_model)
    # the original goes on (after the checkpoint was taken: later steps must not alter the dict)
    _train(model, opt, range(n_before, n_before + 3))

    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # make sure the weights really come from the checkpoint
    fresh.load_state_dict(saved_model)
    other = dict(lr=0.5, momentum=0.5, damping=1.0, staleness={"threshold": 1e9, "max_interval": 3})
    fresh_opt = spngd_ds.SPNGD(fresh, **other)
    fresh_opt.load_state_dict(saved_opt)
    assert fresh_opt.step_count == n_before
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**n_before, rel=1e-15)
    assert fresh_opt.param_groups[0]["momentum"] == 0.9 and fresh_opt.damping == 1e-2
    _train(fresh, fresh_opt, range(n_before, n_before + 3))

    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
    for b in opt.blocks.values():
        for k, s in b.stats.items():
            t = fresh_opt.blocks[b.name].stats[k]
            assert s.schedule.state() == t.schedule.state(), (b.name, k)
            assert torch.equal(s.value, t.value) and torch.equal(s.inverse, t.inverse), (b.name, k)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], fresh_opt.state[q]["momentum_buffer"])


def test_state_dict_contents() -> None:
    model = _model()
    opt = spngd_ds.SPNGD(model, **KW)
    _train(model, opt, range(2))
    sd = opt.state_dict()
    assert sd["format"] == "spngd_ds/1" and sd["step"] == 2
    assert set(sd["curvature"]) == {"0", "1", "4"}  # keyed by layer name, not parameter index
    assert set(sd["curvature"]["0"]) >= {"A", "G", "pi"} and set(sd["curvature"]["1"]) == {"F"}
    assert set(sd["momentum"]) == {n for n, _ in model.named_parameters()}
    assert sd["schedules"]["0:A"] == (2, 3) and sd["schedules"]["1:F"] == (2, 3)
    # momentum is a copy: stepping on does not change a state dict already taken
    before = sd["momentum"]["4.weight"].clone()
    _train(model, opt, range(2, 4))
    assert torch.equal(sd["momentum"]["4.weight"], before)


def test_without_restoring_the_run_differs() -> None:
    """Guard for the test above: skipping load_state_dict (same weights) gives other parameters."""
    model = _model()
    opt = spngd_ds.SPNGD(model, **KW)
    _train(model, opt, range(4))
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    fresh_opt = spngd_ds.SPNGD(fresh, **KW)
    for group in fresh_opt.param_groups:
        group["lr"] = opt.param_groups[0]["lr"]
    _train(model, opt, range(4, 7))
    _train(fresh, fresh_opt, range(4, 7))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True))


def test_load_rejects_foreign_dicts() -> None:
    model = _model()
    opt = spngd_ds.SPNGD(model, **KW)
    sgd_state = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="spngd_ds/1"):
        opt.load_state_dict(sgd_state)
    sd = opt.state_dict()
    del sd["format"]
    with pytest.raises(ValueError, match="format"):
        opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="format"):
        opt.load_state_dict({**opt.state_dict(), "format": "spngd_ds/0"})
