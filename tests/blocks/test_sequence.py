"""Sequence layers (docs/design.md rules 10-12) against dense float64 references.

The reference re-executes a small token model with explicit formulas (one-hot embedding, explicit
LayerNorm / RMSNorm, x W + b for HF ``Conv1D``), takes g = n·∂L/∂s of every layer output from one
autograd call, and accumulates the statistics with Python loops over positions (per-position
Jacobians for the norms, one-hot rows for the embedding). Kronecker blocks are preconditioned by a
dense solve with Ĝ ⊗ Â, unit-wise blocks by a solve per feature. Every SPNGD figure (A, G, F, the
inverses, the one-step update) is compared with it, with ``positions_as_samples`` on and off.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spngd_ds
from tests.support import reference as R

RTOL = 1e-9
N, T, V, D, H, C = 3, 4, 7, 5, 6, 4
PAD = 2
LR, DAMPING, BN_SCALE = 0.1, 3e-3, 2.0


class TinyRMSNorm(nn.Module):
    """An RMSNorm as HF writes it (``weight``, ``variance_epsilon``), without the fp32 cast."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.7, 1.3, d))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def conv1d_cls() -> type[nn.Module]:
    tf = pytest.importorskip("transformers.pytorch_utils")
    return tf.Conv1D


class TokenModel(nn.Module):
    """Embedding (padding_idx) -> LayerNorm -> Conv1D (or Linear) -> tanh -> RMSNorm -> Linear head."""

    def __init__(self, hf_conv1d: bool = True, ln_bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, padding_idx=PAD)
        self.ln = nn.LayerNorm(D, bias=ln_bias)
        self.mid: nn.Module = conv1d_cls()(H, D) if hf_conv1d else nn.Linear(D, H)
        self.rms = TinyRMSNorm(H)
        self.head = nn.Linear(H, C)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.3 * torch.randn_like(p))
            self.emb.weight[PAD].zero_()
        self.double()

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.rms(torch.tanh(self.mid(self.ln(self.emb(idx))))))


def mid_weight(model: TokenModel) -> Tensor:
    """The middle layer's weight as (out, in)."""
    w = model.mid.weight
    return w.t() if not isinstance(model.mid, nn.Linear) else w  # type: ignore[operator, return-value]


def data(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (N, T), generator=g)
    idx[0, -1] = PAD
    idx[2, 0] = PAD
    return idx, torch.randint(0, C, (N, T), generator=g)


