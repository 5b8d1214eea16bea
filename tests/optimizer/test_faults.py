"""Faults in one process (docs/design.md rule 5, section 7 "Faults"): the run goes on and loses nothing.

(a) a factor whose damped version is not positive definite: Cholesky fails in fp32 and in fp64,
    the layer takes the plain gradient that step, a counter is logged, a later step inverts again;
(b) a non-finite statistic: its refresh is rejected, the old value and inverse are kept;
(c) a non-finite gradient: the step is skipped and its statistics discarded;
(d) a BatchNorm channel whose F_c + λ_bn I is not positive definite: that channel alone falls back.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds
import spngd_ds.blocks.base as base_mod
from spngd_ds.blocks.base import Block, robust_inverse
from spngd_ds.blocks.unitwise import inverse_2x2

LR = 0.05


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 4))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)


def _backward(model: nn.Module, step: int, x: torch.Tensor | None = None) -> None:
    xb, y = _batch(step)
    F.cross_entropy(model(xb if x is None else x), y).backward()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _kron_update(block: Block, gw: torch.Tensor, gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-lr Ĝ⁻¹ [∇W | ∇b] Â⁻¹ with the block's current inverses."""
    p = block.stats["G"].inverse @ torch.cat([gw, gb[:, None]], 1) @ block.stats["A"].inverse  # type: ignore[operator]
    return -LR * p[:, :-1], -LR * p[:, -1]


# --------------------------------------------------------------------------------------------------
# robust_inverse alone
# --------------------------------------------------------------------------------------------------


