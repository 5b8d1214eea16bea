"""Dense float64 reference for the SP-NGD contract (docs/design.md section 2).

Everything here is written independently of ``spngd_ds``: no hooks, no ``F.unfold``, no shared
helpers. The model is re-executed by an explicit functional forward (:func:`reference_forward`)
that keeps every pre-activation tensor in the autograd graph, so that the contract's output
gradients ``g_i = n * dL/ds_i`` come straight from ``torch.autograd.grad`` of the batch loss.
Statistics are then accumulated with explicit Python loops over samples (and output locations),
the damped Kronecker factor ``Ĝ ⊗ Â`` is built with ``torch.kron`` and the preconditioned gradient
is obtained with ``torch.linalg.solve`` on that dense matrix.

Supported modules (possibly nested in ``nn.Sequential``): ``nn.Linear``, ``nn.Conv2d`` (zero
padding, any groups; only ``groups == 1`` is a curvature block), ``nn.BatchNorm1d`` on ``(N, C)``,
``nn.BatchNorm2d`` (training mode, affine), ``nn.ReLU``, ``nn.Tanh``, ``nn.Flatten`` and
:class:`Scale` (a parameter that no curvature block covers).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    import spngd_ds

IntOrPair = int | tuple[int, ...]
"""A conv hyper-parameter as nn.Conv2d stores it (a pair) or as a plain int."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""Maps ``(output, target)`` to the vector of per-sample losses, shape ``(n,)``."""


# --------------------------------------------------------------------------------------------
# Losses (per sample; the batch loss is their mean)
# --------------------------------------------------------------------------------------------


