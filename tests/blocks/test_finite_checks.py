"""The finiteness checks the step uses to skip a non-finite gradient (spngd_ds.blocks.base)."""

from __future__ import annotations

import torch

from spngd_ds.blocks.base import all_finite, all_finite_many


def test_one_bad_entry_anywhere_is_found() -> None:
    good = [torch.randn(5, 3), torch.randn(7, dtype=torch.bfloat16), torch.zeros(0)]
    assert all_finite_many(good) and all_finite_many([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(4, 4)
        t[2, 1] = bad
        assert not all_finite_many([*good, t]) and not all_finite(t)


def test_finite_entries_whose_sum_overflows_are_finite() -> None:
    big = torch.full((4,), 3e38)  # fp32 sum overflows, the float64 sum does not
    assert all_finite(big) and all_finite_many([big])
    huge = torch.full((4,), 1.7e308, dtype=torch.float64)  # even the float64 sum overflows: tested elementwise
    assert all_finite_many([huge, big])
    assert not all_finite_many([huge, torch.tensor([float("nan")])])
