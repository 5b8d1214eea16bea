"""Mixup and per-sample random erasing on batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spngd_ds.recipes.augment import (
    BatchRandomErasing,
    mixed_accuracy,
    mixup,
    mixup_cross_entropy,
    seeded,
    soft_targets,
)

pytestmark = pytest.mark.timeout(60)


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 6, 6, generator=g), torch.arange(n) % 4


def test_mixup_off_is_identity() -> None:
    x, y = _batch()
    batch = mixup(x, y, alpha=0.0)
    assert batch.inputs is x and batch.lam == 1.0
    assert torch.equal(batch.targets_a, y) and torch.equal(batch.targets_b, y)


def test_mixup_mixes_with_a_permutation() -> None:
    x, y = _batch()
    torch.manual_seed(3)
    batch = mixup(x, y, alpha=1.0)
    assert 0.0 <= batch.lam <= 1.0 and batch.inputs.shape == x.shape
    # recover the permutation from the labels of targets_b and check the mixture exactly
    for i in range(x.shape[0]):
        matches = [
            j for j in range(x.shape[0]) if torch.allclose(batch.inputs[i], batch.lam * x[i] + (1 - batch.lam) * x[j])
        ]
        assert matches and int(y[matches[0]]) == int(batch.targets_b[i])
    assert torch.equal(batch.targets_a, y)


def test_mixup_loss_equals_soft_target_cross_entropy() -> None:
    x, y = _batch()
    torch.manual_seed(1)
    batch = mixup(x, y, alpha=0.6)
    logits = torch.randn(x.shape[0], 4)
    soft = soft_targets(batch, num_classes=4)
    assert torch.allclose(soft.sum(dim=1), torch.ones(x.shape[0]))
    expected = -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert torch.allclose(mixup_cross_entropy(logits, batch), expected, atol=1e-6)


def test_mixup_loss_without_mixing_is_cross_entropy_in_fp32() -> None:
    x, y = _batch()
    logits = torch.randn(x.shape[0], 4).to(torch.bfloat16)
    loss = mixup_cross_entropy(logits, mixup(x, y, alpha=0.0))
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, F.cross_entropy(logits.float(), y))


def test_mixed_accuracy() -> None:
    x, y = _batch(4)
    logits = F.one_hot(y, 4).float()  # predicts y exactly
    assert float(mixed_accuracy(logits, mixup(x, y, 0.0))) == 1.0
    torch.manual_seed(0)
    batch = mixup(x, y, 0.5)
    acc_b = (y == batch.targets_b).float().mean()
    assert torch.allclose(mixed_accuracy(logits, batch), batch.lam + (1 - batch.lam) * acc_b)


def test_random_erasing_per_sample() -> None:
    x = torch.ones(16, 3, 20, 20)
    torch.manual_seed(0)
    out = BatchRandomErasing(p=0.5, value=0.0)(x)
    assert out.shape == x.shape and torch.equal(x, torch.ones_like(x))  # input untouched
    erased = [(out[i] == 0).any().item() for i in range(16)]
    assert 2 <= sum(erased) <= 14  # each sample decides for itself
    for i, e in enumerate(erased):
        if e:  # one rectangle, same on every channel
            zero = out[i, 0] == 0
            assert torch.equal(zero, out[i, 1] == 0) and 0.01 < zero.float().mean() < 0.4


def test_random_erasing_off_and_bad_input() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert BatchRandomErasing(p=0.0)(x) is x
    with pytest.raises(ValueError, match="batch"):
        BatchRandomErasing(p=1.0)(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="probability"):
        BatchRandomErasing(p=1.5)


def test_seeded_is_reproducible_and_restores_rng() -> None:
    x, y = _batch()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with seeded(7):
        a = mixup(x, y, 1.0)
        ea = BatchRandomErasing(p=1.0)(x)
    assert torch.equal(torch.random.get_rng_state(), before)
    with seeded(7):
        b = mixup(x, y, 1.0)
        eb = BatchRandomErasing(p=1.0)(x)
    assert a.lam == b.lam and torch.equal(a.inputs, b.inputs) and torch.equal(ea, eb)
