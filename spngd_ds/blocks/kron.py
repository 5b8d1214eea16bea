"""Kronecker-factored blocks for nn.Linear and nn.Conv2d (docs/design.md rules 2, 3 and 5).

Layout: the gradient of a layer is the matrix M = [∇W.reshape(d_G, -1) | ∇b] of shape (d_G, d_A),
d_G = out_features / C_out, d_A = in_features / C_in·kh·kw, plus one when the layer has a bias.
Activations are im2col patches in ``F.unfold`` order (c_in slowest, then kh, kw).

Statistics (n samples, T output locations per sample, g = n·∂L/∂s the per-sample output gradient):
A = (1/n) Σ_i Σ_t ā ā^T,  G = (1/(n T)) Σ_i Σ_t g g^T.
A Linear over (N, T, in) inputs with ``positions_as_samples`` (rule 10) counts every position as a
sample: n = N·T, T = 1. HF ``Conv1D`` (weight (in, out), y = x W + b) is a Linear with W transposed.
Damping: π = sqrt((tr A/d_A)/(tr G/d_G)), Â = A + π√λ I, Ĝ = G + √λ/π I, P(M) = Ĝ⁻¹ M Â⁻¹.
π is recomputed when both factors are re-inverted; a factor re-inverted alone (the other one stale,
rule 6) reuses the π of its partner's inverse, so that the shifts' product stays λ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from spngd_ds.blocks.base import Block, InversionJob, InversionReport, Statistic
from spngd_ds.blocks.conv_gram import patch_gram
from spngd_ds.blocks.shapes import full_shape
from spngd_ds.staleness import RefreshSchedule


def conv_supported(module: nn.Module) -> bool:
    """Conv2d with groups=1, zero padding given as numbers (rule 3); others fall back to first order."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _trace(value: torch.Tensor) -> torch.Tensor:
    """The trace of a dense (d, d) factor or of one kept diagonal as (d, 1, 1)."""
    return value.sum() if value.dim() == 3 else torch.trace(value)


