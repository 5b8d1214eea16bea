"""pack_sym / unpack_sym with their cached triangle indices.

The same values as the plain ``torch.triu_indices`` formulas, for single and batched matrices,
across sizes and dtypes.
"""

from __future__ import annotations

import pytest
import torch

from spngd_ds.comm import _TRIU_CACHE, pack_sym, triu_numel, unpack_sym


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (3, 2, 2), (2, 3, 7, 7)])
def test_pack_unpack_match_triu_indices(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    m = torch.randn(*shape, dtype=torch.float64)
    m = (m + m.transpose(-1, -2)).to(dtype)
    d = shape[-1]
    rows, cols = torch.triu_indices(d, d)
    for _ in range(2):  # the second call reads the cache
        packed = pack_sym(m)
        assert packed.shape == (*shape[:-2], triu_numel(d)) and packed.dtype == dtype
        assert torch.equal(packed, m[..., rows, cols])
        out = unpack_sym(packed, d)
        ref = packed.new_zeros(*shape)
        ref[..., rows, cols] = packed
        ref[..., cols, rows] = packed
        assert torch.equal(out, ref) and torch.equal(out, m)
    assert (d, torch.device("cpu")) in _TRIU_CACHE


def test_pack_of_a_non_contiguous_matrix() -> None:
    m = torch.randn(6, 6, dtype=torch.float64)
    m = m + m.t()
    big = torch.zeros(8, 8, dtype=torch.float64)
    big[1:7, 2:8] = m
    view = big[1:7, 2:8]
    rows, cols = torch.triu_indices(6, 6)
    assert torch.equal(pack_sym(view), m[rows, cols])
    assert torch.equal(pack_sym(m.t()), m.t()[rows, cols])
