"""Unit-wise natural gradient for LayerNorm and RMSNorm (docs/design.md rules 10 and 11).

Per feature d and sample (every position when ``positions_as_samples``, else every sequence with
its positions summed), with x̂ the layer's normalised input and g_y = n·∂L/∂y the per-sample
gradient of the output: u = (x̂·g_y, g_y) for (γ, β), u = x̂·g_y for γ alone (RMSNorm, or a
LayerNorm without bias). F_d = (1/n) Σ u uᵀ, (D, 2, 2) or (D, 1, 1); the preconditioned gradient
is (F_d + λ_bn I)⁻¹ ∇_d with λ_bn = ``bn_damping_scale``·λ, inverted in closed form.

Covered: ``nn.LayerNorm`` (x̂ = (x − mean)/sqrt(var + eps) over ``normalized_shape``),
``nn.RMSNorm`` and any module whose class name ends with ``RMSNorm`` and has a ``weight``
(x̂ = x/sqrt(mean(x²) + eps) over the last dims the weight spans; eps from ``eps`` or
``variance_epsilon``), as HF's ``LlamaRMSNorm`` computes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from spngd_ds.blocks.base import Block, Statistic
from spngd_ds.blocks.shapes import full_shape
from spngd_ds.blocks.unitwise import UnitwiseBlock
from spngd_ds.staleness import RefreshSchedule


def is_rms_norm(module: nn.Module) -> bool:
    """``nn.RMSNorm`` or a class named ``*RMSNorm`` with a ``weight`` parameter (HF's norms)."""
    return isinstance(module, nn.RMSNorm) or (
        type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)
    )


def norm_supported(module: nn.Module) -> bool:
    """An affine LayerNorm or an RMSNorm with a weight (rule 11)."""
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine and module.weight is not None
    return is_rms_norm(module) and getattr(module, "weight", None) is not None


def inverse_1x1(f: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """1/(f + shift) for f (D, 1, 1); returns (inverses (D, 1, 1), ok mask (D,)); 1 where not ok."""
    a = f[:, 0, 0] + shift
    ok = torch.isfinite(a) & (a > 0)
    inv = torch.where(ok, 1.0 / torch.where(ok, a, torch.ones_like(a)), torch.ones_like(a))
    return inv.view(-1, 1, 1), ok


class NormBlock(UnitwiseBlock):
    """Unit-wise Fisher block of one LayerNorm/RMSNorm: parameters (γ, β) or γ alone."""

    kind = "norm"

    def __init__(
        self,
        name: str,
        module: nn.Module,
        schedule: Callable[[], RefreshSchedule],
        damping_scale: float,
        positions_as_samples: bool = True,
    ):
        """The block of a LayerNorm / RMSNorm ``module``'s weight (and bias)."""
        weight = module.weight
        bias = getattr(module, "bias", None)
        assert isinstance(weight, nn.Parameter)
        params = [weight] + ([bias] if isinstance(bias, nn.Parameter) else [])
        Block.__init__(self, name, module, params)
        self.rms = not isinstance(module, nn.LayerNorm)
        self.feature_shape = tuple(int(d) for d in full_shape(weight))
        self.channels = int(torch.Size(self.feature_shape).numel())
        self.k = len(params)  # 2: (γ, β); 1: γ alone
        self.damping_scale = damping_scale
        self.positions_as_samples = positions_as_samples
        self.stats = {"F": Statistic("F", schedule(), (self.channels, self.k, self.k))}
        self.failed_channels = 0

    def eps(self, dtype: torch.dtype) -> float:
        """The layer's eps (``eps`` or HF's ``variance_epsilon``; torch's default when ``None``)."""
        eps = getattr(self.module, "eps", None)
        if eps is None:
            eps = getattr(self.module, "variance_epsilon", None)
        return float(torch.finfo(dtype).eps) if eps is None else float(eps)

    def normalised_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ of an input ``x`` (..., *feature_shape) as rows (P, D) in the statistics dtype."""
        rows = x.detach().to(self.dtype).reshape(-1, self.channels)
        eps = self.eps(x.dtype)
        if self.rms:
            return rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps)
        var, mean = torch.var_mean(rows, dim=-1, correction=0, keepdim=True)
        return (rows - mean) * torch.rsqrt(var + eps)

    def samples_in(self, x: torch.Tensor) -> int:
        """Samples in an input or output gradient: every position (rule 10), or the leading dim."""
        if x.dim() <= len(self.feature_shape):
            return 1
        return x.numel() // max(self.channels, 1) if self.positions_as_samples else int(x.shape[0])

    def capture_forward(self, inputs: torch.Tensor, due: set[str]) -> Callable[[torch.Tensor, float], None] | None:
        """Keep the input when F is due; the backward capture forms F from x̂ and the output gradient."""
        if "F" not in due:
            return None
        x = inputs.detach()  # x̂ is formed in the backward, from the input autograd keeps anyway

        def capture_backward(grad: torch.Tensor, scale: float) -> None:
            xhat = self.normalised_rows(x)
            g = grad.detach().to(self.dtype).reshape(-1, self.channels)
            n = self.samples_in(grad)
            parts = [xhat * g] + ([g] if self.k == 2 else [])
            u = torch.stack(parts, dim=-1)  # (P, D, k)
            if n != u.shape[0]:  # sequences as samples: sum each sample's positions
                u = u.view(n, -1, self.channels, self.k).sum(1)
            u.mul_(n * scale)  # g_y = n·scale·grad
            self.stats["F"].add(torch.einsum("pci,pcj->cij", u, u), n, fresh=True)

        return capture_backward

    def closed_form_inverse(self, value: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(F + shift·I)⁻¹ per unit: 2x2 with a bias, elementwise (D, 1, 1) without one; and ok (D,)."""
        return super().closed_form_inverse(value, shift) if self.k == 2 else inverse_1x1(value, shift)

    def precondition(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """F̂⁻¹ applied per unit to the stacked (weight, bias) gradients, in their shapes and dtypes."""
        inv = self.stats["F"].inverse
        if inv is None:
            return grads
        g = torch.stack([t.reshape(-1).to(self.dtype) for t in grads], dim=-1)  # (D, k)
        p = torch.einsum("cij,cj->ci", inv, g)
        return [p[:, i].reshape(t.shape).to(t.dtype) for i, t in enumerate(grads)]
