"""Kronecker-factored blocks for nn.Linear and nn.Conv2d (DESIGN.md rules 2, 3 and 5).

Layout: the gradient of a layer is the matrix M = [∇W.reshape(d_G, -1) | ∇b] of shape (d_G, d_A),
d_G = out_features / C_out, d_A = in_features / C_in·kh·kw, plus one when the layer has a bias.
Activations are im2col patches in ``F.unfold`` order (c_in slowest, then kh, kw).

Statistics (n samples, T output locations per sample, g = n·∂L/∂s the per-sample output gradient):
A = (1/n) Σ_i Σ_t ā ā^T,  G = (1/(n T)) Σ_i Σ_t g g^T.
Damping: π = sqrt((tr A/d_A)/(tr G/d_G)), Â = A + π√λ I, Ĝ = G + √λ/π I, P(M) = Ĝ⁻¹ M Â⁻¹.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from spngd_ds.blocks.base import Block, InversionReport, Statistic, robust_inverse
from spngd_ds.blocks.shapes import full_shape
from spngd_ds.staleness import RefreshSchedule, wishart_rho

#: Conv2d layers with fewer im2col columns than this gather their patches as rows (N·T, d) from a
#: channels-last copy; wider ones as columns (d, N·T). Chosen by timing both on ResNet-20/50 shapes.
_ROWS_LAYOUT_MAX_D = 256

#: Conv2d layers with stride 1 along the height take the row-shift Gram (:func:`shift_gram`)
#: instead: about a third of the products of the im2col Gram, and a copy of kw (not kh·kw) times
#: the input. Tests switch it off to reach the two im2col layouts.
_SHIFT_LAYOUT = True


def symmetric_gram(cols: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``cols @ cols.T`` for a wide ``cols`` (d, K), computing only the blocks on and above the
    diagonal (row blocks of at least ``block``; at most 8 of them) and mirroring the rest: about
    (b + 1)/(2b) of the products for b blocks."""
    d = cols.shape[0]
    nb = max(1, min(8, d // block))
    if nb == 1:
        return cols @ cols.t()
    cuts = [round(i * d / nb) for i in range(nb + 1)]
    out = cols.new_empty(d, d)
    for i in range(nb):
        rows_i = cols[cuts[i] : cuts[i + 1]]
        for j in range(i, nb):
            prod = rows_i @ cols[cuts[j] : cuts[j + 1]].t()
            out[cuts[i] : cuts[i + 1], cuts[j] : cuts[j + 1]] = prod
            if j != i:
                out[cuts[j] : cuts[j + 1], cuts[i] : cuts[i + 1]] = prod.t()
    return out


@lru_cache(maxsize=512)
def _window_corrections(
    n: int, hp: int, ph: int, h: int, kh: int, dh: int
) -> tuple[tuple[int, int, tuple[int, ...], tuple[int, ...]], ...]:
    """For :func:`shift_gram`: per kernel-row pair (i, j), i <= j, the slab pairs (s, s + δ),
    δ = (j - i)·dh, that the flat shifted product counts but the window of kernel row i does not,
    restricted to pairs of two real (not padding) rows; slabs are numbered image·hp + row."""
    ho = hp - dh * (kh - 1)
    out = []
    for i in range(kh):
        for j in range(i, kh):
            delta = (j - i) * dh
            first: list[int] = []
            second: list[int] = []
            for r in range(hp):
                if i * dh <= r < i * dh + ho or not ph <= r < ph + h:
                    continue
                partner = r + delta  # slab img·hp + partner: row partner - hp of the next image
                if not ph <= (partner if partner < hp else partner - hp) < ph + h:
                    continue
                images = range(n) if partner < hp else range(n - 1)
                first.extend(img * hp + r for img in images)
                second.extend(img * hp + partner for img in images)
            out.append((i, j, tuple(first), tuple(second)))
    return tuple(out)


def _padded_channels_last(x: torch.Tensor, ph: int, pw: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (N, C, H, W) as a contiguous (N, H + 2ph, W + 2pw, C) copy in ``dtype``, zero-padded
    (only the border is zeroed: the interior is written once, by the copy)."""
    n, c, h, w = x.shape
    xp = x.new_empty((n, h + 2 * ph, w + 2 * pw, c), dtype=dtype)
    if ph:
        xp[:, :ph].zero_()
        xp[:, ph + h :].zero_()
    if pw:
        xp[:, ph : ph + h, :pw].zero_()
        xp[:, ph : ph + h, pw + w :].zero_()
    xp[:, ph : ph + h, pw : pw + w] = x.permute(0, 2, 3, 1)
    return xp


def shift_gram(xp: torch.Tensor, kh: int, kw: int, sw: int, dh: int, dw: int, ph: int, h: int,
               bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gram (d, d) of the im2col patches of a stride-1-in-height convolution, in ``F.unfold``
    order (c, kh, kw), d = C·kh·kw, and their sum (d,) when ``bias``; exact (no approximation).

    ``xp`` (N, Hp, Wp, C) is the input zero-padded in both dims, channels last; ``h`` the unpadded
    height and ``ph`` its top padding. B (N·Hp·Wo, kw·C) unfolds only the width: slab (n, r) holds
    the kw·C columns of every output column at padded row r. The patch rows of kernel row i are
    the slabs r = ho + i·dh, ho in [0, Ho), so block (i, j) of the Gram is Σ B_{ho+i·dh}ᵀ B_{ho+j·dh}:
    the product of B with itself shifted by δ = (j - i)·dh slabs (one GEMM per δ, shared by every
    pair with that δ), less the few slab pairs outside the window of row i in which both rows are
    real (:func:`_window_corrections`; padding rows are zero and add nothing).
    """
    n, hp, wp, c = xp.shape
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    ho = hp - dh * (kh - 1)
    q = kw * c
    s = xp.stride()
    b = xp.as_strided((n, hp, wo, kw, c), (s[0], s[1], s[2] * sw, s[2] * dw, s[3])).reshape(n * hp * wo, q)
    rows = b.shape[0]
    shifted = [b[: rows - delta * wo].t() @ b[delta * wo :] for delta in range(0, dh * (kh - 1) + 1, dh)]
    slabs = b.view(n * hp, wo, q)
    # blocks are (kw, c) x (kw, c); each is written straight into its place in (c, kh, kw) order
    out = b.new_empty(c, kh, kw, c, kh, kw)
    for i, j, first, second in _window_corrections(n, hp, ph, h, kh, dh):
        blk = shifted[j - i]
        if first:
            lhs = slabs[torch.tensor(first, device=b.device)].reshape(-1, q)
            rhs = slabs[torch.tensor(second, device=b.device)].reshape(-1, q)
            blk = blk - lhs.t() @ rhs
        out[:, i, :, :, j, :] = blk.view(kw, c, kw, c).permute(1, 0, 3, 2)
        if j != i:
            out[:, j, :, :, i, :] = blk.view(kw, c, kw, c).permute(3, 2, 1, 0)
    colsum = None
    if bias:
        per_row = slabs.view(n, hp, wo, kw, c).sum(dim=(0, 2))  # (Hp, kw, C)
        colsum = torch.stack([per_row[i * dh : i * dh + ho].sum(0) for i in range(kh)], dim=1)  # (kw, kh, C)
        colsum = colsum.permute(2, 1, 0).reshape(c * kh * kw)
    return out.view(c * kh * kw, c * kh * kw), colsum


def conv_supported(module: nn.Module) -> bool:
    """Conv2d with groups=1, zero padding given as numbers (rule 3); others fall back to first order."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def compute_pi(a: torch.Tensor, g: torch.Tensor) -> float:
    """π of rule 5; 1.0 when either trace is not a positive finite number."""
    ta = float(torch.trace(a)) / a.shape[0]
    tg = float(torch.trace(g)) / g.shape[0]
    if not (math.isfinite(ta) and math.isfinite(tg)) or ta <= 0.0 or tg <= 0.0:
        return 1.0
    return math.sqrt(ta / tg)


class KronBlock(Block):
    """K-FAC block of one nn.Linear or nn.Conv2d (weight and bias as one block [W | b])."""

    kind = "kron"

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d, schedule: Callable[[], RefreshSchedule]):
        params = list(module.parameters(recurse=False))  # [weight, bias] in registration order
        super().__init__(name, module, params)
        self.is_conv = isinstance(module, nn.Conv2d)
        self.has_bias = module.bias is not None
        #: A from at most this many samples of a micro-batch (SPNGD's ``a_samples``); None: all
        self.a_samples: int | None = None
        shape = full_shape(module.weight)  # (d_G, C_in, kh, kw) or (d_G, in); zero.Init-safe
        self.d_G = int(shape[0])
        self.d_A = int(shape[1:].numel()) + int(self.has_bias)
        self.stats = {
            "A": Statistic("A", schedule(), (self.d_A, self.d_A)),
            "G": Statistic("G", schedule(), (self.d_G, self.d_G)),
        }
        self.pi = 1.0
        # rows per sample (conv: output locations T) of the last capture: the noise floor's ρ
        self.vectors_per_sample: dict[str, float] = {"A": 1.0, "G": 1.0}

    @property
    def A(self) -> torch.Tensor | None:  # noqa: N802 - the paper's name
        """The current A (d_A, d_A), without damping (owner only)."""
        return self.stats["A"].value

    @property
    def G(self) -> torch.Tensor | None:  # noqa: N802
        """The current G (d_G, d_G), without damping (owner only)."""
        return self.stats["G"].value

    # -- statistics ------------------------------------------------------------------------------
    def activation_gram(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Σ ā āᵀ (d_A, d_A) over the rows ā of the layer input ``x`` (N, C_in, H, W) or
        (N, ..., in_features), and the number of samples N.

        Conv2d: im2col patches gathered by one strided copy (no ``F.unfold`` and no transpose copy
        after it), in the layout whose Gram product is fastest; the bias row and column are the
        patch sum and the number of rows (no column of ones).
        """
        if self.is_conv:
            if x.dim() == 3:  # an unbatched (C, H, W) input is one sample
                x = x.unsqueeze(0)
            gram, colsum, rows = self._conv_gram(x)
        else:
            flat = x.reshape(-1, x.shape[-1]).to(self.dtype)
            gram = flat.t() @ flat
            colsum = flat.sum(0) if self.has_bias else None
            rows = flat.shape[0]
        n = int(x.shape[0]) if x.dim() > 1 else 1
        self.vectors_per_sample["A"] = rows / max(n, 1)
        if not self.has_bias:
            return gram, n
        d = gram.shape[0]
        out = gram.new_empty(d + 1, d + 1)
        out[:d, :d] = gram
        assert colsum is not None
        out[:d, d] = colsum
        out[d, :d] = colsum
        out[d, d] = float(rows)
        return out, n

    def _conv_gram(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Gram of the im2col patches of ``x`` (N, C, H, W) in ``F.unfold`` order (c_in, kh, kw),
        their sum (when the layer has a bias) and their number N·T."""
        m = self.module
        assert isinstance(m, nn.Conv2d) and not isinstance(m.padding, str)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
        n, c, h, w = x.shape
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        d = c * kh * kw
        colsum: torch.Tensor | None = None
        if _SHIFT_LAYOUT and sh == 1 and kh > 1 and ho >= dh * (kh - 1):
            xp = _padded_channels_last(x, ph, pw, self.dtype)
            gram, colsum = shift_gram(xp, kh, kw, sw, dh, dw, ph, h, self.has_bias)
        elif d < _ROWS_LAYOUT_MAX_D:
            # rows (N·Ho·Wo, kh·kw·C) from a zero-padded channels-last copy: the gather reads
            # contiguous channel vectors, and the tall-skinny product R^T R is fastest for small d
            xp = _padded_channels_last(x, ph, pw, self.dtype)
            s = xp.stride()
            patches = xp.as_strided((n, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]))
            rows = patches.reshape(n * ho * wo, d)
            gram = rows.t() @ rows  # order (kh, kw, c): permute to (c, kh, kw)
            gram = gram.view(kh, kw, c, kh, kw, c).permute(2, 0, 1, 5, 3, 4).reshape(d, d)
            if self.has_bias:
                colsum = rows.sum(0).view(kh, kw, c).permute(2, 0, 1).reshape(d)
        else:
            # columns (C·kh·kw, N·Ho·Wo) in unfold order straight from the padded NCHW input
            xp = x.to(self.dtype)
            if ph or pw:
                xp = F.pad(xp, (pw, pw, ph, ph))
            s = xp.stride()
            patches = xp.as_strided(
                (c, kh, kw, n, ho, wo), (s[1], s[2] * dh, s[3] * dw, s[0], s[2] * sh, s[3] * sw), xp.storage_offset()
            )
            cols = patches.reshape(d, n * ho * wo)
            gram = symmetric_gram(cols)
            if self.has_bias:
                colsum = cols.sum(1)
        return gram, colsum, n * ho * wo

    def output_gram(self, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Σ g gᵀ (d_G, d_G) over the rows of an output gradient (N, C_out, H, W) or
        (N, ..., out), unscaled, and T (rows per sample)."""
        if self.is_conv:
            if grad.dim() == 3:
                grad = grad.unsqueeze(0)
            per_sample = grad.flatten(2).to(self.dtype)  # (N, C_out, T): no transpose copy
            c, t = per_sample.shape[1], per_sample.shape[2]
            if t >= c:  # per-sample Grams (C x C each) cost no more to write than their inputs
                return torch.bmm(per_sample, per_sample.transpose(1, 2)).sum(0), t
            cols = per_sample.transpose(0, 1).reshape(c, -1)  # wide and few locations: one product
            return cols @ cols.t(), t
        rows = grad.reshape(-1, grad.shape[-1]).to(self.dtype)
        n = grad.shape[0] if grad.dim() > 1 else 1
        return rows.t() @ rows, rows.shape[0] // n

    def capture_forward(
        self, inputs: torch.Tensor, due: set[str]
    ) -> Callable[[torch.Tensor, float], None] | None:
        if "A" in due:
            x = inputs.detach()
            batched = x.dim() > (3 if self.is_conv else 1)  # an unbatched input is one sample
            if self.a_samples is not None and batched and x.shape[0] > self.a_samples:
                x = x[: self.a_samples]
            gram, n = self.activation_gram(x)
            self.stats["A"].add(gram, n, fresh=True)
        if "G" not in due:
            return None

        def capture_backward(grad: torch.Tensor, scale: float) -> None:
            n = grad.shape[0] if grad.dim() > 1 else 1
            gram, t = self.output_gram(grad.detach())
            self.vectors_per_sample["G"] = t
            # g = n·scale·grad: scale the (small) Gram instead of the rows
            self.stats["G"].add(gram.mul_((n * scale) ** 2 / t), n, fresh=True)

        return capture_backward

    def normalise(self, name: str, total: torch.Tensor, count: float) -> torch.Tensor:
        value = super().normalise(name, total, count)
        # the staleness rule's noise floor (staleness.py): ρ of this value and its sample count
        self.stats[name].schedule.note_value(wishart_rho(value, self.vectors_per_sample[name]), count)
        return value

    # -- inversion and preconditioning -----------------------------------------------------------
    def invert(self, damping: float, refreshed: set[str]) -> InversionReport:
        report = InversionReport()
        a, g = self.stats["A"].value, self.stats["G"].value
        if a is None or g is None:
            return report
        self.pi = compute_pi(a, g)
        root = math.sqrt(damping)
        shift = {"A": self.pi * root, "G": root / self.pi}
        for name in ("A", "G"):
            stat = self.stats[name]
            if name not in refreshed and stat.inverse is not None:
                continue
            assert stat.value is not None
            damped = stat.value.clone()
            damped.diagonal().add_(shift[name])  # X + shift·I without an identity matrix
            stat.inverse = robust_inverse(damped)
            stat.inversions += 1
            (report.inverted if stat.inverse is not None else report.failed).append(name)
        return report

    def grad_matrix(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """M = [∇W.reshape(d_G, -1) | ∇b], shape (d_G, d_A), in the statistics dtype."""
        cols = [grads[0].reshape(self.d_G, -1).to(self.dtype)]
        if self.has_bias:
            cols.append(grads[1].reshape(self.d_G, 1).to(self.dtype))
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def precondition(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        a_inv, g_inv = self.stats["A"].inverse, self.stats["G"].inverse
        if a_inv is None or g_inv is None:
            return grads
        p = g_inv @ self.grad_matrix(grads) @ a_inv
        out = [p[:, : p.shape[1] - int(self.has_bias)].reshape(grads[0].shape).to(grads[0].dtype)]
        if self.has_bias:
            out.append(p[:, -1].reshape(grads[1].shape).to(grads[1].dtype))
        return out

    def inversion_cost(self) -> float:
        return float(self.d_A**3 + self.d_G**3)

    def memory_cost(self) -> float:
        return float(self.d_A**2 + self.d_G**2)