def test_robust_inverse_spd_and_failures() -> None:
    torch.manual_seed(0)
    q = torch.randn(5, 5, dtype=torch.float64)
    spd = q @ q.T + 0.1 * torch.eye(5, dtype=torch.float64)
    inv = robust_inverse(spd)
    assert inv is not None and inv.dtype == torch.float64
    torch.testing.assert_close(inv @ spd, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    inv32 = robust_inverse(spd.float())
    assert inv32 is not None and inv32.dtype == torch.float32
    assert robust_inverse(-torch.eye(4)) is None  # negative definite
    assert robust_inverse(torch.diag(torch.tensor([1.0, -1.0, 2.0]))) is None  # indefinite
    assert robust_inverse(torch.zeros(3, 3)) is None  # singular
    bad = torch.eye(3)
    bad[1, 1] = float("nan")
    assert robust_inverse(bad) is None
    bad[1, 1] = float("inf")
    assert robust_inverse(bad) is None


def test_robust_inverse_retries_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp32 failure is retried in float64 before giving up (rule 5)."""
    tried: list[torch.dtype] = []
    real = torch.linalg.cholesky_ex

    def spy(a: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        tried.append(a.dtype)
        return real(a, *args, **kwargs)

    monkeypatch.setattr(base_mod.torch.linalg, "cholesky_ex", spy)
    assert robust_inverse(-torch.eye(3)) is None
    assert tried == [torch.float32, torch.float64]
    tried.clear()
    assert robust_inverse(torch.eye(3)) is not None
    assert tried == [torch.float32]


def test_inverse_2x2_flags_bad_channels() -> None:
    f = torch.zeros(3, 2, 2)
    f[0] = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    f[1] = torch.tensor([[-5.0, 0.0], [0.0, 1.0]])  # negative diagonal
    f[2] = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # indefinite (det < 0)
    inv, ok = inverse_2x2(f, 0.1)
    assert ok.tolist() == [True, False, False]
    torch.testing.assert_close(inv[0] @ (f[0] + 0.1 * torch.eye(2)), torch.eye(2))
    assert torch.equal(inv[1], torch.eye(2)) and torch.equal(inv[2], torch.eye(2))


# --------------------------------------------------------------------------------------------------
# (a) singular / indefinite factor through the optimizer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_indefinite_factor_falls_back_to_plain_gradient(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    model = _mlp().to(dtype)
    opt = spngd_ds.SPNGD(model, lr=LR, momentum=0.0, damping=1e-2, staleness=None, step_bound=None)
    _backward(model, 0, _batch(0)[0].to(dtype))
    opt.step()
    opt.zero_grad()
    assert opt.metrics()["spngd/inversion_failures"] == 0.0
    first = opt.blocks["0"]
    head = opt.blocks["3"]
    assert first.ready() and head.ready()

    # step 1: A of the first layer comes out as -I (negative definite; +π√λ I cannot fix it)
    tried: list[torch.dtype] = []
    real_chol = torch.linalg.cholesky_ex

    def spy(a: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        tried.append(a.dtype)
        return real_chol(a, *args, **kwargs)

    real_normalise = first.normalise

    def bad_normalise(name: str, total: torch.Tensor, count: float) -> torch.Tensor:
        value = real_normalise(name, total, count)
        if name == "A":
            return -torch.eye(value.shape[0], dtype=value.dtype)
        return value

    with monkeypatch.context() as mp:
        mp.setattr(first, "normalise", bad_normalise)
        mp.setattr(base_mod.torch.linalg, "cholesky_ex", spy)
        _backward(model, 1, _batch(1)[0].to(dtype))
        before, grads = _snapshot(model), _grads(model)
        opt.step()
        opt.zero_grad()
    # the factors tried in their own dtype first (batched by size), the failed A again in float64
    # (for a float64 model the two coincide)
    assert tried[0] == dtype and tried[-1] == torch.float64
    assert opt.metrics()["spngd/inversion_failures"] == 1.0
    assert first.stats["A"].inverse is None and not first.ready()
    assert _all_finite(model)
    # the failing layer took the plain gradient: Δθ = -lr ∇ (momentum 0)
    tol: dict[str, Any] = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-13)
    for pname in ("0.weight", "0.bias"):
        delta = dict(model.named_parameters())[pname].detach() - before[pname]
        torch.testing.assert_close(delta, -LR * grads[pname], **tol)
    # the other Kron layer is still preconditioned (not the plain gradient)
    head_update = _kron_update(head, grads["3.weight"], grads["3.bias"])
    params = dict(model.named_parameters())
    torch.testing.assert_close(params["3.weight"].detach() - before["3.weight"], head_update[0], **tol)
    assert not torch.allclose(params["3.weight"].detach() - before["3.weight"], -LR * grads["3.weight"])

    # step 2: normal statistics, the layer is inverted and preconditioned again
    _backward(model, 2, _batch(2)[0].to(dtype))
    before, grads = _snapshot(model), _grads(model)
    opt.step()
    opt.zero_grad()
    assert opt.metrics()["spngd/inversion_failures"] == 1.0
    assert first.ready()
    assert bool(torch.isfinite(first.stats["A"].inverse).all())  # type: ignore[arg-type]
    params = dict(model.named_parameters())
    upd_w, upd_b = _kron_update(first, grads["0.weight"], grads["0.bias"])
    torch.testing.assert_close(params["0.weight"].detach() - before["0.weight"], upd_w, **tol)
    torch.testing.assert_close(params["0.bias"].detach() - before["0.bias"], upd_b, **tol)
    assert _all_finite(model)


def test_failed_factor_is_retried_at_the_next_step_under_staleness(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed inversion does not wait for the (grown) interval: the factor is due next step."""
    model = _mlp()
    opt = spngd_ds.SPNGD(
        model, lr=LR, momentum=0.9, damping=1e-2, staleness={"threshold": 1e9, "max_interval": 3}, step_bound=None
    )
    first = opt.blocks["0"]
    _backward(model, 0)
    opt.step()
    opt.zero_grad()
    real_normalise = first.normalise
    with monkeypatch.context() as mp:
        mp.setattr(
            first,
            "normalise",
            lambda name, total, count: (
                -torch.eye(total.shape[-1]) if name == "A" else real_normalise(name, total, count)
            ),
        )
        _backward(model, 1)
        opt.step()
        opt.zero_grad()
    a, g = first.stats["A"], first.stats["G"]
    assert a.inverse is None and a.schedule.is_due(2)
    assert not g.schedule.is_due(2) and g.schedule.state() == (2, 3)
    _backward(model, 2)
    opt.step()
    opt.zero_grad()
    assert a.inverse is not None and a.inversions == 3 and g.inversions == 2
    assert opt.metrics()["spngd/inversion_failures"] == 1.0
    for step in range(3, 8):
        _backward(model, step)
        opt.step()
        opt.zero_grad()
    assert _all_finite(model) and first.ready()
    assert opt.metrics()["spngd/inversion_failures"] == 1.0


# --------------------------------------------------------------------------------------------------
# (b) non-finite statistic
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_name,stat_name", [("0", "A"), ("3", "G"), ("1", "F")])
def test_nonfinite_statistic_is_rejected(block_name: str, stat_name: str) -> None:
    model = _mlp()
    opt = spngd_ds.SPNGD(model, lr=LR, momentum=0.9, damping=1e-2, staleness=None, step_bound=None)
    _backward(model, 0)
    opt.step()
    opt.zero_grad()
    stat = opt.blocks[block_name].stats[stat_name]
    old_value, old_inverse = stat.value.clone(), stat.inverse.clone()
    refreshes, inversions = stat.refreshes, stat.inversions

    _backward(model, 1)
    assert stat.local_sum is not None
    stat.local_sum.view(-1)[0] = float("nan")  # what the hooks captured this step is poisoned
    opt.step()
    opt.zero_grad()
    m = opt.metrics()
    assert m["spngd/nonfinite_stats"] == 1.0
    assert m["spngd/skipped_steps"] == 0.0  # gradients were fine: the step itself went on
    assert torch.equal(stat.value, old_value) and torch.equal(stat.inverse, old_inverse)
    assert (stat.refreshes, stat.inversions) == (refreshes, inversions)
    assert stat.schedule.is_due(2)
    assert _all_finite(model)
    # every other statistic was refreshed normally
    others = [s for b in opt.blocks.values() for s in b.stats.values() if s is not stat]
    assert all(s.refreshes == 2 for s in others)

    for step in range(2, 5):
        _backward(model, step)
        opt.step()
        opt.zero_grad()
    assert stat.refreshes == refreshes + 3
    assert not torch.equal(stat.value, old_value)
    assert opt.metrics()["spngd/nonfinite_stats"] == 1.0
    assert _all_finite(model)


def test_nonfinite_normalised_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through ``normalise`` (e.g. an overflow when the global sum is normalised)."""
    model = _mlp()
    opt = spngd_ds.SPNGD(model, lr=LR, momentum=0.0, damping=1e-2, staleness=None, step_bound=None)
    _backward(model, 0)
    opt.step()
    opt.zero_grad()
    head = opt.blocks["3"]
    old = head.stats["G"].value.clone()
    real = head.normalise
    with monkeypatch.context() as mp:
        mp.setattr(head, "normalise", lambda n, t, c: real(n, t, c) * (float("inf") if n == "G" else 1.0))
        _backward(model, 1)
        grads, before = _grads(model), _snapshot(model)
        opt.step()
        opt.zero_grad()
    assert opt.metrics()["spngd/nonfinite_stats"] == 1.0
    assert torch.equal(head.stats["G"].value, old)
    # the step used the new A inverse and the kept G inverse
    upd_w, _ = _kron_update(head, grads["3.weight"], grads["3.bias"])
    torch.testing.assert_close(
        dict(model.named_parameters())["3.weight"].detach() - before["3.weight"], upd_w, rtol=1e-5, atol=1e-7
    )
    assert _all_finite(model)


# --------------------------------------------------------------------------------------------------
# (c) non-finite gradient
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_step(poison: float) -> None:
    """Compared with a twin run that never saw the bad batch.

    Identical parameters afterwards, so the bad step neither moved a parameter, nor touched
    momentum, nor left statistics behind.
    """
    model, twin = _mlp(), _mlp()
    kw = dict(lr=LR, momentum=0.9, damping=1e-2, staleness={"threshold": 0.1, "max_interval": 5})
    opt, opt_twin = spngd_ds.SPNGD(model, **kw), spngd_ds.SPNGD(twin, **kw)
    for m, o in ((model, opt), (twin, opt_twin)):
        _backward(m, 0)
        o.step()
        o.zero_grad()

    x, _ = _batch(1)
    x = x.clone()
    x[3, 2] = poison
    _backward(model, 1, x)
    assert not all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())  # type: ignore[arg-type]
    before = _snapshot(model)
    stats_before = {
        (b.name, k): (s.value, s.refreshes, s.schedule.state()) for b in opt.blocks.values() for k, s in b.stats.items()
    }
    momentum_before = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    opt.step()
    opt.zero_grad()
    assert opt.metrics()["spngd/skipped_steps"] == 1.0
    assert opt.step_count == 1
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert torch.equal(opt.state[p]["momentum_buffer"], momentum_before[id(p)]), n
    for b in opt.blocks.values():
        for k, s in b.stats.items():
            value, refreshes, state = stats_before[(b.name, k)]
            assert s.value is value and s.refreshes == refreshes and s.schedule.state() == state
            assert s.local_sum is None and s.local_count == 0.0  # this step's statistics discarded

    for step in range(2, 6):  # the next clean steps work and match the twin exactly
        for m, o in ((model, opt), (twin, opt_twin)):
            _backward(m, step)
            o.step()
            o.zero_grad()
    assert _all_finite(model)
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert opt.metrics()["spngd/skipped_steps"] == 1.0 and opt.step_count == opt_twin.step_count == 5


# --------------------------------------------------------------------------------------------------
# (d) BatchNorm channel failure
# --------------------------------------------------------------------------------------------------


def test_bn_channel_failure_falls_back_for_that_channel_only(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    opt = spngd_ds.SPNGD(
        model, lr=LR, momentum=0.0, damping=1e-2, bn_damping_scale=4.0, staleness=None, step_bound=None
    )
    bn = opt.blocks["1"]
    assert bn.kind == "unitwise"
    _backward(model, 0)
    opt.step()
    opt.zero_grad()
    bad_c = 3
    real = bn.normalise

    def bad_normalise(name: str, total: torch.Tensor, count: float) -> torch.Tensor:
        value = real(name, total, count).clone()
        value[bad_c, 0, 0] = -10.0  # F_c + λ_bn I has a negative diagonal entry
        return value

    with monkeypatch.context() as mp:
        mp.setattr(bn, "normalise", bad_normalise)
        _backward(model, 1)
        grads, before = _grads(model), _snapshot(model)
        opt.step()
        opt.zero_grad()
    m = opt.metrics()
    assert m["spngd/bn_channel_failures"] == 1.0
    assert m["spngd/inversion_failures"] == 0.0
    assert bn.failed_channels == 1
    params = dict(model.named_parameters())
    d_gamma = params["1.weight"].detach() - before["1.weight"]
    d_beta = params["1.bias"].detach() - before["1.bias"]
    # the bad channel: plain gradient
    torch.testing.assert_close(d_gamma[bad_c], -LR * grads["1.weight"][bad_c])
    torch.testing.assert_close(d_beta[bad_c], -LR * grads["1.bias"][bad_c])
    # the others: (F_c + λ_bn I)^-1 (∇γ_c, ∇β_c) with the F of this step
    f = bn.stats["F"].value
    lam = 4.0 * 1e-2
    for c in range(bn.channels):
        if c == bad_c:
            continue
        g = torch.stack([grads["1.weight"][c], grads["1.bias"][c]]).double()
        expect = -LR * torch.linalg.solve(f[c].double() + lam * torch.eye(2, dtype=torch.float64), g)
        torch.testing.assert_close(torch.stack([d_gamma[c], d_beta[c]]).double(), expect, rtol=1e-4, atol=1e-7)
        assert not torch.allclose(d_gamma[c], -LR * grads["1.weight"][c])
    assert _all_finite(model)

    # the next step refreshes F again and no channel fails
    _backward(model, 2)
    opt.step()
    opt.zero_grad()
    assert opt.metrics()["spngd/bn_channel_failures"] == 1.0
    assert bn.failed_channels == 0
    assert bool(torch.isfinite(bn.stats["F"].inverse).all())