# ------------------------------------------------------------------------------------ reference
def reference(model: TokenModel, idx: Tensor, y: Tensor, positions: bool) -> dict[str, Any]:
    """Every statistic of the contract and the preconditioned gradient, by explicit formulas."""
    emb, ln, rms, head = model.emb, model.ln, model.rms, model.head
    w_mid, b_mid = mid_weight(model), model.mid.bias
    onehot = F.one_hot(idx, V).to(torch.float64)  # (N, T, V)
    onehot[..., PAD] = 0.0  # padding_idx: no gradient, not counted (its row is zero)
    e = onehot @ emb.weight  # s of the embedding
    mu = e.mean(-1, keepdim=True)
    var = ((e - mu) ** 2).mean(-1, keepdim=True)
    xhat1 = (e - mu) / torch.sqrt(var + ln.eps)
    y1 = xhat1 * ln.weight + (ln.bias if ln.bias is not None else 0.0)
    s2 = y1 @ w_mid.t() + b_mid  # type: ignore[operator]
    h2 = torch.tanh(s2)
    xhat3 = h2 / torch.sqrt((h2**2).mean(-1, keepdim=True) + rms.variance_epsilon)
    y3 = xhat3 * rms.weight
    s4 = y3 @ head.weight.t() + head.bias
    loss = F.cross_entropy(s4.reshape(-1, C), y.reshape(-1))  # token mean
    outs = [e, y1, s2, y3, s4]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, outs + list(params.values()))
    n = N * T if positions else N
    t_rows = 1 if positions else T  # rows of one sample
    g = [n * go.detach() for go in grads[: len(outs)]]
    plain = {k: gp.detach() for k, gp in zip(params, grads[len(outs) :], strict=True)}

    def samples(x: Tensor) -> list[Tensor]:
        """Rows grouped by sample: one position each, or the T positions of a sequence."""
        rows = x.reshape(N * T, -1)
        return [rows[i : i + 1] for i in range(N * T)] if positions else [rows[i * T : (i + 1) * T] for i in range(N)]

    def kron(a_rows: Tensor, g_rows: Tensor) -> tuple[Tensor, Tensor]:
        a_sum = a_rows.new_zeros(a_rows.shape[-1], a_rows.shape[-1])
        g_sum = g_rows.new_zeros(g_rows.shape[-1], g_rows.shape[-1])
        for a_s, g_s in zip(samples(a_rows), samples(g_rows), strict=True):
            for r in range(a_s.shape[0]):
                a_sum += torch.outer(a_s[r], a_s[r])
                g_sum += torch.outer(g_s[r], g_s[r])
        return a_sum / n, g_sum / (n * t_rows)

    def unitwise(xhat: Tensor, gy: Tensor, with_beta: bool) -> Tensor:
        """F (d, k, k) from per-position Jacobians J = ∂y/∂(γ, β) = [diag x̂ | I]."""
        d = xhat.shape[-1]
        k = 2 if with_beta else 1
        full = xhat.new_zeros(k * d, k * d)
        for x_s, g_s in zip(samples(xhat), samples(gy), strict=True):
            u = xhat.new_zeros(k * d)
            for r in range(x_s.shape[0]):
                jac = torch.cat([torch.diag(x_s[r])] + ([torch.eye(d, dtype=xhat.dtype)] if with_beta else []), dim=1)
                u += jac.t() @ g_s[r]
            full += torch.outer(u, u)
        full /= n
        # unit-wise: the (k x k) block of each feature (order γ, β)
        return torch.stack([full[[j + i * d for i in range(k)]][:, [j + i * d for i in range(k)]] for j in range(d)])

    A_e, G_e = kron(onehot, g[0])
    y1_1 = torch.cat([y1, y1.new_ones(N, T, 1)], -1)
    A_m, G_m = kron(y1_1, g[2])
    y3_1 = torch.cat([y3, y3.new_ones(N, T, 1)], -1)
    A_h, G_h = kron(y3_1, g[4])
    F_ln = unitwise(xhat1.detach(), g[1], ln.bias is not None)
    F_rms = unitwise(xhat3.detach(), g[3], False)

    p: dict[str, Tensor] = {}
    pe = R.precondition_kron(A_e, G_e, plain["emb.weight"].t(), DAMPING)  # Linear layout: (D, V)
    p["emb.weight"] = pe.t()
    m_mid = torch.cat([mid_weight_grad(model, plain), plain["mid.bias"][:, None]], 1)
    pm = R.precondition_kron(A_m, G_m, m_mid, DAMPING)
    p["mid.weight"] = pm[:, :D] if isinstance(model.mid, nn.Linear) else pm[:, :D].t()
    p["mid.bias"] = pm[:, D]
    ph = R.precondition_kron(A_h, G_h, torch.cat([plain["head.weight"], plain["head.bias"][:, None]], 1), DAMPING)
    p["head.weight"], p["head.bias"] = ph[:, :H], ph[:, H]
    ln_grad = torch.stack([plain["ln.weight"]] + ([plain["ln.bias"]] if ln.bias is not None else []), -1)
    p_ln = torch.stack(
        [
            torch.linalg.solve(F_ln[j] + BN_SCALE * DAMPING * torch.eye(F_ln.shape[1], dtype=F_ln.dtype), ln_grad[j])
            for j in range(D)
        ]
    )
    p["ln.weight"] = p_ln[:, 0]
    if ln.bias is not None:
        p["ln.bias"] = p_ln[:, 1]
    p["rms.weight"] = plain["rms.weight"] / (F_rms[:, 0, 0] + BN_SCALE * DAMPING)
    return {
        "A_e": A_e,
        "G_e": G_e,
        "A_m": A_m,
        "G_m": G_m,
        "A_h": A_h,
        "G_h": G_h,
        "F_ln": F_ln,
        "F_rms": F_rms,
        "p": p,
        "loss": loss.detach(),
    }


def mid_weight_grad(model: TokenModel, plain: dict[str, Tensor]) -> Tensor:
    gw = plain["mid.weight"]
    return gw if isinstance(model.mid, nn.Linear) else gw.t()


def spngd_step(model: TokenModel, positions: bool, **kw: object) -> tuple[spngd_ds.SPNGD, dict[str, Tensor]]:
    opt = spngd_ds.SPNGD(
        model,
        lr=LR,
        momentum=0.0,
        damping=DAMPING,
        bn_damping_scale=BN_SCALE,
        staleness=None,
        positions_as_samples=positions,
        **kw,
    )
    idx, y = data()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    loss = F.cross_entropy(model(idx).reshape(-1, C), y.reshape(-1))
    loss.backward()
    opt.step()
    return opt, {k: p.detach() - before[k] for k, p in model.named_parameters()}


