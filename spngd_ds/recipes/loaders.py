"""Rank-aware, resumable data loaders.

The training order is a pure function of ``(seed, epoch)``: :class:`ResumableDistributedSampler`
shuffles with ``seed + epoch`` (as :class:`~torch.utils.data.DistributedSampler` does) and can
skip the samples of the batches already consumed in the current epoch, so a job resumed from a
checkpoint sees exactly the batches it would have seen without the interruption.

Validation is sharded without padding (:class:`ShardSampler`): every sample is evaluated exactly
once across ranks, so summed correct counts give the exact top-1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = [
    "Loaders",
    "ResumableDistributedSampler",
    "ShardSampler",
    "build_loaders",
    "rank_and_world",
    "reseed_workers",
]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableDistributedSampler(DistributedSampler[int]):
    """:class:`DistributedSampler` that can start an epoch part-way through.

    ``set_epoch(e)`` selects the permutation (seeded with ``seed + e``) and clears any skip;
    ``skip(n)`` then drops this rank's first ``n`` indices of that epoch. ``len()`` counts what
    remains.
    """

    def __init__(
        self,
        dataset: Dataset[object],
        num_replicas: int,
        rank: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        """The arguments of torch's ``DistributedSampler``."""
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning."""
        super().set_epoch(epoch)
        self._skip = 0

    def skip(self, num_samples: int) -> None:
        """Skip this rank's first ``num_samples`` indices of the current epoch."""
        if num_samples < 0:
            raise ValueError(f"cannot skip a negative number of samples ({num_samples})")
        self._skip = min(num_samples, self.num_samples)

    def __iter__(self) -> Iterator[int]:
        """This rank's indices of the epoch, less those already consumed."""
        indices = list(super().__iter__())
        return iter(indices[self._skip :])

    def __len__(self) -> int:
        """Indices left in this rank's epoch."""
        return self.num_samples - self._skip


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, rank + 2*world, ...``: a partition of the dataset, no padding."""

    def __init__(self, dataset: Sized, num_replicas: int, rank: int) -> None:
        """Rank ``rank`` of ``num_replicas`` over the indices of ``dataset``."""
        self._n = len(dataset)
        self._world = num_replicas
        self._rank = rank

    def __iter__(self) -> Iterator[int]:
        """Indices rank, rank + world, ... below the dataset's length."""
        return iter(range(self._rank, self._n, self._world))

    def __len__(self) -> int:
        """Number of this rank's indices."""
        return len(range(self._rank, self._n, self._world))


class Loaders(NamedTuple):
    """The train and validation loaders and the train sampler (for ``set_epoch`` / ``skip``)."""

    train: DataLoader[object]
    val: DataLoader[object]
    train_sampler: ResumableDistributedSampler


def build_loaders(
    train_ds: Dataset[object],
    val_ds: Dataset[object],
    micro_batch_size: int,
    *,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> Loaders:
    """Train/validation loaders for this rank.

    Args:
        train_ds: map-style dataset yielding ``(input, int label)``.
        val_ds: map-style dataset yielding ``(input, int label)``.
        micro_batch_size: samples per rank per forward pass (DeepSpeed's
            ``train_micro_batch_size_per_gpu``).
        eval_batch_size: validation batch per rank (default ``micro_batch_size``).
        num_workers: loader worker processes; 0 loads in the main process.
        seed: base of the per-epoch shuffle (``seed + epoch``).
        rank: this process's rank; defaults to the initialised process group's, else 0.
        world_size: number of ranks; defaults to the initialised process group's, else 1.

    Returns:
        Train batches are ``(micro_batch_size, ...)``, shuffled per epoch, incomplete last batch
        dropped, every rank seeing the same number of batches; validation batches are unshuffled and
        partition the validation set across ranks.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if rank is None or world_size is None:
        rank, world_size = rank_and_world()
    train_sampler = ResumableDistributedSampler(
        train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    val_sampler = ShardSampler(val_ds, num_replicas=world_size, rank=rank)  # type: ignore[arg-type]
    # Seeds the workers' base seed; the trainer re-seeds it per epoch (see ``reseed_workers``).
    generator = torch.Generator()
    generator.manual_seed(seed * 7919 + rank)
    train = DataLoader(
        train_ds,
        batch_size=micro_batch_size,
        sampler=train_sampler,
        drop_last=True,
        generator=generator,
        num_workers=num_workers,
    )
    val = DataLoader(
        val_ds,
        batch_size=eval_batch_size or micro_batch_size,
        sampler=val_sampler,
        drop_last=False,
        num_workers=num_workers,
    )
    return Loaders(train, val, train_sampler)


def reseed_workers(loader: DataLoader[object], seed: int, epoch: int, rank: int) -> None:
    """Make the random transforms of one epoch reproducible (per rank), e.g. after a resume.

    Re-seeds the generator from which the loader draws its workers' base seed (and, with
    ``num_workers=0``, nothing else: transforms then use the global RNG, which the checkpoint
    saves).
    """
    if loader.generator is not None:
        loader.generator.manual_seed((seed * 1_000_003 + epoch) * 7919 + rank)
