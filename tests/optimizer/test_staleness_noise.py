"""Rule 6 with the sampling-noise floor (spngd_ds/staleness.py).

r between two estimates of a statistic from n samples each is not 0 at fixed weights: r² ≈ r_true²
+ ν², ν² = ρ (1/n_new + 1/n_old). The rule grows the interval when r² < threshold² + ν²; ρ is the
Wishart variance of the statistic (from its value), n the global sample count the block normalised
it by. These tests pin the formula, the rule, and that it engages where the plain rule cannot: at
fixed weights (lr = 0) and small batches G and BatchNorm's F go stale only with the floor.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds
from spngd_ds.staleness import RefreshSchedule, relative_change, wishart_rho


def test_wishart_rho_matches_monte_carlo() -> None:
    """E||X̂_n − X||² / ||X||² · n ≈ ρ for Gaussian vectors (d = 6, correlated)."""
    torch.manual_seed(0)
    d, n, trials = 6, 200, 400
    mix = torch.randn(d, d, dtype=torch.float64)
    cov = mix @ mix.t() / d + 0.1 * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    errs = []
    for _ in range(trials):
        u = torch.randn(n, d, dtype=torch.float64) @ chol.t()
        errs.append(float(((u.t() @ u / n - cov) ** 2).sum()))
    measured = sum(errs) / trials * n / float((cov**2).sum())
    assert measured == pytest.approx(wishart_rho(cov), rel=0.15)
    assert wishart_rho(cov, vectors_per_sample=4.0) == pytest.approx(wishart_rho(cov) / 4.0)


def test_wishart_rho_of_blocks_and_degenerate_values() -> None:
    f = torch.stack([torch.eye(2), 2 * torch.eye(2)])  # (C, 2, 2): tr² = 4 + 16, ||.||² = 2 + 8
    assert wishart_rho(f) == pytest.approx(1.0 + 20.0 / 10.0)
    assert wishart_rho(torch.zeros(3, 3)) == 0.0
    assert wishart_rho(torch.full((2, 2), float("nan"))) == 0.0


def test_wishart_rho_in_float32_and_past_its_range() -> None:
    """ρ from a float32 value equals the float64 one, also where the squares overflow float32.

    Entries of 1e25: the norm is then taken again in float64. ρ does not depend on the scale.
    """
    torch.manual_seed(3)
    x = torch.randn(40, 7, dtype=torch.float64)
    cov = x.t() @ x / 40
    ref = wishart_rho(cov)
    assert wishart_rho(cov.float()) == pytest.approx(ref, rel=1e-5)
    big = (cov * 1e25).float()
    assert not math.isfinite(float(torch.linalg.vector_norm(big)))  # the case the fallback is for
    assert wishart_rho(big) == pytest.approx(ref, rel=1e-5)


def test_rule_with_floor() -> None:
    s = RefreshSchedule(threshold=0.1, max_interval=5)
    s.note_value(rho=3.0, samples=60)
    s.observe(0, math.inf)  # first refresh: no old value, floor unknown
    assert s.state() == (1, 1) and s.last_floor == 0.0 and s.last_samples == 60
    nu = math.sqrt(3.0 * (1 / 60 + 1 / 60))  # 0.316
    s.note_value(rho=3.0, samples=60)
    s.observe(1, 0.3)  # 0.09 < 0.01 + 0.1: noise explains it
    assert s.last_floor == pytest.approx(nu) and s.state() == (2, 3)
    s.note_value(rho=3.0, samples=60)
    s.observe(3, 0.34)  # 0.1156 > 0.11: a real change on top of the noise
    assert s.state() == (1, 4)
    s.note_value(rho=3.0, samples=1e9)
    s.observe(4, 0.2, samples=6000)  # an explicit count wins over the noted one
    assert s.last_floor == pytest.approx(math.sqrt(3.0 * (1 / 6000 + 1 / 60))) and s.state() == (2, 6)
    assert s.last_samples == 6000


def test_noise_scale_zero_is_the_plain_rule() -> None:
    s = RefreshSchedule(threshold=0.1, max_interval=5, noise_scale=0.0)
    for step in range(3):
        s.note_value(rho=100.0, samples=8)
        s.observe(step, 0.5)
        assert s.state() == (1, step + 1) and s.last_floor == 0.0


def test_floor_is_the_same_for_any_split_of_the_samples() -> None:
    """The floor uses the global value and count only.

    One process with the whole batch and two ranks with half each (summed before normalising) decide
    the same.
    """
    torch.manual_seed(1)
    u = torch.randn(64, 5, dtype=torch.float64)
    whole = u.t() @ u
    halves = u[:32].t() @ u[:32] + u[32:].t() @ u[32:]
    assert wishart_rho(whole / 64) == pytest.approx(wishart_rho(halves / 64), rel=1e-12)


def _bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 4))


def _intervals(noise_scale: float, steps: int = 8) -> dict[str, list[int]]:
    """Intervals per statistic kind after ``steps`` steps at lr = 0 (fixed weights: r is pure noise)."""
    model = _bn_mlp()
    opt = spngd_ds.SPNGD(
        model,
        lr=0.0,
        momentum=0.0,
        damping=1e-2,
        staleness={"threshold": 0.1, "max_interval": 20, "noise_scale": noise_scale},
    )
    for b in opt.blocks.values():  # the optimizer does not pass noise_scale to the schedules yet
        for s in b.stats.values():
            s.schedule.noise_scale = noise_scale
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    out: dict[str, list[int]] = {}
    for b in opt.blocks.values():
        for s in b.stats.values():
            out.setdefault(s.name, []).append(s.schedule.interval)
            assert s.schedule.last_samples == 16
    return out


def test_floor_lets_noisy_statistics_go_stale_at_fixed_weights() -> None:
    plain = _intervals(0.0)
    floor = _intervals(1.0)
    assert max(plain["F"]) == 1  # BatchNorm's F at 16 samples: noise alone resets it every time
    assert min(floor["F"]) > 1
    assert sum(floor["G"]) > sum(plain["G"])


def test_relative_change_of_two_batches_is_near_the_floor() -> None:
    """At fixed weights, r between two independent batches is of the order of the floor."""
    torch.manual_seed(2)
    d, n = 8, 64
    mix = torch.randn(d, d, dtype=torch.float64)
    cov = mix @ mix.t() / d
    chol = torch.linalg.cholesky(cov + 0.1 * torch.eye(d, dtype=torch.float64))
    ratios, floors = [], []
    for _ in range(50):
        a, b = (torch.randn(n, d, dtype=torch.float64) @ chol.t() for _ in range(2))
        x1, x2 = a.t() @ a / n, b.t() @ b / n
        ratios.append(relative_change(x1, x2))
        floors.append(math.sqrt(wishart_rho(x1) * 2 / n))
    assert 0.7 < sorted(ratios)[25] / sorted(floors)[25] < 1.3