def max_rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("positions", [True, False])
@pytest.mark.parametrize("ln_bias", [True, False])
def test_token_model_matches_reference(positions: bool, ln_bias: bool) -> None:
    model = TokenModel(ln_bias=ln_bias)
    idx, y = data()
    ref = reference(model, idx, y, positions)
    opt, deltas = spngd_step(model, positions)
    assert not opt.first_order_layers
    blocks = opt.blocks
    stats = {
        "A_e": blocks["emb"].stats["A"].value.view(-1),
        "G_e": blocks["emb"].stats["G"].value,
        "A_m": blocks["mid"].stats["A"].value,
        "G_m": blocks["mid"].stats["G"].value,
        "A_h": blocks["head"].stats["A"].value,
        "G_h": blocks["head"].stats["G"].value,
        "F_ln": blocks["ln"].stats["F"].value,
        "F_rms": blocks["rms"].stats["F"].value,
    }
    expected = dict(ref)
    expected["A_e"] = torch.diagonal(ref["A_e"])
    assert float(ref["A_e"].sum()) < 1.0 if positions else True  # padding left out
    for key, value in stats.items():
        R.assert_rel(value, expected[key], RTOL, key)
    # the damped inverses: dense (Cholesky) for G_e, diagonal for A_e, closed form for the norms
    a_hat, g_hat = R.damped_factors(ref["A_e"], ref["G_e"], DAMPING)
    R.assert_rel(blocks["emb"].stats["A"].inverse.view(-1), 1.0 / torch.diagonal(a_hat), RTOL, "A_e inverse")
    R.assert_rel(blocks["emb"].stats["G"].inverse, torch.linalg.inv(g_hat), RTOL, "G_e inverse")
    worst = 0.0
    for name, p_ref in ref["p"].items():
        R.assert_rel(deltas[name], -LR * p_ref, RTOL, f"step of {name}")
        worst = max(worst, max_rel(deltas[name], -LR * p_ref))
    worst_stat = max(max_rel(v, expected[k]) for k, v in stats.items())
    print(f"positions={positions} ln_bias={ln_bias}: max rel. error statistics {worst_stat:.1e}, steps {worst:.1e}")


def test_conv1d_equals_linear_with_transposed_weight() -> None:
    """The same model with HF Conv1D and with nn.Linear(W^T): identical statistics, inverses and step."""
    conv, lin = TokenModel(hf_conv1d=True), TokenModel(hf_conv1d=False)
    with torch.no_grad():
        for (name, pc), pl in zip(conv.named_parameters(), lin.parameters(), strict=True):
            pl.copy_(pc.t() if name == "mid.weight" else pc)
    opt_c, d_c = spngd_step(conv, True)
    opt_l, d_l = spngd_step(lin, True)
    assert type(opt_c.blocks["mid"]).__name__ == "Conv1DBlock"
    for s in ("A", "G"):
        R.assert_rel(opt_c.blocks["mid"].stats[s].value, opt_l.blocks["mid"].stats[s].value, 1e-10, s)
        R.assert_rel(opt_c.blocks["mid"].stats[s].inverse, opt_l.blocks["mid"].stats[s].inverse, 1e-10, s)
    R.assert_rel(d_c["mid.weight"], d_l["mid.weight"].t(), 1e-10, "Conv1D step")
    for name in d_l:
        if name != "mid.weight":
            R.assert_rel(d_c[name], d_l[name], 1e-10, name)


def test_large_factor_kept_diagonal() -> None:
    """max_factor_dim below the head's G (C) and the embedding's D.

    Those factors are diagonal, the rest dense; the step is the dense reference's with the diagonal
    of those factors.
    """
    model = TokenModel()
    idx, y = data()
    ref = reference(model, idx, y, True)
    opt, deltas = spngd_step(model, True, max_factor_dim=C)
    assert opt.blocks["head"].kind == "kron_diag" and opt.blocks["head"].diagonal == {"A"}  # d_A = H + 1 > C
    assert opt.blocks["emb"].diagonal == {"A", "G"}  # D = 5 > 4
    assert opt.blocks["mid"].diagonal == {"A", "G"}  # D + 1 = 6, H = 6
    assert opt.metrics()["spngd/diagonal_factors"] == 4.0  # emb.G, mid.A, mid.G, head.A
    R.assert_rel(opt.blocks["head"].stats["A"].value.view(-1), torch.diagonal(ref["A_h"]), RTOL, "diag A_h")
    a_h = torch.diag(torch.diagonal(ref["A_h"]))
    m = torch.cat([opt.blocks["head"].params[0].grad, opt.blocks["head"].params[1].grad[:, None]], 1)
    p = R.precondition_kron(a_h, ref["G_h"], m, DAMPING)
    R.assert_rel(deltas["head.weight"], -LR * p[:, :H], RTOL, "head step")
    a_e, g_e = torch.diagonal(ref["A_e"]), torch.diagonal(ref["G_e"])
    p_e = R.precondition_kron(torch.diag(a_e), torch.diag(g_e), model.emb.weight.grad.t(), DAMPING)  # type: ignore[union-attr]
    err = max_rel(deltas["emb.weight"], -LR * p_e.t())  # entries ~1e-8 of the largest: a max-relative bound
    assert err < RTOL, err


