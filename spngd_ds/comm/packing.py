"""Packing tensors for the wire.

Symmetric matrices as their upper triangle (:func:`pack_sym`, :func:`unpack_sym`), items as one flat
buffer and back (:func:`_concat`, :func:`_split`), and a parameter's piece of a flat buffer
(:class:`Fragment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch


def triu_numel(d: int) -> int:
    """Length of the packed upper triangle of a (d, d) matrix."""
    return d * (d + 1) // 2


_TRIU_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _triu_flat(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat positions of the upper triangle of a (d, d) matrix.

    For the row-major flattened matrix: the flat positions of its upper triangle in row-major order
    (d(d+1)/2,), the positions of their mirror images (d(d+1)/2,), and the upper-triangle mask
    (d, d); built once per (d, device) (``torch.triu_indices`` costs more than the packing).
    """
    key = (d, torch.device(device))
    hit = _TRIU_CACHE.get(key)
    if hit is None:
        rows, cols = torch.triu_indices(d, d, device=device)
        mask = torch.ones(d, d, dtype=torch.bool, device=device).triu_()
        hit = _TRIU_CACHE[key] = (rows * d + cols, cols * d + rows, mask)
    return hit


def pack_sym(matrix: torch.Tensor) -> torch.Tensor:
    """Upper triangle (row-major) of the symmetric (..., d, d) ``matrix`` as (..., d(d+1)/2)."""
    d = matrix.shape[-1]
    flat, _, _ = _triu_flat(d, matrix.device)
    return matrix.reshape(*matrix.shape[:-2], d * d).index_select(-1, flat)


def unpack_sym(packed: torch.Tensor, d: int) -> torch.Tensor:
    """Unpack a symmetric matrix from its upper triangle (inverse of :func:`pack_sym`).

    ``packed`` (..., d(d+1)/2) becomes a symmetric (..., d, d) matrix whose every entry is a copy of
    its packed value (the lower triangle is the transpose of the upper one, bit for bit).
    """
    flat, _, mask = _triu_flat(d, packed.device)
    upper = packed.new_zeros(*packed.shape[:-1], d * d).index_copy_(-1, flat, packed).view(*packed.shape[:-1], d, d)
    return torch.where(mask, upper, upper.transpose(-1, -2))


def _concat(pieces: Sequence[torch.Tensor], size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Pack tensors into one zero-padded 1-D buffer.

    The buffer, (size,) of ``dtype`` on ``device``, holds the flattened ``pieces`` one after the
    other (one copy each, cast on the way).
    """
    out = torch.zeros(size, dtype=dtype, device=device)
    at = 0
    for t in pieces:
        n = t.numel()
        out[at : at + n].copy_(t.reshape(-1))
        at += n
    return out


def _split(
    flat: torch.Tensor,
    numels: Sequence[int],
    shapes: Sequence[Sequence[int]],
    offsets: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Views of the 1-D ``flat``, one per (numel, shape), at ``offsets`` (default: consecutive)."""
    if offsets is None:
        offsets = list(accumulate(numels, initial=0))[:-1]
    return [flat[o : o + n].view(tuple(s)) for o, n, s in zip(offsets, numels, shapes, strict=True)]


@dataclass(frozen=True)
class Fragment:
    """``flat[flat_start : flat_start + numel]`` holds ``param.flatten()[full_start : full_start + numel]``."""

    flat: torch.Tensor
    flat_start: int
    full_start: int
    numel: int