def ce_per_sample(out: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of each sample, written out explicitly (log-sum-exp minus the true logit)."""
    return torch.logsumexp(out, dim=1) - out.gather(1, target.view(-1, 1)).squeeze(1)


def mse_per_sample(out: Tensor, target: Tensor) -> Tensor:
    """``0.5 * ||out_i - target_i||^2`` summed over the output dimensions of each sample."""
    return 0.5 * (out - target).pow(2).reshape(out.shape[0], -1).sum(dim=1)


# --------------------------------------------------------------------------------------------
# A module whose parameter no curvature block covers
# --------------------------------------------------------------------------------------------


class Scale(nn.Module):
    """Per-channel learnable scale ``y = x * scale`` (broadcast over dim 1).

    Not Linear, Conv2d nor BatchNorm, so SP-NGD must give its parameter the plain gradient.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.scale.view(shape)


# --------------------------------------------------------------------------------------------
# im2col by padding + slicing (no F.unfold)
# --------------------------------------------------------------------------------------------


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    assert len(v) == 2
    return (int(v[0]), int(v[1]))


def conv_output_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Number of output positions along one spatial axis."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def im2col(
    x: Tensor,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> Tensor:
    """Patches of ``x`` (N, C, H, W) as a tensor of shape ``(N, T, C * kh * kw)``.

    ``T = H_out * W_out`` with ``t = h_out * W_out + w_out``; each patch is flattened in the order
    ``(c_in, kh, kw)`` with ``c_in`` slowest, i.e. the order of ``weight.reshape(C_out, -1)``.
    Built by zero-padding ``x`` and taking one strided slice per kernel offset.
    """
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, c, h, w = x.shape
    ho = conv_output_size(h, kh, sh, ph, dh)
    wo = conv_output_size(w, kw, sw, pw, dw)
    xp = x.new_zeros(n, c, h + 2 * ph, w + 2 * pw)
    xp[:, :, ph : ph + h, pw : pw + w] = x
    cols = x.new_empty(n, c, kh, kw, ho, wo)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dh, j * dw
            cols[:, :, i, j] = xp[:, :, r0 : r0 + sh * (ho - 1) + 1 : sh, c0 : c0 + sw * (wo - 1) + 1 : sw]
    return cols.reshape(n, c * kh * kw, ho * wo).transpose(1, 2)


def im2col_loops(
    x: Tensor,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
) -> Tensor:
    """Same as :func:`im2col` with one scalar read per element (a second, slower reference)."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, c, h, w = x.shape
    ho = conv_output_size(h, kh, sh, ph, dh)
    wo = conv_output_size(w, kw, sw, pw, dw)
    out = x.new_zeros(n, ho * wo, c * kh * kw)
    for b in range(n):
        for oh in range(ho):
            for ow in range(wo):
                t = oh * wo + ow
                for ci in range(c):
                    for i in range(kh):
                        for j in range(kw):
                            r = oh * sh - ph + i * dh
                            q = ow * sw - pw + j * dw
                            if 0 <= r < h and 0 <= q < w:
                                out[b, t, (ci * kh + i) * kw + j] = x[b, ci, r, q]
    return out


def conv2d_by_im2col(x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """Explicit convolution; returns ``(output (N, C_out, Ho, Wo), patches (N, T, C_in/g*kh*kw))``.

    For ``groups > 1`` the patches returned are those of the whole input (all channels); they
    are only used for ``groups == 1`` layers.
    """
    assert conv.padding_mode == "zeros", "reference supports zero padding only"
    assert not isinstance(conv.padding, str), "reference supports numeric padding only"
    kh, kw = _pair(conv.kernel_size)
    n, _, h, w = x.shape
    ho = conv_output_size(h, kh, conv.stride[0], conv.padding[0], conv.dilation[0])
    wo = conv_output_size(w, kw, conv.stride[1], conv.padding[1], conv.dilation[1])
    g = conv.groups
    cin_g = conv.in_channels // g
    cout_g = conv.out_channels // g
    outs = []
    patches_all = None
    for gi in range(g):
        xg = x[:, gi * cin_g : (gi + 1) * cin_g]
        patches = im2col(xg, conv.kernel_size, conv.stride, conv.padding, conv.dilation)  # (N,T,K)
        wmat = conv.weight[gi * cout_g : (gi + 1) * cout_g].reshape(cout_g, -1)
        s = patches @ wmat.T  # (N, T, cout_g)
        outs.append(s)
        if g == 1:
            patches_all = patches
    s = torch.cat(outs, dim=2)
    if conv.bias is not None:
        s = s + conv.bias
    out = s.transpose(1, 2).reshape(n, conv.out_channels, ho, wo)
    if patches_all is None:
        patches_all = im2col(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    return out, patches_all


# --------------------------------------------------------------------------------------------
# Explicit functional forward that records every layer
# --------------------------------------------------------------------------------------------


@dataclass
class LayerRecord:
    """What the reference forward records for one parametrised layer."""

    name: str
    module: nn.Module
    inp: Tensor
    """Layer input (Linear: (N, d_in); Conv2d: patches (N, T, K); BN: normalised input x̂)."""
    out: Tensor
    """Layer output, in the graph: Linear (N, d_out), Conv2d (N, C_out, Ho, Wo), BN y."""


def iter_leaves(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Leaf modules of (nested) ``nn.Sequential`` in execution order, with qualified names."""
    if isinstance(model, nn.Sequential):
        for child_name, child in model.named_children():
            yield from iter_leaves(child, f"{prefix}.{child_name}" if prefix else child_name)
    else:
        yield prefix, model


def _bn_forward(x: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Training-mode batch norm from batch statistics (biased variance); returns ``(y, x̂)``."""
    assert bn.affine and bn.weight is not None and bn.bias is not None
    assert bn.training, "reference implements training-mode batch norm"
    if x.dim() == 2:
        dims: tuple[int, ...] = (0,)
        shape = [1, -1]
    elif x.dim() == 4:
        dims = (0, 2, 3)
        shape = [1, -1, 1, 1]
    else:
        raise NotImplementedError("BatchNorm input must be (N, C) or (N, C, H, W)")
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    xhat = (x - mean) / torch.sqrt(var + bn.eps)
    y = xhat * bn.weight.view(shape) + bn.bias.view(shape)
    return y, xhat


def reference_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, list[LayerRecord]]:
    """Run ``model`` with explicit formulas; return the output and one record per parametrised layer.

    Does not call the modules' ``forward`` (and so does not touch BN running statistics or any
    hook an optimizer may have installed).
    """
    records: list[LayerRecord] = []
    h = x
    for name, m in iter_leaves(model):
        if isinstance(m, nn.Linear):
            s = h @ m.weight.T
            if m.bias is not None:
                s = s + m.bias
            records.append(LayerRecord(name, m, h, s))
            h = s
        elif isinstance(m, nn.Conv2d):
            s, patches = conv2d_by_im2col(h, m)
            records.append(LayerRecord(name, m, patches, s))
            h = s
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            y, xhat = _bn_forward(h, m)
            records.append(LayerRecord(name, m, xhat, y))
            h = y
        elif isinstance(m, nn.ReLU):
            h = torch.where(h > 0, h, torch.zeros_like(h))
        elif isinstance(m, nn.Tanh):
            h = torch.tanh(h)
        elif isinstance(m, nn.Flatten):
            assert m.start_dim == 1 and m.end_dim == -1
            h = h.reshape(h.shape[0], -1)
        elif isinstance(m, Scale):
            h = m.forward(h)  # .forward: bypass any hook an optimizer may have installed
        else:
            raise NotImplementedError(f"reference does not support {type(m).__name__} ({name})")
    return h, records


# --------------------------------------------------------------------------------------------
# Contract statistics
# --------------------------------------------------------------------------------------------


def is_kron_layer(m: nn.Module) -> bool:
    """Layers that carry a Kronecker block under the contract (rules 2 and 3)."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def is_bn_layer(m: nn.Module) -> bool:
    """Layers that carry a unit-wise block under the contract (rule 4)."""
    return isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)