# -------------------------------------------------------------------------- sequence-length transfer
def step_norm(t: int, positions: bool, tiled: bool) -> float:
    """‖Δθ‖ of the first SP-NGD step of a token model at sequence length t.

    A Linear-tanh-Linear model, same weights, token-mean cross-entropy with labels from a fixed
    teacher. ``tiled``: the sequence is a length-16 sequence repeated (the same tokens, so the same
    per-token statistics and loss); else i.i.d. positions.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    teacher = torch.randn(8, 5, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    g = torch.Generator().manual_seed(0 if tiled else t)
    x = torch.randn(16, 16 if tiled else t, 8, generator=g, dtype=torch.float64)
    if tiled:
        x = x.repeat(1, t // 16, 1)
    y = (x @ teacher).argmax(-1)
    opt = spngd_ds.SPNGD(model, lr=1.0, momentum=0.0, damping=1e-3, staleness=None, positions_as_samples=positions)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x).reshape(-1, 5), y.reshape(-1)).backward()
    opt.step()
    return math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before, strict=True)))


@pytest.mark.parametrize("tiled", [True, False])
def test_step_size_carries_over_sequence_lengths(tiled: bool) -> None:
    """Tokens as samples.

    The step at T = 64 is the step at T = 16 (ratio ~1); sequences as samples: A ⊗ G shrinks as 1/T,
    so the step grows with T (up to 4x for 64/16, less where damping rules).
    """
    ratio_tokens = step_norm(64, True, tiled) / step_norm(16, True, tiled)
    ratio_seq = step_norm(64, False, tiled) / step_norm(16, False, tiled)
    print(f"tiled={tiled} step(T=64)/step(T=16): positions_as_samples=true {ratio_tokens:.4f}, false {ratio_seq:.3f}")
    if tiled:
        assert abs(ratio_tokens - 1.0) < 1e-9, ratio_tokens
    else:
        assert 0.8 < ratio_tokens < 1.25, ratio_tokens
    assert ratio_seq > 2.0 * ratio_tokens, (ratio_seq, ratio_tokens)


class PositionModel(nn.Module):
    """Token + position embeddings, positions looked up as (1, T) and broadcast (HF's GPT-2, BERT)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(D, C)
        self.double()

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.tok(idx) + self.pos(torch.arange(idx.shape[1])[None])))


@pytest.mark.parametrize("positions", [True, False])
def test_broadcast_position_embedding(positions: bool) -> None:
    """A (1, T) lookup in a forward of N sequences counts N·T samples.

    N sequences: A = counts·N/n, and G from the batch-summed output gradient: (1/(n·T_rows)) Σ_t
    (Σ_i g_it)(Σ_i g_it)ᵀ.
    """
    model, twin = PositionModel(), PositionModel()  # twin: the output gradient, without SP-NGD's hooks
    idx, y = data()
    e_pos: list[Tensor] = []
    twin.pos.register_forward_hook(lambda m, i, out: e_pos.append(out))
    twin_loss = F.cross_entropy(twin(idx).reshape(-1, C), y.reshape(-1))
    (grad_pos,) = torch.autograd.grad(twin_loss, e_pos[0])  # (1, T, D): summed over the N sequences
    opt = spngd_ds.SPNGD(model, lr=LR, momentum=0.0, damping=DAMPING, staleness=None, positions_as_samples=positions)
    F.cross_entropy(model(idx).reshape(-1, C), y.reshape(-1)).backward()
    opt.step()
    n, rows_per_sample = (N * T, 1) if positions else (N, T)
    summed = n * grad_pos[0]  # Σ_i g_it, g = n·∂L/∂s
    g_expected = summed.t() @ summed / (n * rows_per_sample)
    a_expected = torch.full((T,), N / n, dtype=torch.float64)
    block = opt.blocks["pos"]
    R.assert_rel(block.stats["A"].value.view(-1), a_expected, RTOL, "A of the position embedding")
    R.assert_rel(block.stats["G"].value, g_expected, RTOL, "G of the position embedding")
    assert block.stats["G"].refreshes == 1 and block.stats["G"].captures == 1
