"""The dense im2col reference of a convolution's activation Gram.

``F.unfold`` patches, a column of ones for the bias, and the plain product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unfold_gram(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Σ over samples and output locations of â âᵀ for input ``x`` (N, C, H, W).

    Shape (d_A, d_A) with d_A = C·kh·kw (+1 with a bias), in ``x``'s dtype.
    """
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # type: ignore[arg-type]
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if m.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows.t() @ rows
