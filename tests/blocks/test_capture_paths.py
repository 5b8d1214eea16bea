"""The fast capture paths of the blocks against the plain formulas they replace (float64).

``KronBlock`` gathers im2col patches itself in one of two layouts (rows from a channels-last copy
for narrow layers, columns from the NCHW input for wide ones) and builds the bias row of A from
sums; ``UnitwiseBlock`` never forms x̂. Each path, and the branch points (bias, stride, dilation,
asymmetric padding and kernels, 1x1, channels-last and unbatched inputs, Linear on 3-D inputs), is
compared here with ``F.unfold`` + a column of ones, and with x̂ from ``x.var``; the end-to-end
float64 references are tests/blocks/test_kron.py and tests/blocks/test_batchnorm.py.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import spngd_ds.blocks.conv_gram as conv_gram_mod
from spngd_ds.blocks.kron import KronBlock
from spngd_ds.blocks.unitwise import UnitwiseBlock, channel_moments
from spngd_ds.staleness import RefreshSchedule
from tests.support.im2col import unfold_gram


def _schedule() -> RefreshSchedule:
    return RefreshSchedule(threshold=None)


CONVS = [
    dict(cin=3, cout=4, k=3, stride=1, padding=1, dilation=1, bias=True),
    dict(cin=3, cout=4, k=3, stride=2, padding=1, dilation=2, bias=False),
    dict(cin=5, cout=2, k=1, stride=2, padding=0, dilation=1, bias=True),
    dict(cin=2, cout=3, k=(3, 2), stride=(1, 2), padding=(2, 0), dilation=(1, 2), bias=True),
    dict(cin=4, cout=3, k=2, stride=3, padding=(0, 1), dilation=1, bias=False),
]


@pytest.mark.parametrize("layout_max_d", [0, 10**9], ids=["columns", "rows"])
@pytest.mark.parametrize("spec", CONVS, ids=[f"conv{i}" for i in range(len(CONVS))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_activation_gram_equals_unfold(
    spec: dict[str, Any], layout_max_d: int, channels_last: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conv_gram_mod, "ROWS_LAYOUT_MAX_D", layout_max_d)
    torch.manual_seed(0)
    m = nn.Conv2d(
        spec["cin"],
        spec["cout"],
        spec["k"],
        stride=spec["stride"],
        padding=spec["padding"],
        dilation=spec["dilation"],
        bias=spec["bias"],
    ).double()
    x = torch.randn(3, spec["cin"], 7, 8, dtype=torch.float64) + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    block = KronBlock("c", m, _schedule)
    gram, n = block.activation_gram(x)
    assert n == 3
    torch.testing.assert_close(gram, unfold_gram(m, x), rtol=1e-12, atol=1e-12)
    assert gram.shape == (block.d_A, block.d_A)


@pytest.mark.parametrize("layout_max_d", [0, 10**9], ids=["columns", "rows"])
def test_conv_unbatched_and_sliced_inputs(layout_max_d: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conv_gram_mod, "ROWS_LAYOUT_MAX_D", layout_max_d)
    torch.manual_seed(1)
    m = nn.Conv2d(3, 2, 3, padding=1).double()
    block = KronBlock("c", m, _schedule)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    gram, n = block.activation_gram(x[0])  # (C, H, W): one sample
    assert n == 1
    torch.testing.assert_close(gram, unfold_gram(m, x), rtol=1e-12, atol=1e-12)
    big = torch.randn(4, 6, 9, 9, dtype=torch.float64)
    view = big[1:3, 2:5, 1:6, 2:7]  # storage offset and non-contiguous strides
    torch.testing.assert_close(
        block.activation_gram(view)[0], unfold_gram(m, view.contiguous()), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("positions", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)], ids=["2d", "3d"])
def test_linear_activation_and_output_grams(bias: bool, shape: tuple[int, ...], positions: bool) -> None:
    torch.manual_seed(2)
    m = nn.Linear(5, 3, bias=bias).double()
    block = KronBlock("l", m, _schedule)
    block.positions_as_samples = positions  # rule 10: every position a sample, or the sequence
    samples = math.prod(shape[:-1]) if positions else shape[0]
    x = torch.randn(*shape, dtype=torch.float64)
    rows = x.reshape(-1, 5)
    if bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    gram, n = block.activation_gram(x)
    assert n == samples
    torch.testing.assert_close(gram, rows.t() @ rows, rtol=1e-12, atol=1e-12)
    g = torch.randn(*shape[:-1], 3, dtype=torch.float64)
    ggram, t = block.output_gram(g)
    grows = g.reshape(-1, 3)
    assert t == grows.shape[0] // samples
    torch.testing.assert_close(ggram, grows.t() @ grows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cout,hw", [(4, 6), (40, 2)], ids=["per_sample_grams", "one_product"])
def test_conv_output_gram(cout: int, hw: int) -> None:
    torch.manual_seed(3)
    block = KronBlock("c", nn.Conv2d(2, cout, 3, padding=1).double(), _schedule)
    grad = torch.randn(5, cout, hw, hw, dtype=torch.float64)
    gram, t = block.output_gram(grad)
    rows = grad.flatten(2).transpose(1, 2).reshape(-1, cout)
    assert t == hw * hw
    torch.testing.assert_close(gram, rows.t() @ rows, rtol=1e-12, atol=1e-12)


def test_conv_scaled_G_capture() -> None:
    torch.manual_seed(3)
    m = nn.Conv2d(2, 4, 3, padding=1).double()
    block = KronBlock("c", m, _schedule)
    grad = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    rows = grad.flatten(2).transpose(1, 2).reshape(-1, 4)
    back = block.capture_forward(torch.randn(5, 2, 6, 6, dtype=torch.float64), {"G"})
    assert back is not None
    back(grad, 0.25)
    total, count = block.stats["G"].take_local()
    scaled = rows * (5 * 0.25)
    torch.testing.assert_close(total, scaled.t() @ scaled / 36, rtol=1e-12, atol=1e-12)
    assert count == 5


@pytest.mark.parametrize("shape", [(7, 3), (6, 3, 4), (5, 3, 4, 6)], ids=["bn1d", "bn1d_seq", "bn2d"])
@pytest.mark.parametrize("offset", [3.0, 40.0], ids=["mean1.5sd", "mean20sd"])
def test_channel_moments_and_F_capture(shape: tuple[int, ...], offset: float) -> None:
    torch.manual_seed(4)
    bn = nn.BatchNorm1d(3, eps=1e-2) if len(shape) < 4 else nn.BatchNorm2d(3, eps=1e-2)
    bn = bn.double()
    x = 2.0 * torch.randn(*shape, dtype=torch.float64) + offset
    dims = [d for d in range(x.dim()) if d != 1]
    xhat = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + bn.eps)
    rows, mean, rstd = channel_moments(bn, x, torch.float64)
    view = [1, -1] + [1] * (x.dim() - 2)
    torch.testing.assert_close((x - mean.view(view)) * rstd.view(view), xhat, rtol=1e-12, atol=1e-12)
    assert rows.shape == (shape[0] * 3, x[0, 0].numel())
    block = UnitwiseBlock("bn", bn, _schedule, 1.0)
    back = block.capture_forward(x, {"F"})
    assert back is not None
    grad = torch.randn(*shape, dtype=torch.float64)
    back(grad, 0.5)
    total, _ = block.stats["F"].take_local()
    g = grad * (shape[0] * 0.5)
    sdims = list(range(2, x.dim()))
    ug = (xhat * g).sum(sdims) if sdims else xhat * g
    ub = g.sum(sdims) if sdims else g
    u = torch.stack([ug, ub], -1)
    torch.testing.assert_close(total, torch.einsum("nci,ncj->cij", u, u), rtol=1e-12, atol=1e-12)


def test_F_capture_in_float32_with_a_large_mean() -> None:
    """The one-pass moments in float32, for an input whose mean is 20 standard deviations.

    F stays within 1e-4 of the float64 capture of the same numbers (the cancellation in E[x²] - μ²
    and Σ x g - μ Σ g costs about u·(μ/σ)² = 2.4e-5 here).
    """
    torch.manual_seed(6)
    x = (0.5 * torch.randn(8, 4, 16, 16, dtype=torch.float64) + 10.0).float()
    grad = torch.randn(8, 4, 16, 16, dtype=torch.float64).float()
    out = {}
    for dtype in (torch.float32, torch.float64):
        block = UnitwiseBlock("bn", nn.BatchNorm2d(4).to(dtype), _schedule, 1.0)
        back = block.capture_forward(x.to(dtype), {"F"})
        assert back is not None
        back(grad.to(dtype), 1.0)
        out[dtype] = block.stats["F"].take_local()[0]
    ref = out[torch.float64]
    assert float((out[torch.float32].double() - ref).abs().max() / ref.abs().max()) < 1e-4  # type: ignore[operator, union-attr]


def test_bf16_layer_statistics_are_fp32() -> None:
    torch.manual_seed(5)
    m = nn.Conv2d(3, 2, 3, padding=1, bias=True).to(torch.bfloat16)
    block = KronBlock("c", m, _schedule)
    x = torch.randn(2, 3, 5, 5).to(torch.bfloat16)
    gram, _ = block.activation_gram(x)
    assert gram.dtype == torch.float32
    ref = unfold_gram(nn.Conv2d(3, 2, 3, padding=1).float(), x.float())
    torch.testing.assert_close(gram, ref, rtol=1e-5, atol=1e-4)
