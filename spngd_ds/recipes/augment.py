"""Batch-level augmentation: mixup and per-sample random erasing. Both are off by default.

Both draw from the global torch RNG; the trainer runs them under :func:`seeded` with a seed made
from ``(seed, micro-batch index, rank)``, so an augmented batch is the same after a resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BatchRandomErasing",
    "MixedBatch",
    "mixed_accuracy",
    "mixup",
    "mixup_cross_entropy",
    "seeded",
    "soft_targets",
]


@dataclass(frozen=True)
class MixedBatch:
    """A mixup batch: ``inputs = lam * x + (1 - lam) * x[perm]``.

    Attributes:
        inputs: mixed inputs, same shape and dtype as the original ``x`` (``(N, ...)``).
        targets_a: labels of ``x``, ``(N,)`` int64.
        targets_b: labels of ``x[perm]``, ``(N,)`` int64.
        lam: weight of ``targets_a``, in ``[0, 1]`` (1.0 when mixup is off).
    """

    inputs: torch.Tensor
    targets_a: torch.Tensor
    targets_b: torch.Tensor
    lam: float


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float) -> MixedBatch:
    """Mixup (Zhang et al., 2018) of a batch with a random permutation of itself.

    Args:
        x: inputs ``(N, ...)``, floating point.
        y: labels ``(N,)`` int64.
        alpha: Beta(alpha, alpha) parameter of the mixing weight; ``alpha <= 0`` turns mixup off
            (``lam = 1``, inputs returned unchanged).

    Returns:
        A :class:`MixedBatch`; one ``lam`` for the whole batch.
    """
    if alpha <= 0.0:
        return MixedBatch(x, y, y, 1.0)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0]).to(x.device)  # drawn on the CPU RNG wherever x lives
    mixed = x.mul(lam).add_(x[perm], alpha=1.0 - lam)
    return MixedBatch(mixed, y, y[perm], lam)


def mixup_cross_entropy(logits: torch.Tensor, batch: MixedBatch) -> torch.Tensor:
    """Mean cross-entropy of ``(N, C)`` logits against the mixed targets (a scalar, fp32).

    Equals ``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)``, which is the cross-entropy
    against :func:`soft_targets`. Logits are cast to fp32 first.
    """
    logits = logits.float()
    loss = F.cross_entropy(logits, batch.targets_a)
    if batch.lam < 1.0:
        loss = batch.lam * loss + (1.0 - batch.lam) * F.cross_entropy(logits, batch.targets_b)
    return loss


def soft_targets(batch: MixedBatch, num_classes: int) -> torch.Tensor:
    """The mixed targets as class probabilities, ``(N, num_classes)`` fp32 rows summing to 1."""
    a = F.one_hot(batch.targets_a, num_classes).float()
    b = F.one_hot(batch.targets_b, num_classes).float()
    return batch.lam * a + (1.0 - batch.lam) * b


def mixed_accuracy(logits: torch.Tensor, batch: MixedBatch) -> torch.Tensor:
    """Top-1 accuracy against the mixed targets, ``lam * acc(y_a) + (1 - lam) * acc(y_b)``.

    Returns a 0-dim fp32 tensor in [0, 1] on the logits' device (no host synchronisation).
    """
    pred = logits.argmax(dim=1)
    acc = (pred == batch.targets_a).float().mean()
    if batch.lam < 1.0:
        acc = batch.lam * acc + (1.0 - batch.lam) * (pred == batch.targets_b).float().mean()
    return acc


class BatchRandomErasing:
    """torchvision's ``RandomErasing`` applied independently to every sample of a batch.

    Args:
        p: probability that a sample gets one erased rectangle (0 turns it off).
        scale: range of the erased area as a fraction of the image.
        ratio: range of the rectangle's aspect ratio.
        value: fill value; 0 is the dataset mean for normalised inputs, ``"random"`` draws
            per-pixel normal noise.

    Calling it maps ``(N, C, H, W)`` to a new tensor of the same shape and dtype.
    """

    def __init__(
        self,
        p: float = 0.5,
        scale: tuple[float, float] = (0.02, 0.33),
        ratio: tuple[float, float] = (0.3, 3.3),
        value: float | str = 0.0,
    ) -> None:
        """Erase a random rectangle of each image with probability ``p`` (torchvision's arguments)."""
        from torchvision.transforms import RandomErasing

        if not 0.0 <= p <= 1.0:
            raise ValueError(f"random erasing probability must be in [0, 1], got {p}")
        self.p = p
        self._erase = RandomErasing(p=p, scale=scale, ratio=ratio, value=value, inplace=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, C, H, W) with each image erased independently."""
        if self.p <= 0.0:
            return x
        if x.dim() != 4:
            raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
        return torch.stack([self._erase(sample) for sample in x])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU torch RNG seeded to ``seed``; the RNG state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