@dataclass
class KronStats:
    """Rule 2/3 quantities of one Linear or Conv2d layer."""

    A: Tensor
    G: Tensor
    grad_mat: Tensor
    """``[∇W.reshape(C_out, -1) | ∇b]`` rebuilt as ``(1/n) Σ_i Σ_t g ā^T``."""
    abar: Tensor
    """(N, d_A) for Linear, (N, T, d_A) for Conv2d."""
    g: Tensor
    """(N, d_G) for Linear, (N, T, d_G) for Conv2d."""


@dataclass
class BNStats:
    """Rule 4 quantities of one BatchNorm layer."""

    F: Tensor
    """(C, 2, 2), index order (gamma, beta)."""
    grad: Tensor
    """(C, 2): (∇γ_c, ∇β_c) rebuilt as ``(1/n) Σ_i u_i``."""
    u: Tensor
    """(N, C, 2)."""


@dataclass
class Reference:
    """Everything the reference derives from one batch."""

    loss: Tensor
    output: Tensor
    kron: dict[str, KronStats] = field(default_factory=dict)
    bn: dict[str, BNStats] = field(default_factory=dict)
    plain_grads: dict[str, Tensor] = field(default_factory=dict)
    """Autograd gradient (of the reference forward) of every parameter, by qualified name."""


def _kron_stats(rec: LayerRecord, gout: Tensor, n: int) -> KronStats:
    m = rec.module
    has_bias = getattr(m, "bias", None) is not None
    if isinstance(m, nn.Linear):
        a = rec.inp.detach()
        abar = torch.cat([a, a.new_ones(n, 1)], dim=1) if has_bias else a.clone()
        g = gout
        d_a, d_g = abar.shape[1], g.shape[1]
        A = abar.new_zeros(d_a, d_a)
        G = abar.new_zeros(d_g, d_g)
        grad_mat = abar.new_zeros(d_g, d_a)
        for i in range(n):
            A += torch.outer(abar[i], abar[i])
            G += torch.outer(g[i], g[i])
            grad_mat += torch.outer(g[i], abar[i])
        return KronStats(A / n, G / n, grad_mat / n, abar, g)
    assert isinstance(m, nn.Conv2d) and m.groups == 1
    patches = rec.inp.detach()  # (N, T, K)
    t_count = patches.shape[1]
    abar = torch.cat([patches, patches.new_ones(n, t_count, 1)], dim=2) if has_bias else patches.clone()
    g = gout.reshape(n, m.out_channels, t_count).transpose(1, 2)  # (N, T, C_out)
    d_a, d_g = abar.shape[2], g.shape[2]
    A = abar.new_zeros(d_a, d_a)
    G = abar.new_zeros(d_g, d_g)
    grad_mat = abar.new_zeros(d_g, d_a)
    for i in range(n):
        for t in range(t_count):
            A += torch.outer(abar[i, t], abar[i, t])
            G += torch.outer(g[i, t], g[i, t])
            grad_mat += torch.outer(g[i, t], abar[i, t])
    return KronStats(A / n, G / (n * t_count), grad_mat / n, abar, g)


