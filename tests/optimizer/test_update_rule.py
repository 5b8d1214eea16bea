"""Rules 7 and 8 (momentum update, weight rescaling) against hand computations in float64.

Rule 7 (momentum SGD on the preconditioned gradient, momentum correction, weight decay) and rule 8
(weight rescaling of layers that feed a BatchNorm), against hand computations in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds


class PlainNet(nn.Module):
    """Only layers without curvature (the first-order fallback).

    Conv1d, and Embedding with ``curvature_embedding=False``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 5)
        self.conv = nn.Conv1d(5, 3, kernel_size=2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx).transpose(1, 2)  # (N, 5, L)
        return self.conv(h).mean(dim=2)  # (N, 3) logits


def _plain_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(77 + step)
    return torch.randint(0, 12, (16, 6), generator=g), torch.randint(0, 3, (16,), generator=g)


def test_fallback_layers_are_plain_blocks() -> None:
    torch.manual_seed(0)
    opt = spngd_ds.SPNGD(PlainNet().double(), curvature_embedding=False)
    assert {b.kind for b in opt.blocks.values()} == {"plain"}
    assert sorted(opt.blocks) == ["conv.bias", "conv.weight", "emb.weight"]
    assert all(not b.stats for b in opt.blocks.values())


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_momentum_update_with_lr_changes(wd: float) -> None:
    """``v <- m_eff v - lr_t (g + wd θ); θ <- θ + v``; m_eff = m lr_t / lr_{t-1} when lr changes."""
    torch.manual_seed(0)
    model = PlainNet().double()
    m = 0.9
    opt = spngd_ds.SPNGD(model, lr=0.1, momentum=m, weight_decay=wd, step_bound=None, curvature_embedding=False)
    lrs = [0.1, 0.1, 0.04, 0.04, 0.2]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in theta.items()}
    prev_lr = None
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = _plain_batch(step)
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad()
        m_eff = m if prev_lr is None or prev_lr == lr else m * lr / prev_lr
        for n in theta:
            v[n] = m_eff * v[n] - lr * (grads[n] + wd * theta[n])
            theta[n] = theta[n] + v[n]
        prev_lr = lr
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), theta[n], rtol=1e-12, atol=1e-14, msg=f"step {step} {n}")
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], v[n], rtol=1e-12, atol=1e-14)


def test_momentum_correction_matches_torch_sgd_across_lr_changes() -> None:
    """torch.optim.SGD agrees with rule 7 with the momentum correction at every step.

    torch.optim.SGD keeps its buffer in gradient units (b <- m b + g; θ <- θ - lr_t b), which is
    rule 7 *with* the correction m_eff = m lr_t / lr_{t-1}: the two agree at every step, including
    after lr changes. Without the correction they would differ from the first lr change on.
    """
    lrs = [0.1, 0.1, 0.02, 0.02, 0.3]
    results = {}
    for name in ("spngd", "sgd"):
        torch.manual_seed(0)
        model = PlainNet().double()
        opt = (
            spngd_ds.SPNGD(model, lr=0.1, momentum=0.9, curvature_embedding=False)
            if name == "spngd"
            else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        )
        snaps = []
        for step, lr in enumerate(lrs):
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = _plain_batch(step)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            snaps.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
        results[name] = snaps
    for step in range(len(lrs)):
        torch.testing.assert_close(
            results["spngd"][step], results["sgd"][step], rtol=1e-12, atol=1e-14, msg=f"step {step}"
        )
    # the correction matters here: the uncorrected rule gives a visibly different trajectory
    torch.manual_seed(0)
    model = PlainNet().double()
    v = [torch.zeros_like(p) for p in model.parameters()]
    for step, lr in enumerate(lrs):
        x, y = _plain_batch(step)
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, buf in zip(model.parameters(), v, strict=True):
                buf.mul_(0.9).add_(p.grad, alpha=-lr)  # type: ignore[arg-type]
                p.add_(buf)
                p.grad = None
    uncorrected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert not torch.allclose(uncorrected, results["spngd"][-1], rtol=1e-6, atol=1e-9)


def test_zero_lr_then_positive_uses_plain_momentum() -> None:
    """A warm-up starting at lr 0 must not divide by zero: m_eff falls back to m."""
    torch.manual_seed(0)
    model = PlainNet().double()
    opt = spngd_ds.SPNGD(model, lr=0.0, momentum=0.9, step_bound=None, curvature_embedding=False)
    x, y = _plain_batch(0)
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    opt.zero_grad()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    opt.param_groups[0]["lr"] = 0.1
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
    opt.step()
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), b - 0.1 * g, rtol=1e-12, atol=1e-14)


