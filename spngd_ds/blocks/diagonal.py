"""Kronecker factors kept diagonal (docs/design.md rules 5 and 12).

A diagonal factor is stored as a stack of 1×1 blocks, shape (d, 1, 1), so that it travels, packs
and is counted like any other statistic. Its damped inverse is 1/(x + shift) per entry, also
(d, 1, 1). π (rule 5) uses the traces of the kept factors, dense or diagonal alike.

:class:`DiagonalKronBlock` is the Linear / HF Conv1D block whose factor of a dimension above
``max_factor_dim`` is kept diagonal (a Llama-shaped ``lm_head``: G is V × V): its memory is then
d instead of d² elements, and its inversion d instead of d³ operations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from spngd_ds.blocks.base import Statistic
from spngd_ds.blocks.kron import Conv1DBlock, KronBlock
from spngd_ds.staleness import RefreshSchedule


def is_diagonal(value: torch.Tensor) -> bool:
    """Whether a factor is stored as its diagonal, (d, 1, 1)."""
    return value.dim() == 3


def apply_left(inverse: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``inverse @ m`` for a dense (d, d) or diagonal (d, 1, 1) inverse and m (d, k)."""
    return m * inverse.view(-1, 1) if is_diagonal(inverse) else inverse @ m


def apply_right(m: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``m @ inverse`` for m (k, d) and a dense (d, d) or diagonal (d, 1, 1) inverse."""
    return m * inverse.view(1, -1) if is_diagonal(inverse) else m @ inverse


class DiagonalKronBlock(KronBlock):
    """A Linear (or HF Conv1D) block whose large factors are kept diagonal.

    A Linear (or, as :class:`DiagonalConv1DBlock`, HF Conv1D) block whose factors of a dimension
    above ``max_dim`` are kept diagonal: A's diagonal Σ ā², G's Σ g² (same normalisation as the
    dense factors).
    """

    kind = "kron_diag"

    def __init__(self, name: str, module: nn.Module, schedule: Callable[[], RefreshSchedule], max_dim: int):
        """A Kronecker block whose factors of a dimension above ``max_dim`` are diagonal."""
        super().__init__(name, module, schedule)  # type: ignore[arg-type]
        assert not self.is_conv, "Conv2d factors are not kept diagonal"
        dims = {"A": self.d_A, "G": self.d_G}
        #: the factors kept diagonal
        self.diagonal = {n for n, d in dims.items() if d > max_dim}
        for n in self.diagonal:
            self.stats[n] = Statistic(n, self.stats[n].schedule, (dims[n], 1, 1))

    def activation_gram(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Diagonal Σ ā² as (d_A, 1, 1) when A is diagonal (else the dense Gram), and N."""
        if "A" not in self.diagonal:
            return super().activation_gram(x)
        flat = x.reshape(-1, x.shape[-1]).to(self.dtype)
        diag = flat.pow(2).sum(0)
        if self.has_bias:
            diag = torch.cat([diag, diag.new_full((1,), float(flat.shape[0]))])
        n = self.samples_in(x)
        self.vectors_per_sample["A"] = flat.shape[0] / max(n, 1)
        return diag.view(-1, 1, 1), n

    def output_gram(self, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Diagonal Σ g² as (d_G, 1, 1) when G is diagonal (else the dense Gram), and T."""
        if "G" not in self.diagonal:
            return super().output_gram(grad)
        rows = grad.reshape(-1, grad.shape[-1]).to(self.dtype)
        return rows.pow(2).sum(0).view(-1, 1, 1), rows.shape[0] // self.samples_in(grad)

    def precondition(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Ĝ⁻¹ M Â⁻¹ with dense or diagonal inverses, in the parameters' shapes and dtypes."""
        a_inv, g_inv = self.stats["A"].inverse, self.stats["G"].inverse
        if a_inv is None or g_inv is None:
            return grads
        return self.split_update(apply_right(apply_left(g_inv, self.grad_matrix(grads)), a_inv), grads)

    def inversion_cost(self) -> float:
        """Sum of d³ over dense factors and d over diagonal ones."""
        return float(sum(d if n in self.diagonal else d**3 for n, d in (("A", self.d_A), ("G", self.d_G))))

    def memory_cost(self) -> float:
        """Sum of d² over dense factors and d over diagonal ones (elements held)."""
        return float(sum(d if n in self.diagonal else d**2 for n, d in (("A", self.d_A), ("G", self.d_G))))


class DiagonalConv1DBlock(DiagonalKronBlock, Conv1DBlock):
    """:class:`DiagonalKronBlock` of an HF Conv1D (weight (in, out))."""
