"""Rule 9: SPNGDPolyDecay against the formula, step by step.

lr(e) = η0·e/e_w (e < e_w), η0 (e < e_start), η0·(1 − (e − e_start)/(e_end − e_start))^p, 0 after e_end,
with e = step / steps_per_epoch; damping optionally follows the decay part, floored at min_damping.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import spngd_ds
from spngd_ds.schedules import SPNGDPolyDecay, decay_factor, poly_factor


def _opt(lr: float = 0.8, damping: float = 1e-2) -> spngd_ds.SPNGD:
    torch.manual_seed(0)
    return spngd_ds.SPNGD(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), lr=lr, damping=damping)


def _expected(step: int, spe: int, base: float, warm: float, start: float, end: float, power: float) -> float:
    e = step / spe
    if warm > 0 and e < warm:
        return base * e / warm
    if e < start:
        return base
    if e >= end:
        return 0.0
    return base * (1.0 - (e - start) / (end - start)) ** power


def _lrs(sched: SPNGDPolyDecay, opt: torch.optim.Optimizer, n: int) -> list[float]:
    out = [opt.param_groups[0]["lr"]]
    for _ in range(n):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("warm", [0.0, 1.0])
def test_lr_follows_rule_9(warm: float) -> None:
    spe, start, end, power, base = 10, 2.0, 6.0, 2.0, 0.8
    opt = _opt(lr=base)
    sched = SPNGDPolyDecay(opt, steps_per_epoch=spe, start_epoch=start, end_epoch=end, power=power, warmup_epochs=warm)
    lrs = _lrs(sched, opt, 75)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(_expected(step, spe, base, warm, start, end, power), rel=1e-12, abs=1e-15), step
    # a few landmarks written out by hand
    if warm:
        assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.4) and lrs[10] == pytest.approx(0.8)
    else:
        assert lrs[0] == pytest.approx(0.8) and lrs[5] == pytest.approx(0.8)
    assert lrs[19] == pytest.approx(0.8)  # constant until e_start
    assert lrs[20] == pytest.approx(0.8)  # decay starts at (1 - 0)^p
    assert lrs[40] == pytest.approx(0.8 * 0.25)  # half-way: 0.5^2
    assert lrs[50] == pytest.approx(0.8 * 0.0625)  # 0.25^2
    assert lrs[60] == 0.0 and lrs[75] == 0.0  # clipped at 0 after e_end
    # strictly decreasing inside the decay window
    window = lrs[20:61]
    assert all(a > b for a, b in zip(window, window[1:], strict=False))


def test_fractional_epochs_and_power() -> None:
    spe, start, end, power, base = 7, 1.5, 4.5, 3.5, 0.3
    opt = _opt(lr=base)
    sched = SPNGDPolyDecay(opt, steps_per_epoch=spe, start_epoch=start, end_epoch=end, power=power)
    lrs = _lrs(sched, opt, 40)
    for step in (0, 10, 11, 15, 20, 24, 31, 32, 40):
        assert lrs[step] == pytest.approx(_expected(step, spe, base, 0.0, start, end, power), rel=1e-12, abs=1e-15)
    e = 20 / 7
    assert lrs[20] == pytest.approx(0.3 * (1 - (e - 1.5) / 3.0) ** 3.5, rel=1e-12)


def test_factor_helpers() -> None:
    assert poly_factor(0.5, 2.0, 3.0, 5.0, 2.0) == pytest.approx(0.25)
    assert poly_factor(2.5, 2.0, 3.0, 5.0, 2.0) == 1.0
    assert poly_factor(4.0, 2.0, 3.0, 5.0, 2.0) == pytest.approx(0.25)
    assert poly_factor(9.0, 2.0, 3.0, 5.0, 2.0) == 0.0
    assert decay_factor(0.5, 3.0, 5.0, 2.0) == 1.0  # no warm-up in the decay part
    assert decay_factor(4.5, 3.0, 5.0, 1.0) == pytest.approx(0.25)


def test_damping_follows_decay_with_floor() -> None:
    spe, start, end, power = 10, 1.0, 3.0, 1.0
    opt = _opt(lr=0.4, damping=1e-2)
    sched = SPNGDPolyDecay(
        opt,
        steps_per_epoch=spe,
        start_epoch=start,
        end_epoch=end,
        power=power,
        warmup_epochs=0.5,
        decay_damping=True,
        min_damping=2e-3,
    )
    dampings = [opt.damping]
    for _ in range(35):
        opt.step()
        sched.step()
        dampings.append(opt.damping)
    for step, d in enumerate(dampings):
        e = step / spe
        expect = max(1e-2 * decay_factor(e, start, end, power), 2e-3)
        assert d == pytest.approx(expect, rel=1e-12), step
    assert dampings[3] == 1e-2  # the warm-up does not touch damping
    assert dampings[20] == pytest.approx(5e-3)
    assert dampings[28] == pytest.approx(2e-3) and dampings[35] == pytest.approx(2e-3)  # floored
    assert opt.metrics()["spngd/damping"] == pytest.approx(2e-3)


def test_damping_untouched_without_decay_damping() -> None:
    opt = _opt(lr=0.4, damping=1e-2)
    sched = SPNGDPolyDecay(opt, steps_per_epoch=2, start_epoch=0, end_epoch=3, power=1.0)
    _lrs(sched, opt, 5)
    assert opt.damping == 1e-2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * (1 - 2.5 / 3))


def test_works_with_a_first_order_optimizer() -> None:
    """The same scheduler drives an SGD baseline (no 'damping' key: decay_damping is a no-op)."""
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = SPNGDPolyDecay(opt, steps_per_epoch=1, start_epoch=0, end_epoch=4, power=1.0, decay_damping=True)
    lrs = _lrs(sched, opt, 5)
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert "damping" not in opt.param_groups[0]


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(steps_per_epoch=0), "steps_per_epoch"),
        (dict(steps_per_epoch=-3), "steps_per_epoch"),
        (dict(start_epoch=5.0, end_epoch=5.0), "end_epoch"),
        (dict(start_epoch=5.0, end_epoch=2.0), "end_epoch"),
        (dict(power=-1.0), "power"),
        (dict(warmup_epochs=-0.5), "warmup_epochs"),
        (dict(min_damping=-1e-4), "min_damping"),
    ],
)
def test_bad_arguments_name_the_key(kwargs: dict[str, Any], key: str) -> None:
    args = dict(steps_per_epoch=10, start_epoch=1.0, end_epoch=5.0, power=2.0) | kwargs
    with pytest.raises(ValueError) as info:
        SPNGDPolyDecay(_opt(), **args)
    msg = str(info.value)
    assert "SPNGDPolyDecay" in msg and f"'{key}' = {args[key]!r}" in msg and "allowed" in msg, msg


def test_public_name() -> None:
    assert spngd_ds.SPNGDPolyDecay is SPNGDPolyDecay
