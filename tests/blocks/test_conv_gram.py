"""The shift Gram of stride-1 convolutions against ``F.unfold``, in float64.

spngd_ds.blocks.conv_gram.shift_gram against ``F.unfold`` + a column of ones, over the cases whose
border corrections differ: padding smaller than, equal to and larger than the kernel's reach,
dilation in one or both dims, asymmetric kernels, a stride in one dim (the im2col layouts then),
bias, channels-last, one image and images smaller than the kernel's reach. The im2col layouts it
replaces stay reachable (``SHIFT_LAYOUT = False``) and are checked too.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import spngd_ds.blocks.conv_gram as conv_gram_mod
from spngd_ds.blocks.kron import KronBlock
from spngd_ds.staleness import RefreshSchedule
from tests.support.im2col import unfold_gram  # the dense im2col reference

SPECS = [
    dict(k=3, stride=1, padding=1, dilation=1),
    dict(k=3, stride=1, padding=0, dilation=1),
    dict(k=3, stride=1, padding=2, dilation=1),
    dict(k=5, stride=1, padding=1, dilation=1),
    dict(k=3, stride=1, padding=2, dilation=2),
    dict(k=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(1, 2)),
    dict(k=(2, 3), stride=1, padding=(0, 1), dilation=1),
    dict(k=(4, 1), stride=1, padding=(3, 0), dilation=(1, 1)),
    dict(k=3, stride=1, padding=3, dilation=1),
    dict(k=(1, 3), stride=1, padding=(0, 2), dilation=(1, 2)),
    dict(k=(3, 5), stride=1, padding=(2, 1), dilation=(2, 1)),
    dict(k=3, stride=(2, 1), padding=1, dilation=1),
]


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "im2col"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("spec", SPECS, ids=[f"spec{i}" for i in range(len(SPECS))])
# "column": one pixel wide, so a row's border term and a corner's are the same pixel (their signs add up)
@pytest.mark.parametrize(
    "shape", [(3, 7, 8), (1, 9, 5), (4, 4, 6), (2, 2, 3), (2, 5, 1)], ids=["n3", "n1", "short", "tiny", "column"]
)
def test_shift_gram_equals_unfold(
    spec: dict[str, Any], bias: bool, shift: bool, shape: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conv_gram_mod, "SHIFT_LAYOUT", shift)
    monkeypatch.setattr(conv_gram_mod, "SHIFT_MIN_CHANNELS", 1)  # these 3-channel layers take it too
    calls = _count_shift_calls(monkeypatch)
    torch.manual_seed(0)
    m = nn.Conv2d(
        3, 2, spec["k"], stride=spec["stride"], padding=spec["padding"], dilation=spec["dilation"], bias=bias
    ).double()
    n, h, w = shape
    x = torch.randn(n, 3, h, w, dtype=torch.float64) + 0.5
    try:
        ref = unfold_gram(m, x)
    except RuntimeError:
        pytest.skip("no output location")
    block = KronBlock("c", m, lambda: RefreshSchedule(threshold=None))
    for inp in (x, x.to(memory_format=torch.channels_last)):
        gram, count = block.activation_gram(inp)
        assert count == n
        torch.testing.assert_close(gram, ref, rtol=1e-12, atol=1e-12)
        # symmetric to rounding, not bit for bit: whether BLAS returns R^T R exactly symmetric depends
        # on the kernel the CPU gets (exact on earlier machines, 3% of entries 1 ulp off on a later
        # "AMD EPYC" guest). Nothing downstream needs more: pack_sym and Cholesky read one triangle.
        torch.testing.assert_close(gram, gram.t(), rtol=1e-13, atol=1e-13)
    strided = spec["stride"] != 1
    assert calls == ([] if strided or not shift else [n, n]), "the layout under test was not the one taken"


def _count_shift_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = conv_gram_mod.shift_gram

    def counting(x: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(int(x.shape[0]))
        return real(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(conv_gram_mod, "shift_gram", counting)
    return calls


@pytest.mark.parametrize(
    ("channels", "images", "size", "taken"),
    [
        (16, 2, 8, True),  # ResNet-20's layers
        (3, 32, 32, False),  # a stem on RGB: one im2col product is cheaper
        (64, 1, 8, True),  # 64 locations, 64 channels: at the bound
        (64, 1, 3, False),  # 9 locations < 64 channels (ResNet-50's last stage at 2 images)
    ],
)
def test_shift_gram_taken_where_it_is_faster(
    channels: int, images: int, size: int, taken: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_shift_calls(monkeypatch)
    m = nn.Conv2d(channels, 2, 3, padding=1).double()
    x = torch.randn(images, channels, size, size, dtype=torch.float64)
    gram, _ = KronBlock("c", m, lambda: RefreshSchedule(threshold=None)).activation_gram(x)
    torch.testing.assert_close(gram, unfold_gram(m, x), rtol=1e-12, atol=1e-12)
    assert bool(calls) == taken