def test_weight_decay_is_added_after_preconditioning() -> None:
    """Kron layers: v <- m v - lr (P(∇) + wd θ), with P the Ĝ⁻¹ M Â⁻¹ of this step's inverses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    lr, m, wd = 0.05, 0.8, 0.03
    opt = spngd_ds.SPNGD(model, lr=lr, momentum=m, damping=1e-2, weight_decay=wd, staleness=None, step_bound=None)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in theta.items()}
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad()
        for layer in ("0", "2"):
            blk = opt.blocks[layer]
            mat = torch.cat([grads[f"{layer}.weight"], grads[f"{layer}.bias"][:, None]], 1)
            pre = blk.stats["G"].inverse @ mat @ blk.stats["A"].inverse
            for n, d in ((f"{layer}.weight", pre[:, :-1]), (f"{layer}.bias", pre[:, -1])):
                v[n] = m * v[n] - lr * (d + wd * theta[n])
                theta[n] = theta[n] + v[n]
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), theta[n], rtol=1e-10, atol=1e-12, msg=f"step {step} {n}")


# --------------------------------------------------------------------------------------------------
# Rule 8: weight rescaling
# --------------------------------------------------------------------------------------------------


def _bn_mlp() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[0].weight.mul_(40.0)  # type: ignore[operator]  # ||W||_F far above sqrt(2·6)
        model[3].weight.mul_(40.0)  # type: ignore[operator]  # large too, but it feeds no BatchNorm
    return model


def _one_step(model: nn.Module, rescale: bool) -> spngd_ds.SPNGD:
    opt = spngd_ds.SPNGD(model, lr=0.01, momentum=0.0, damping=1e-2, weight_rescale=rescale, staleness=None)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    return opt


def test_weight_rescale_only_layers_feeding_bn() -> None:
    model, twin = _bn_mlp(), _bn_mlp()
    opt = _one_step(model, rescale=True)
    _one_step(twin, rescale=False)
    assert opt.capture.feeds_bn == {"0"}
    target = math.sqrt(2 * 6)
    w_twin = twin[0].weight.detach()  # type: ignore[index]
    assert float(w_twin.norm()) > 2 * target  # without rule 8 the norm stays large
    # (the norm is taken in float32 even for a float64 model, hence rel 1e-6)
    assert float(model[0].weight.detach().norm()) == pytest.approx(target, rel=1e-6)  # type: ignore[index]
    # rescaling is a pure scaling of the updated weight, applied after the update
    torch.testing.assert_close(model[0].weight.detach(), w_twin * (target / float(w_twin.norm())), rtol=1e-6, atol=0)  # type: ignore[index]
    # bias, BatchNorm and the head are untouched by rule 8
    for name in ("0.bias", "1.weight", "1.bias", "3.weight", "3.bias"):
        torch.testing.assert_close(
            dict(model.named_parameters())[name], dict(twin.named_parameters())[name], rtol=1e-12, atol=0, msg=name
        )
    assert float(model[3].weight.detach().norm()) > math.sqrt(2 * 3)  # type: ignore[index]


def test_weight_rescale_never_scales_up() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    twin = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    twin.load_state_dict(model.state_dict())
    assert float(model[0].weight.detach().norm()) < math.sqrt(12)  # type: ignore[operator]
    opt = _one_step(model, rescale=True)
    _one_step(twin, rescale=False)
    assert opt.capture.feeds_bn == {"0"}
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_weight_rescale_conv_feeding_batchnorm2d() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
    ).double()
    with torch.no_grad():
        for i in (0, 3, 5):
            model[i].weight.mul_(30.0)  # type: ignore[operator]
    norms_before = {i: float(model[i].weight.detach().norm()) for i in (3, 5)}  # type: ignore[operator]
    opt = spngd_ds.SPNGD(model, lr=1e-3, momentum=0.0, damping=1e-2, weight_rescale=True, staleness=None)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.capture.feeds_bn == {"0"}
    assert float(model[0].weight.detach().norm()) == pytest.approx(math.sqrt(2 * 4), rel=1e-6)  # type: ignore[operator]
    for i in (3, 5):  # not rescaled: still about as large as before (a small lr step)
        assert float(model[i].weight.detach().norm()) == pytest.approx(norms_before[i], rel=0.05)  # type: ignore[operator]
        assert float(model[i].weight.detach().norm()) > 2 * math.sqrt(2 * model[i].weight.shape[0])  # type: ignore[index, operator]
