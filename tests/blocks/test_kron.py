"""Linear and Conv2d blocks (contract rules 2, 3, 5, 7) against the dense float64 reference.

``test_selfcheck_*`` validate the reference alone (no ``spngd_ds`` needed); the other tests
compare ``spngd_ds.SPNGD`` with it: factors A, G, π after one step, and the one-step update
``Δθ = −η P(∇)`` of every parameter.
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


# --------------------------------------------------------------------------------------------
# Tiny float64 models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A tiny model, its input shape, its loss and how to draw targets."""

    name: str
    build: Callable[[], nn.Module]
    in_shape: tuple[int, ...]
    n: int
    loss: str  # "ce" or "mse"
    n_out: int


def _conv_mlp(
    cin: int, cout: int, k: int, stride: int, pad: int, dil: int, bias: bool, hw: int, n_cls: int
) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        ho = R.conv_output_size(hw, k, stride, pad, dil)
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, bias=bias),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(cout * ho * ho, n_cls, bias=bias),
        )

    return build


CASES: list[Case] = [
    Case(
        "linear_bias_ce",
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)),
        (5,),
        6,
        "ce",
        3,
    ),
    Case(
        "linear_nobias_ce",
        lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False)),
        (5,),
        6,
        "ce",
        3,
    ),
    Case(
        "linear_bias_mse_relu",
        lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)),
        (4,),
        7,
        "mse",
        2,
    ),
    Case("conv_s2_p1_d2_bias", _conv_mlp(2, 3, 3, 2, 1, 2, True, 7, 3), (2, 7, 7), 6, "ce", 3),
    Case("conv_s2_p1_d2_nobias", _conv_mlp(2, 3, 3, 2, 1, 2, False, 7, 3), (2, 7, 7), 6, "ce", 3),
    Case("conv_3x3_plain_bias", _conv_mlp(2, 3, 3, 1, 0, 1, True, 6, 3), (2, 6, 6), 5, "ce", 3),
    Case("conv_1x1_bias", _conv_mlp(3, 2, 1, 1, 0, 1, True, 5, 3), (3, 5, 5), 5, "ce", 3),
    # C_in·kh·kw = 261 >= 256: the im2col columns layout of KronBlock (the others take the rows one)
    Case("conv_wide_s2_p1_bias", _conv_mlp(29, 2, 3, 2, 1, 1, True, 5, 3), (29, 5, 5), 4, "ce", 3),
    Case("conv_wide_d2_nobias", _conv_mlp(29, 2, 3, 1, 2, 2, False, 4, 3), (29, 4, 4), 4, "ce", 3),
    Case(
        "conv_stack_mse",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2),
            nn.ReLU(),
            nn.Conv2d(3, 2, 1, bias=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 2),
        ),
        (2, 7, 7),
        6,
        "mse",
        2,
    ),
    Case(
        # A grouped conv (no block: first-order fallback) and a Scale (no block) among blocks.
        "uncovered_params",
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, groups=2),
            R.Scale(4),
            nn.Tanh(),
            nn.Conv2d(4, 2, 3, stride=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 2 * 2, 3),
        ),
        (2, 5, 5),
        6,
        "ce",
        3,
    ),
]
CASE_IDS = [c.name for c in CASES]
DAMPINGS = [1e-3, 1.0]


def make_case(case: Case, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor, R.LossFn]:
    """Model (float64, with non-trivial parameters), input, target and per-sample loss."""
    torch.manual_seed(seed)
    model = case.build().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases away from their init, scales varied
    x = torch.randn(case.n, *case.in_shape, dtype=torch.float64)
    if case.loss == "ce":
        target = torch.randint(0, case.n_out, (case.n,))
        return model, x, target, R.ce_per_sample
    target = torch.randn(case.n, case.n_out, dtype=torch.float64)
    return model, x, target, R.mse_per_sample


def torch_loss(case: Case, out: Tensor, target: Tensor) -> Tensor:
    """The batch loss written with torch's own functions (for the self-checks)."""
    if case.loss == "ce":
        return F.cross_entropy(out, target)
    return 0.5 * F.mse_loss(out, target, reduction="sum") / out.shape[0]


