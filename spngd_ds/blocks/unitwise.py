"""Unit-wise natural gradient for BatchNorm (docs/design.md rule 4).

Per channel c and sample i, with x̂ the batch-normalised input and g_y = n·∂L/∂y the per-sample
gradient of the BN output: u_i = (Σ_hw x̂·g_y, Σ_hw g_y), F_c = (1/n) Σ_i u_i u_iᵀ (2×2, order
(γ, β)). The preconditioned gradient of channel c is (F_c + λ_bn I)⁻¹ (∇γ_c, ∇β_c), inverted in
closed form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from spngd_ds.blocks.base import Block, InversionJob, InversionReport, Statistic
from spngd_ds.blocks.shapes import full_shape
from spngd_ds.staleness import RefreshSchedule


def channel_moments(
    module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A BatchNorm's training-mode input as rows (N·C, L), with its batch mean and rstd (C,).

    The input of a BatchNorm in training mode as rows (N·C, L) in ``dtype`` (L: locations per
    sample, 1 for (N, C) inputs), and the batch's per-channel mean μ (C,) and 1/sqrt(σ² + eps) (C,)
    with the biased σ² over all dims but 1, so that x̂ = (x - μ)·rstd.

    x̂ itself is never formed, nor x - μ: the per-sample sums Σ x and Σ x² are dot products along
    each row, and only their (C,)-sized totals are combined, in float64: σ² = E[x²] - μ² then
    carries a relative error of about u·(1 + μ²/σ²), u the unit roundoff of ``dtype`` (6e-8 for
    float32). The two-pass form this replaces wrote a centred copy of the input and held it until
    the backward; the backward now forms Σ x̂ g per sample the same way, from the rows.
    """
    x = x.detach().to(dtype)
    n, c = x.shape[0], x.shape[1]
    rows = x.reshape(n * c, -1)
    count = n * rows.shape[1]
    sums = rows.sum(-1).view(n, c).sum(0, dtype=torch.float64)
    squares = torch.linalg.vecdot(rows, rows).view(n, c).sum(0, dtype=torch.float64)
    mean = sums / count
    var = (squares / count - mean * mean).clamp_min(0.0)
    return rows, mean.to(dtype), torch.rsqrt(var + module.eps).to(dtype)


def inverse_2x2(f: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form inverses of ``f + shift·I`` for f (C, 2, 2); returns (inverses, ok mask (C,))."""
    a = f[:, 0, 0] + shift
    b = f[:, 0, 1]
    d = f[:, 1, 1] + shift
    det = a * d - b * b
    ok = torch.isfinite(det) & (det > 0) & (a > 0) & torch.isfinite(a) & torch.isfinite(d)
    safe = torch.where(ok, det, torch.ones_like(det))
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-b, a], -1)], -2) / safe[:, None, None]
    eye = torch.eye(2, dtype=f.dtype, device=f.device).expand_as(inv)
    return torch.where(ok[:, None, None], inv, eye), ok


class UnitwiseBlock(Block):
    """Unit-wise Fisher block of one affine BatchNorm1d/2d: parameters (γ, β)."""

    kind = "unitwise"

    def __init__(
        self,
        name: str,
        module: nn.modules.batchnorm._BatchNorm,
        schedule: Callable[[], RefreshSchedule],
        damping_scale: float,
    ):
        """The block of a BatchNorm ``module``'s weight and bias (C,)."""
        assert module.weight is not None and module.bias is not None
        super().__init__(name, module, [module.weight, module.bias])
        self.channels = int(full_shape(module.weight)[0])
        self.damping_scale = damping_scale
        self.stats = {"F": Statistic("F", schedule(), (self.channels, 2, 2))}
        self.failed_channels = 0

    @property
    def F(self) -> torch.Tensor | None:  # noqa: N802 - the paper's name
        """The current per-channel Fisher (C, 2, 2), order (γ, β), without damping (owner only)."""
        return self.stats["F"].value

    def capture_forward(self, inputs: torch.Tensor, due: set[str]) -> Callable[[torch.Tensor, float], None] | None:
        """Capture the channel moments when F is due; return the backward capture of F."""
        if "F" not in due:
            return None
        assert isinstance(self.module, nn.modules.batchnorm._BatchNorm)
        rows, mean, rstd = channel_moments(self.module, inputs, self.dtype)

        def capture_backward(grad: torch.Tensor, scale: float) -> None:
            n, c = grad.shape[0], grad.shape[1]
            g = grad.detach().to(self.dtype).reshape(n * c, -1)
            u_beta = g.sum(-1).view(n, c)
            # Σ x̂ g = rstd·(Σ x g - μ Σ g) per sample and channel
            u_gamma = (torch.linalg.vecdot(rows, g).view(n, c) - mean * u_beta) * rstd
            # g_y = n·scale·grad: scale the per-sample sums (N, C), not the maps
            u = torch.stack([u_gamma, u_beta], dim=-1).mul_(n * scale)  # (N, C, 2)
            self.stats["F"].add(torch.einsum("nci,ncj->cij", u, u), n, fresh=True)

        return capture_backward

    def normalise(self, name: str, total: torch.Tensor, count: float) -> torch.Tensor:
        """Mean over ``count`` samples; notes ρ for the staleness rule."""
        value = super().normalise(name, total, count)
        # the staleness rule's noise floor (staleness.py): u is one vector per sample and channel
        self.stats[name].schedule.note_value_figures(value, 1.0, count)
        return value

    def inversion_job(self, damping: float, refreshed: set[str]) -> InversionJob | None:
        """The closed-form 2x2 inversion of F when due (nothing to batch), or ``None``."""
        stat = self.stats["F"]
        if stat.value is None or ("F" not in refreshed and stat.inverse is not None):
            return None
        inv, ok = self.closed_form_inverse(stat.value, self.damping_scale * damping)  # nothing to batch

        def finish(inverses: dict[str, torch.Tensor | None], scalars: list[float]) -> InversionReport:
            report = InversionReport()
            stat.inversions += 1
            self.failed_channels = int(scalars[0])
            if self.failed_channels:
                report.failed.append("F")
            stat.inverse = inv
            report.inverted.append("F")
            return report

        return InversionJob([], [(~ok).sum()], finish)

    def closed_form_inverse(self, value: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(F + shift·I)⁻¹ per unit, (C, 2, 2), and ok (C,): finite and positive definite."""
        return inverse_2x2(value, shift)

    def precondition(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """F̂⁻¹ (C, 2, 2) applied to the stacked (weight, bias) gradients (C, 2)."""
        inv = self.stats["F"].inverse
        if inv is None:
            return grads
        g = torch.stack([grads[0].to(self.dtype), grads[1].to(self.dtype)], dim=-1)  # (C, 2)
        p = torch.einsum("cij,cj->ci", inv, g)
        return [p[:, 0].to(grads[0].dtype), p[:, 1].to(grads[1].dtype)]

    def inversion_cost(self) -> float:
        """8 per channel (2x2 closed form)."""
        return float(8 * self.channels)

    def memory_cost(self) -> float:
        """8 per channel (F and its inverse, 2x2 each)."""
        return float(8 * self.channels)
