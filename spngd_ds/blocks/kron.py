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

import torch
import torch.nn.functional as F
from torch import nn

from spngd_ds.blocks.base import Block, InversionReport, Statistic, robust_inverse
from spngd_ds.staleness import RefreshSchedule


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
        self.d_G = int(module.weight.shape[0])
        self.d_A = int(module.weight[0].numel()) + int(self.has_bias)
        self.stats = {
            "A": Statistic("A", schedule(), (self.d_A, self.d_A)),
            "G": Statistic("G", schedule(), (self.d_G, self.d_G)),
        }
        self.pi = 1.0

    @property
    def A(self) -> torch.Tensor | None:  # noqa: N802 - the paper's name
        """The current A (d_A, d_A), without damping (owner only)."""
        return self.stats["A"].value

    @property
    def G(self) -> torch.Tensor | None:  # noqa: N802
        """The current G (d_G, d_G), without damping (owner only)."""
        return self.stats["G"].value

    # -- statistics ------------------------------------------------------------------------------
    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Rows ā (N·T, d_A) of the layer input ``x`` (N, C_in, H, W) or (N, ..., in_features)."""
        m = self.module
        if self.is_conv:
            assert isinstance(m, nn.Conv2d)
            padding = m.padding if not isinstance(m.padding, str) else 0  # str padding is not supported
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        else:
            rows = x.reshape(-1, x.shape[-1])
        rows = rows.to(self.dtype)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def output_rows(self, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Rows (N·T, d_G) of an output gradient (N, C_out, H, W) or (N, ..., out), and T."""
        if self.is_conv:
            rows = grad.flatten(2).transpose(1, 2).reshape(-1, grad.shape[1])
        else:
            rows = grad.reshape(-1, grad.shape[-1])
        return rows.to(self.dtype), rows.shape[0] // grad.shape[0]

    def capture_forward(
        self, inputs: torch.Tensor, due: set[str]
    ) -> Callable[[torch.Tensor, float], None] | None:
        if "A" in due:
            rows = self.activations(inputs.detach())
            self.stats["A"].add(rows.t() @ rows, inputs.shape[0])
        if "G" not in due:
            return None

        def capture_backward(grad: torch.Tensor, scale: float) -> None:
            n = grad.shape[0]
            rows, t = self.output_rows(grad.detach())
            rows = rows * (n * scale)
            self.stats["G"].add((rows.t() @ rows) / t, n)

        return capture_backward

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
            eye = torch.eye(stat.value.shape[0], dtype=stat.value.dtype, device=stat.value.device)
            stat.inverse = robust_inverse(stat.value + shift[name] * eye)
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