# --------------------------------------------------------------------------------------------
# Self-checks of the reference (no spngd_ds)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,stride,pad,dil",
    [(3, 2, 1, 2), (3, 1, 0, 1), (1, 1, 0, 1), (2, 3, 2, 1), ((3, 2), (1, 2), (0, 1), (2, 1))],
)
def test_selfcheck_im2col(k: int, stride: int, pad: int, dil: int) -> None:
    """Slicing im2col == scalar-loop im2col, and patches @ W reproduce F.conv2d."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    conv = nn.Conv2d(3, 4, k, stride=stride, padding=pad, dilation=dil).double()
    p_slice = R.im2col(x, k, stride, pad, dil)
    p_loop = R.im2col_loops(x, k, stride, pad, dil)
    torch.testing.assert_close(p_slice, p_loop, rtol=0, atol=0)
    out, _ = R.conv2d_by_im2col(x, conv)
    torch.testing.assert_close(out, conv(x), rtol=1e-12, atol=1e-12)


def test_selfcheck_grouped_conv() -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    out, _ = R.conv2d_by_im2col(x, conv)
    torch.testing.assert_close(out, conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_selfcheck_forward_and_batch_gradient(case: Case) -> None:
    """Reference forward == module forward.

    Reference gradients == autograd of the real modules, and the Kronecker-block gradients rebuilt
    from (g, ā) as (1/n) Σ g āᵀ equal them too.
    """
    model, x, target, loss_fn = make_case(case)
    ref = R.compute_reference(model, x, target, loss_fn)
    out = model(x)
    torch.testing.assert_close(ref.output, out.detach(), rtol=1e-12, atol=1e-12)
    loss = torch_loss(case, out, target)
    torch.testing.assert_close(ref.loss, loss.detach(), rtol=1e-12, atol=1e-14)
    loss.backward()
    modules = dict(model.named_modules())
    for k, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(ref.plain_grads[k], p.grad, rtol=1e-11, atol=1e-14)
    for name, ks in ref.kron.items():
        m = modules[name]
        for local, t in R.split_kron_update(m, ks.grad_mat).items():
            torch.testing.assert_close(t, getattr(m, local).grad, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_selfcheck_per_sample(case: Case) -> None:
    """Without batch coupling, n·dL/ds_i equals the gradient of sample i's own loss.

    Computed one sample at a time; and Σ_i per-sample parameter gradients / n equals the batch
    gradient.
    """
    model, x, target, loss_fn = make_case(case)
    ref = R.compute_reference(model, x, target, loss_fn)
    per_out = R.per_sample_output_grads(model, x, target, loss_fn)
    n = x.shape[0]
    for name, ks in ref.kron.items():
        own = torch.stack(per_out[name])  # (N, d) or (N, C, Ho, Wo)
        if own.dim() == 4:
            own = own.reshape(n, own.shape[1], -1).transpose(1, 2)
        torch.testing.assert_close(ks.g, own, rtol=1e-11, atol=1e-14)
    per_p = R.per_sample_param_grads(model, x, target, loss_fn)
    for k, g in ref.plain_grads.items():
        torch.testing.assert_close(sum(d[k] for d in per_p) / n, g, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_selfcheck_factors_and_preconditioner(case: Case) -> None:
    """A, G from einsum agree with the loops.

    (Ĝ ⊗ Â)⁻¹ vec M == Ĝ⁻¹ M Â⁻¹; and at huge damping Â ≈ π√λ I, Ĝ ≈ √λ/π I so P(∇) ≈ ∇/λ.
    """
    model, x, target, loss_fn = make_case(case)
    ref = R.compute_reference(model, x, target, loss_fn)
    n = x.shape[0]
    for ks in ref.kron.values():
        if ks.abar.dim() == 2:
            A = torch.einsum("ni,nj->ij", ks.abar, ks.abar) / n
            G = torch.einsum("ni,nj->ij", ks.g, ks.g) / n
        else:
            t = ks.abar.shape[1]
            A = torch.einsum("nti,ntj->ij", ks.abar, ks.abar) / n
            G = torch.einsum("nti,ntj->ij", ks.g, ks.g) / (n * t)
        torch.testing.assert_close(ks.A, A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ks.G, G, rtol=1e-12, atol=1e-14)
        for lam in DAMPINGS:
            p1 = R.precondition_kron(ks.A, ks.G, ks.grad_mat, lam)
            p2 = R.precondition_kron_factored(ks.A, ks.G, ks.grad_mat, lam)
            torch.testing.assert_close(p1, p2, rtol=1e-11, atol=1e-13 * float(p2.abs().max()))
        big = 1e12
        p3 = R.precondition_kron(ks.A, ks.G, ks.grad_mat, big)
        torch.testing.assert_close(p3 * big, ks.grad_mat, rtol=1e-4, atol=1e-4 * float(ks.grad_mat.abs().max()))


# --------------------------------------------------------------------------------------------
# spngd_ds against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kron_factors_match_reference(case: Case, damping: float) -> None:
    """opt.blocks[name].A, .G (undamped) and .pi equal rules 2, 3, 5 to 1e-10 relative."""
    model, x, target, loss_fn = make_case(case)
    ref = R.compute_reference(model, x, target, loss_fn)
    opt = R.make_spngd(model, lr=0.5, damping=damping)
    R.spngd_step(opt, model, x, target, loss_fn)
    blocks = opt.blocks
    assert set(ref.kron) <= set(blocks), f"missing blocks: {set(ref.kron) - set(blocks)}"
    for name, ks in ref.kron.items():
        b = blocks[name]
        assert tuple(b.A.shape) == tuple(ks.A.shape), f"{name}.A shape"
        assert tuple(b.G.shape) == tuple(ks.G.shape), f"{name}.G shape"
        assert_rel(b.A, ks.A, what=f"{name}.A")
        assert_rel(b.G, ks.G, what=f"{name}.G")
        pi = R.pi_of(ks.A, ks.G)
        assert float(b.pi) == pytest.approx(pi, rel=RTOL), f"{name}.pi"


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kron_one_step_update(case: Case, damping: float) -> None:
    """Momentum 0, wd 0, first step.

    Every parameter moves by exactly −lr · P(∇) (plain gradient for the grouped conv and the Scale),
    1e-10 relative.
    """
    lr = 0.5
    model, x, target, loss_fn = make_case(case)
    ref = R.compute_reference(model, x, target, loss_fn)
    expected = R.reference_preconditioned(model, ref, damping, bn_damping_scale=1.0)
    opt = R.make_spngd(model, lr=lr, damping=damping)
    res = R.spngd_step(opt, model, x, target, loss_fn)
    for k, g in res.grads.items():  # the loop's gradients are the true-loss gradients
        torch.testing.assert_close(g, ref.plain_grads[k], rtol=1e-11, atol=1e-14)
    for k, d in res.deltas.items():
        assert_rel(d, -lr * expected[k], what=f"Δ{k}")