def _bn_stats(rec: LayerRecord, gout: Tensor, n: int) -> BNStats:
    xhat = rec.inp.detach()
    c = xhat.shape[1]
    u = xhat.new_zeros(n, c, 2)
    for i in range(n):
        for ch in range(c):
            u[i, ch, 0] = (xhat[i, ch] * gout[i, ch]).sum()
            u[i, ch, 1] = gout[i, ch].sum()
    Fm = xhat.new_zeros(c, 2, 2)
    for i in range(n):
        for ch in range(c):
            Fm[ch] += torch.outer(u[i, ch], u[i, ch])
    return BNStats(Fm / n, u.sum(dim=0) / n, u)


def compute_reference(model: nn.Module, x: Tensor, target: Tensor, loss_fn: LossFn) -> Reference:
    """All contract statistics for the batch ``(x, target)`` with ``L = mean_i loss_fn(out, target)_i``.

    ``g = n * dL/ds`` is taken from one autograd call on the batch loss of the explicit forward,
    which is the contract's definition also when BatchNorm couples the samples.
    """
    n = x.shape[0]
    out, records = reference_forward(model, x)
    loss = loss_fn(out, target).mean()
    params = dict(model.named_parameters())
    names = list(params)
    grads = torch.autograd.grad(loss, [r.out for r in records] + [params[k] for k in names], allow_unused=True)
    gouts = grads[: len(records)]
    pgrads = grads[len(records) :]
    ref = Reference(loss.detach(), out.detach())
    for k, gp in zip(names, pgrads, strict=True):
        ref.plain_grads[k] = torch.zeros_like(params[k]) if gp is None else gp.detach()
    for rec, go in zip(records, gouts, strict=True):
        assert go is not None
        gout = n * go.detach()
        if is_kron_layer(rec.module):
            ref.kron[rec.name] = _kron_stats(rec, gout, n)
        elif is_bn_layer(rec.module):
            ref.bn[rec.name] = _bn_stats(rec, gout, n)
    return ref


# --------------------------------------------------------------------------------------------
# Damping and preconditioning (rule 5, rule 4)
# --------------------------------------------------------------------------------------------


def pi_of(A: Tensor, G: Tensor) -> float:
    """Rule 5: ``π = sqrt((tr A / dim A) / (tr G / dim G))``."""
    return math.sqrt((float(torch.trace(A)) / A.shape[0]) / (float(torch.trace(G)) / G.shape[0]))