def pi_tensor(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """π of rule 5 as a float64 0-d tensor on a's device (no host synchronisation).

    ``a`` and ``g`` dense (d, d) or kept diagonal (d, 1, 1). π = sqrt((tr A / d_A) / (tr G / d_G));
    1 when either mean trace is not a positive finite number.
    """
    ta = _trace(a).to(torch.float64) / a.shape[0]
    tg = _trace(g).to(torch.float64).to(ta.device) / g.shape[0]
    valid = torch.isfinite(ta) & torch.isfinite(tg) & (ta > 0.0) & (tg > 0.0)
    return torch.where(valid, torch.sqrt(ta / torch.where(valid, tg, 1.0)), 1.0)


class PairedFactors(Protocol):
    """A block with Kronecker factors "A" and "G" (dense or diagonal) and the π of their inverses."""

    stats: dict[str, Statistic]
    pi: float


def pair_inversion_job(block: PairedFactors, damping: float, refreshed: set[str]) -> InversionJob | None:
    """Rule 5 on ``block``'s factors "A" and "G" (dense or diagonal), as one batched job.

    Each refreshed (or never inverted) factor is re-inverted with its shift: a dense one in the
    step's batched Cholesky (:func:`~spngd_ds.blocks.base.run_inversions`), a diagonal one here, as
    1/(x + shift) with its success flag read back with the step's other figures. π follows the
    traces when both are re-inverted; a factor re-inverted alone keeps the π its partner's inverse
    was built with, so that the shifts' product stays λ. ``block.pi`` receives the π used.
    """
    a, g = block.stats["A"].value, block.stats["G"].value
    if a is None or g is None:
        return None
    due = [n for n in ("A", "G") if n in refreshed or block.stats[n].inverse is None]
    if len(due) == 2:
        pi = pi_tensor(a, g)
    else:
        pi = torch.full((), block.pi, dtype=torch.float64, device=a.device)  # a fill, no host copy
    root = math.sqrt(damping)
    shift = {"A": pi * root, "G": root / pi}
    dense: list[tuple[str, torch.Tensor]] = []
    diagonal: dict[str, torch.Tensor] = {}
    flags: list[torch.Tensor] = []
    for name in due:
        value = block.stats[name].value
        assert value is not None
        if value.dim() == 3:  # kept diagonal (d, 1, 1): 1/(x + shift), flagged
            d = value + shift[name].to(device=value.device, dtype=value.dtype)
            diagonal[name] = 1.0 / d
            flags.append((torch.isfinite(d) & (d > 0)).all())
        else:
            damped = value.clone()
            damped.diagonal().add_(shift[name].to(device=damped.device))  # X + shift·I without an identity
            dense.append((name, damped))

    def finish(inverses: dict[str, torch.Tensor | None], scalars: list[float]) -> InversionReport:
        block.pi = scalars[0]
        ok = dict(zip(diagonal, scalars[1:], strict=True))
        inverses = inverses | {n: inv if ok[n] > 0 else None for n, inv in diagonal.items()}
        report = InversionReport()
        for name in due:
            stat = block.stats[name]
            stat.inverse = inverses[name]
            stat.inversions += 1
            (report.inverted if stat.inverse is not None else report.failed).append(name)
        return report

    return InversionJob(dense, [pi, *flags], finish)


class KronBlock(Block):
    """K-FAC block of one nn.Linear or nn.Conv2d (weight and bias as one block [W | b])."""

    kind = "kron"

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d, schedule: Callable[[], RefreshSchedule]):
        """The block of ``module``'s weight and bias; ``schedule`` makes each factor's refresh schedule."""
        params = list(module.parameters(recurse=False))  # [weight, bias] in registration order
        super().__init__(name, module, params)
        self.is_conv = isinstance(module, nn.Conv2d)
        self.has_bias = module.bias is not None
        #: A from at most this many samples of a micro-batch (SPNGD's ``a_samples``); None: all
        self.a_samples: int | None = None
        #: rule 10: every position of a (N, T, ..., in) input is a sample (Conv2d: ignored)
        self.positions_as_samples = True
        self.d_G, d_in = self.weight_dims(module)
        self.d_A = d_in + int(self.has_bias)
        self.stats = {
            "A": Statistic("A", schedule(), (self.d_A, self.d_A)),
            "G": Statistic("G", schedule(), (self.d_G, self.d_G)),
        }
        self.pi = 1.0
        # rows per sample (conv: output locations T) of the last capture: the noise floor's ρ
        self.vectors_per_sample: dict[str, float] = {"A": 1.0, "G": 1.0}

    @staticmethod
    def weight_dims(module: nn.Module) -> tuple[int, int]:
        """(d_G, inputs per output) of the weight: (out, in) or (C_out, C_in·kh·kw); zero.Init-safe."""
        shape = full_shape(module.weight)  # type: ignore[arg-type]
        return int(shape[0]), int(shape[1:].numel())

    def samples_in(self, t: torch.Tensor) -> int:
        """Samples in a layer input or output gradient ``t``.

        Its leading dim, 1 when unbatched; every position of a Linear's (N, T, ..., d) input when
        ``positions_as_samples``.
        """
        if t.dim() <= (3 if self.is_conv else 1):
            return 1
        if self.positions_as_samples and not self.is_conv:
            return t.numel() // max(int(t.shape[-1]), 1)
        return int(t.shape[0])

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
        """Σ ā āᵀ (d_A, d_A) over the rows ā of the layer input ``x``, and the sample count.

        ``x`` is (N, C_in, H, W) or (N, ..., in_features); the count is the number of samples N.

        Conv2d: the im2col Gram without forming the patches where the stride is 1, else from one
        strided copy (:func:`spngd_ds.blocks.conv_gram.patch_gram`); the bias row and column are
        the patch sum and the number of rows (no column of ones).
        """
        if self.is_conv:
            if x.dim() == 3:  # an unbatched (C, H, W) input is one sample
                x = x.unsqueeze(0)
            assert isinstance(self.module, nn.Conv2d)
            gram, colsum, rows = patch_gram(self.module, x, self.dtype, self.has_bias)
        else:
            flat = x.reshape(-1, x.shape[-1]).to(self.dtype)
            gram = flat.t() @ flat
            colsum = flat.sum(0) if self.has_bias else None
            rows = flat.shape[0]
        n = self.samples_in(x)
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

    def output_gram(self, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Σ g gᵀ (d_G, d_G) over the rows of an output gradient, and the rows per sample.

        The gradient is (N, C_out, H, W) or (N, ..., out), unscaled; the count is T, the rows per
        sample.
        """
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
        return rows.t() @ rows, rows.shape[0] // self.samples_in(grad)

    def capture_forward(self, inputs: torch.Tensor, due: set[str]) -> Callable[[torch.Tensor, float], None] | None:
        """Capture A from ``inputs`` when due; return G's capture when due."""
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
            n = self.samples_in(grad)
            gram, t = self.output_gram(grad.detach())
            self.vectors_per_sample["G"] = t
            # g = n·scale·grad: scale the (small) Gram instead of the rows
            self.stats["G"].add(gram.mul_((n * scale) ** 2 / t), n, fresh=True)

        return capture_backward

    def normalise(self, name: str, total: torch.Tensor, count: float) -> torch.Tensor:
        """Mean over ``count`` samples; notes ρ and the count for the staleness rule."""
        value = super().normalise(name, total, count)
        # the staleness rule's noise floor (staleness.py): ρ of this value and its sample count
        self.stats[name].schedule.note_value_figures(value, self.vectors_per_sample[name], count)
        return value

    # -- inversion and preconditioning -----------------------------------------------------------
    def inversion_job(self, damping: float, refreshed: set[str]) -> InversionJob | None:
        """Rule 5 on the factors due in ``refreshed`` (or without an inverse yet), or ``None``."""
        return pair_inversion_job(self, damping, refreshed)

    def grad_matrix(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """M = [∇W.reshape(d_G, -1) | ∇b], shape (d_G, d_A), in the statistics dtype."""
        cols = [grads[0].reshape(self.d_G, -1).to(self.dtype)]
        if self.has_bias:
            cols.append(grads[1].reshape(self.d_G, 1).to(self.dtype))
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def split_update(self, p: torch.Tensor, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The inverse of :meth:`grad_matrix`.

        P (d_G, d_A) back into the shapes and dtypes of ``grads`` (weight, then bias).
        """
        d_in = self.d_A - int(self.has_bias)
        out = [self.weight_from_matrix(p[:, :d_in]).reshape(grads[0].shape).to(grads[0].dtype)]
        if self.has_bias:
            out.append(p[:, -1].reshape(grads[1].shape).to(grads[1].dtype))
        return out

    def weight_from_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """The weight's layout of the (d_G, d_in) part of P (a view): the identity here."""
        return w

    def precondition(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Ĝ⁻¹ M Â⁻¹ split back into the weight and bias shapes and dtypes."""
        a_inv, g_inv = self.stats["A"].inverse, self.stats["G"].inverse
        if a_inv is None or g_inv is None:
            return grads
        return self.split_update(g_inv @ self.grad_matrix(grads) @ a_inv, grads)

    def inversion_cost(self) -> float:
        """d_A³ + d_G³."""
        return float(self.d_A**3 + self.d_G**3)

    def memory_cost(self) -> float:
        """d_A² + d_G² (elements of the two factors)."""
        return float(self.d_A**2 + self.d_G**2)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is HF transformers' ``pytorch_utils.Conv1D``.

    HF transformers' ``pytorch_utils.Conv1D`` (weight (in, out), y = x W + b), told by its class
    name and its ``nf`` (out) attribute, without importing transformers.
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and len(full_shape(weight)) == 2
        and int(full_shape(weight)[1]) == int(getattr(module, "nf", -1))
    )


class Conv1DBlock(KronBlock):
    """K-FAC block of one HF ``Conv1D``: the Linear block of the transposed weight (in, out)."""

    @staticmethod
    def weight_dims(module: nn.Module) -> tuple[int, int]:
        """(d_in, d_out) of the Conv1D weight (in, out)."""
        shape = full_shape(module.weight)  # type: ignore[arg-type]
        return int(shape[1]), int(shape[0])

    def grad_matrix(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """M (d_G, d_A) from the Conv1D weight gradient (in, out) and the bias gradient (out,)."""
        d_in = self.d_A - int(self.has_bias)
        cols = [grads[0].reshape(d_in, self.d_G).t().to(self.dtype)]
        if self.has_bias:
            cols.append(grads[1].reshape(self.d_G, 1).to(self.dtype))
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def weight_from_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """The (in, out) weight of the (out, in) part of P."""
        return w.t()
