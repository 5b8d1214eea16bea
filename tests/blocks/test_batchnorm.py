"""BatchNorm unit-wise blocks (contract rule 4) and their neighbours against the dense reference.

``test_selfcheck_*`` validate the reference alone; the others compare ``spngd_ds.SPNGD``: F of
every BN layer, A/G/π of the Kronecker layers around it (their output gradients flow through the
batch-coupled BN backward), and the one-step update of every parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.support import reference as R

RTOL = 1e-10


assert_rel = R.assert_rel


@dataclass(frozen=True)
class Case:
    """A tiny model with BatchNorm, its input shape, batch size, loss and output size."""

    name: str
    build: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    n: int
    loss: str
    n_out: int


CASES: list[Case] = [
    Case(
        "conv_bn2d_relu_linear",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, bias=False),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 5 * 5, 3),
        ),
        (2, 5, 5),
        6,
        "ce",
        3,
    ),
    Case(
        "conv_bn2d_x2_eps_mse",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2, bias=False),
            nn.BatchNorm2d(3, eps=1e-2),
            nn.ReLU(),
            nn.Conv2d(3, 2, 1),
            nn.BatchNorm2d(2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 2),
        ),
        (2, 7, 7),
        7,
        "mse",
        2,
    ),
    Case(
        "linear_bn1d_tanh_linear",
        lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)),
        (5,),
        8,
        "ce",
        3,
    ),
    Case(
        "linear_bn1d_eps_mse",
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=0.1), nn.ReLU(), nn.Linear(4, 2)),
        (3,),
        5,
        "mse",
        2,
    ),
]
CASE_IDS = [c.name for c in CASES]
# (damping λ, bn_damping_scale): λ_bn = 64e-3 and 1.0
DAMPINGS = [(1e-3, 64.0), (1.0, 1.0)]


def make_case(case: Case, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor, R.LossFn]:
    """Model in train mode with γ ~ N(1, 0.2), β ~ N(0, 0.2) and perturbed weights."""
    torch.manual_seed(seed)
    model = case.build().double().train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
            elif isinstance(m, nn.Linear | nn.Conv2d):
                for p in m.parameters():
                    p.add_(0.1 * torch.randn_like(p))
    x = 1.5 * torch.randn(case.n, *case.in_shape, dtype=torch.float64) + 0.3
    if case.loss == "ce":
        return model, x, torch.randint(0, case.n_out, (case.n,)), R.ce_per_sample
    return model, x, torch.randn(case.n, case.n_out, dtype=torch.float64), R.mse_per_sample


def torch_loss(case: Case, out: Tensor, target: Tensor) -> Tensor:
    if case.loss == "ce":
        return F.cross_entropy(out, target)
    return 0.5 * F.mse_loss(out, target, reduction="sum") / out.shape[0]


# --------------------------------------------------------------------------------------------
# Self-checks of the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_selfcheck_bn_forward_and_gradients(case: Case) -> None:
    """Explicit BN forward == nn.BatchNorm (train mode, module eps).

    (1/n) Σ_i u_i == autograd (∇γ, ∇β); Kronecker gradients rebuilt from (g, ā) == autograd, with BN
    coupling in between.
    """
    model, x, target, loss_fn = make_case(case)
    ref = R.compute_reference(model, x, target, loss_fn)
    out = model(x)
    torch.testing.assert_close(ref.output, out.detach(), rtol=1e-12, atol=1e-12)
    loss = torch_loss(case, out, target)
    loss.backward()
    modules = dict(model.named_modules())
    for k, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(ref.plain_grads[k], p.grad, rtol=1e-11, atol=1e-14)
    assert ref.bn, "case must contain a BN layer"
    for name, bs in ref.bn.items():
        m = modules[name]
        assert m.weight.grad is not None and m.bias.grad is not None
        torch.testing.assert_close(bs.grad[:, 0], m.weight.grad, rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(bs.grad[:, 1], m.bias.grad, rtol=1e-11, atol=1e-14)
        # F is PSD and symmetric, and equals the einsum form of rule 4.
        torch.testing.assert_close(bs.F, bs.F.transpose(1, 2), rtol=0, atol=0)
        assert bool((torch.linalg.eigvalsh(bs.F) > -1e-12).all())
        torch.testing.assert_close(bs.F, torch.einsum("nci,ncj->cij", bs.u, bs.u) / x.shape[0], rtol=1e-12, atol=1e-14)
    for name, ks in ref.kron.items():
        m = modules[name]
        for local, t in R.split_kron_update(m, ks.grad_mat).items():
            torch.testing.assert_close(t, getattr(m, local).grad, rtol=1e-11, atol=1e-14)


def test_selfcheck_bn_coupling_is_real() -> None:
    """Sanity: with BN in train mode n·dL/ds_i is not sample i's own-loss gradient.

    It differs in the layer before BN, so the reference must (and does) use the batch-loss
    definition.
    """
    case = CASES[2]
    model, x, target, loss_fn = make_case(case)
    ref = R.compute_reference(model, x, target, loss_fn)
    g_batch = ref.kron["0"].g
    # sample i's own loss, still normalised with the whole batch's statistics
    n = x.shape[0]
    own = []
    for i in range(n):
        out, recs = R.reference_forward(model, x)
        li = loss_fn(out, target)[i]
        (gi,) = torch.autograd.grad(li, [recs[0].out])
        own.append(gi[i])
    assert float((g_batch - torch.stack(own)).abs().max()) > 1e-3


def test_selfcheck_bn_preconditioner_closed_form() -> None:
    """precondition_bn == the 2x2 closed-form inverse."""
    torch.manual_seed(3)
    u = torch.randn(6, 4, 2, dtype=torch.float64)
    Fm = torch.einsum("nci,ncj->cij", u, u) / 6
    grad = torch.randn(4, 2, dtype=torch.float64)
    lam = 0.3
    got = R.precondition_bn(Fm, grad, lam)
    a, b, d = Fm[:, 0, 0] + lam, Fm[:, 0, 1], Fm[:, 1, 1] + lam
    det = a * d - b * b
    exp = torch.stack([(d * grad[:, 0] - b * grad[:, 1]) / det, (a * grad[:, 1] - b * grad[:, 0]) / det], 1)
    torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# spngd_ds against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damping,bn_scale", DAMPINGS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bn_and_kron_factors_match_reference(case: Case, damping: float, bn_scale: float) -> None:
    """F (C, 2, 2) of every BN layer, and A, G, π of every Kronecker layer, to 1e-10 relative."""
    model, x, target, loss_fn = make_case(case)
    ref = R.compute_reference(model, x, target, loss_fn)
    opt = R.make_spngd(model, lr=0.5, damping=damping, bn_damping_scale=bn_scale)
    R.spngd_step(opt, model, x, target, loss_fn)
    blocks = opt.blocks
    for name, bs in ref.bn.items():
        assert name in blocks, f"no block for BN layer {name}"
        assert tuple(blocks[name].F.shape) == tuple(bs.F.shape), f"{name}.F shape"
        assert_rel(blocks[name].F, bs.F, what=f"{name}.F")
    for name, ks in ref.kron.items():
        assert name in blocks, f"no block for {name}"
        assert_rel(blocks[name].A, ks.A, what=f"{name}.A")
        assert_rel(blocks[name].G, ks.G, what=f"{name}.G")
        assert float(blocks[name].pi) == pytest.approx(R.pi_of(ks.A, ks.G), rel=RTOL), f"{name}.pi"


@pytest.mark.parametrize("damping,bn_scale", DAMPINGS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bn_one_step_update(case: Case, damping: float, bn_scale: float) -> None:
    """Every parameter moves by −lr · P(∇): (F_c + bn_scale·λ I)⁻¹ for BN, Ĝ⁻¹ M Â⁻¹ otherwise."""
    lr = 0.5
    model, x, target, loss_fn = make_case(case)
    ref = R.compute_reference(model, x, target, loss_fn)
    expected = R.reference_preconditioned(model, ref, damping, bn_damping_scale=bn_scale)
    opt = R.make_spngd(model, lr=lr, damping=damping, bn_damping_scale=bn_scale)
    res = R.spngd_step(opt, model, x, target, loss_fn)
    for k, d in res.deltas.items():
        assert_rel(d, -lr * expected[k], what=f"Δ{k}")