def damped_factors(A: Tensor, G: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Rule 5: ``(Â, Ĝ) = (A + π√λ I, G + √λ/π I)``."""
    pi = pi_of(A, G)
    sq = math.sqrt(damping)
    eye_a = torch.eye(A.shape[0], dtype=A.dtype)
    eye_g = torch.eye(G.shape[0], dtype=G.dtype)
    return A + pi * sq * eye_a, G + (sq / pi) * eye_g


def precondition_kron(A: Tensor, G: Tensor, grad_mat: Tensor, damping: float) -> Tensor:
    """``Ĝ⁻¹ M Â⁻¹`` via one dense solve with ``Ĝ ⊗ Â`` (row-major vec: vec(Ĝ X Â) = (Ĝ ⊗ Â) vec X)."""
    A_hat, G_hat = damped_factors(A, G, damping)
    big = torch.kron(G_hat, A_hat)
    sol = torch.linalg.solve(big, grad_mat.reshape(-1))
    return sol.reshape(grad_mat.shape)


def precondition_kron_factored(A: Tensor, G: Tensor, grad_mat: Tensor, damping: float) -> Tensor:
    """``Ĝ⁻¹ M Â⁻¹`` with explicit inverses (used to cross-check :func:`precondition_kron`)."""
    A_hat, G_hat = damped_factors(A, G, damping)
    return torch.linalg.inv(G_hat) @ grad_mat @ torch.linalg.inv(A_hat)


def precondition_bn(Fm: Tensor, grad: Tensor, damping_bn: float) -> Tensor:
    """Rule 4: ``(F_c + λ_bn I)⁻¹ (∇γ_c, ∇β_c)`` for every channel; returns (C, 2)."""
    eye = torch.eye(2, dtype=Fm.dtype)
    out = torch.empty_like(grad)
    for c in range(Fm.shape[0]):
        out[c] = torch.linalg.solve(Fm[c] + damping_bn * eye, grad[c])
    return out


def split_kron_update(m: nn.Module, pmat: Tensor) -> dict[str, Tensor]:
    """Preconditioned ``[W | b]`` matrix back to parameter shapes, keyed by local parameter name."""
    weight = m.weight
    assert isinstance(weight, Tensor)
    bias = getattr(m, "bias", None)
    d_w = weight[0].numel()
    out = {"weight": pmat[:, :d_w].reshape(weight.shape)}
    if bias is not None:
        out["bias"] = pmat[:, d_w]
    return out


def reference_preconditioned(
    model: nn.Module, ref: Reference, damping: float, bn_damping_scale: float
) -> dict[str, Tensor]:
    """``P(∇)`` of every parameter (plain gradient where no block covers it), by qualified name."""
    out: dict[str, Tensor] = dict(ref.plain_grads)
    modules = dict(model.named_modules())
    for name, ks in ref.kron.items():
        pmat = precondition_kron(ks.A, ks.G, ks.grad_mat, damping)
        for local, t in split_kron_update(modules[name], pmat).items():
            out[f"{name}.{local}"] = t
    for name, bs in ref.bn.items():
        p = precondition_bn(bs.F, bs.grad, bn_damping_scale * damping)
        out[f"{name}.weight"] = p[:, 0].clone()
        out[f"{name}.bias"] = p[:, 1].clone()
    return out


# --------------------------------------------------------------------------------------------
# Per-sample checks and exact Fisher for the MC tests
# --------------------------------------------------------------------------------------------


def per_sample_output_grads(model: nn.Module, x: Tensor, target: Tensor, loss_fn: LossFn) -> dict[str, list[Tensor]]:
    """For each sample separately: gradient of its own loss w.r.t. each recorded layer output.

    Only meaningful for models without batch-coupling layers (no BatchNorm in train mode).
    """
    out: dict[str, list[Tensor]] = {}
    for i in range(x.shape[0]):
        o, recs = reference_forward(model, x[i : i + 1])
        li = loss_fn(o, target[i : i + 1]).sum()
        gs = torch.autograd.grad(li, [r.out for r in recs])
        for r, g in zip(recs, gs, strict=True):
            out.setdefault(r.name, []).append(g[0].detach())
    return out


def per_sample_param_grads(model: nn.Module, x: Tensor, target: Tensor, loss_fn: LossFn) -> list[dict[str, Tensor]]:
    """Per-sample parameter gradients of each sample's own loss, computed one sample at a time."""
    params = dict(model.named_parameters())
    res = []
    for i in range(x.shape[0]):
        o, _ = reference_forward(model, x[i : i + 1])
        li = loss_fn(o, target[i : i + 1]).sum()
        gs = torch.autograd.grad(li, list(params.values()), allow_unused=True)
        res.append({k: (torch.zeros_like(p) if g is None else g) for (k, p), g in zip(params.items(), gs, strict=True)})
    return res


def softmax_probs(model: nn.Module, x: Tensor) -> Tensor:
    """Predictive distribution ``softmax(model(x))`` from the reference forward, (N, C)."""
    with torch.no_grad():
        out, _ = reference_forward(model, x)
    return F.softmax(out, dim=1)


def exact_fisher_by_label_enumeration(
    model: nn.Module, x: Tensor, probs: Tensor
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Exact ``E_{ŷ ~ p}[G(ŷ)]`` and ``E[F(ŷ)]`` by summing over every joint label vector.

    ``ŷ_j ~ Categorical(probs_j)`` independently; ``G(ŷ)`` and ``F(ŷ)`` are the contract's
    statistics when the loss uses the labels ``ŷ``. Exact also with BatchNorm (which couples the
    samples' output gradients). Cost: ``C ** n`` reference evaluations; keep ``n`` and ``C`` small.
    """
    n, c = probs.shape
    g_acc: dict[str, Tensor] = {}
    f_acc: dict[str, Tensor] = {}
    for labels in itertools.product(range(c), repeat=n):
        y = torch.tensor(labels)
        w = float(torch.prod(probs[torch.arange(n), y]))
        ref = compute_reference(model, x, y, ce_per_sample)
        for k, ks in ref.kron.items():
            g_acc[k] = g_acc.get(k, torch.zeros_like(ks.G)) + w * ks.G
        for k, bs in ref.bn.items():
            f_acc[k] = f_acc.get(k, torch.zeros_like(bs.F)) + w * bs.F
    return g_acc, f_acc


def exact_fisher_per_class(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    """Exact MC-expected G of a Linear ``layer``, by one backward per (sample, class).

    Exact ``(1/n) Σ_i Σ_y p(y|x_i) g_i(y) g_i(y)^T`` for a Linear ``layer`` of a model without batch
    coupling, by one backward per (sample, class) on that sample's own loss.
    """
    probs = softmax_probs(model, x)
    n, c = probs.shape
    acc: Tensor | None = None
    for i in range(n):
        for y in range(c):
            o, recs = reference_forward(model, x[i : i + 1])
            rec = next(r for r in recs if r.name == layer)
            li = ce_per_sample(o, torch.tensor([y])).sum()
            (g,) = torch.autograd.grad(li, [rec.out])
            term = float(probs[i, y]) * torch.outer(g[0], g[0])
            acc = term if acc is None else acc + term
    assert acc is not None
    return acc / n


def exact_last_layer_fisher(logits: Tensor) -> Tensor:
    """Closed form ``(1/n) Σ_i (diag p_i − p_i p_i^T)`` for the logits layer."""
    p = F.softmax(logits, dim=1)
    acc = torch.zeros(p.shape[1], p.shape[1], dtype=p.dtype)
    for i in range(p.shape[0]):
        acc += torch.diag(p[i]) - torch.outer(p[i], p[i])
    return acc / p.shape[0]


# --------------------------------------------------------------------------------------------
# Driving the optimizer under test (imported lazily: the reference works without it)
# --------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """One SPNGD step on a batch: the optimizer, the parameter moves and the autograd gradients."""

    opt: object
    deltas: dict[str, Tensor]
    grads: dict[str, Tensor]


def make_spngd(
    model: nn.Module,
    *,
    lr: float,
    damping: float,
    bn_damping_scale: float = 1.0,
    fisher: str = "empirical",
) -> spngd_ds.SPNGD:
    """The optimizer with the contract's test settings (no momentum, decay, rescale, staleness, step bound)."""
    import spngd_ds

    return spngd_ds.SPNGD(
        model,
        lr=lr,
        momentum=0.0,
        damping=damping,
        weight_decay=0.0,
        fisher=fisher,
        bn_damping_scale=bn_damping_scale,
        weight_rescale=False,
        staleness=None,
        step_bound=None,  # the paper's update (rule 13's bound off)
    )


def spngd_step(opt: object, model: nn.Module, x: Tensor, target: Tensor, loss_fn: LossFn) -> StepResult:
    """The user loop of the contract: zero_grad, mean loss, backward, step."""
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt.zero_grad()  # type: ignore[attr-defined]
    out = model(x)
    loss = loss_fn(out, target).mean()
    loss.backward()
    grads = {
        k: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()) for k, p in model.named_parameters()
    }
    opt.step()  # type: ignore[attr-defined]
    deltas = {k: p.detach() - before[k] for k, p in model.named_parameters()}
    return StepResult(opt, deltas, grads)


def assert_rel(actual: Tensor, expected: Tensor, rtol: float = 1e-10, what: str = "") -> None:
    """``assert_close`` with ``rtol`` and an ``atol`` of ``rtol * 1e-2 * max|expected|``."""
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected,
        rtol=rtol,
        atol=rtol * 1e-2 * max(scale, 1e-300),
        msg=lambda m: f"{what}: {m}",
    )
