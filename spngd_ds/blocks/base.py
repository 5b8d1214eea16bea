"""What every curvature block shares: its statistics, their accumulation, and safe inversion."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from spngd_ds.blocks.shapes import full_numel
from spngd_ds.staleness import RefreshSchedule


@dataclass
class Statistic:
    """One curvature statistic of a block (A, G or F).

    Attributes:
        name: "A", "G" or "F".
        schedule: its refresh interval (rule 6).
        shape: shape of the symmetric statistic, ``(d, d)`` or ``(C, 2, 2)``.
        local_sum: this rank's sum over the samples captured this step (``shape``), or ``None``.
        local_count: number of samples in ``local_sum``.
        value: the normalised statistic (global over ranks and micro-batches); owner only.
        inverse: its damped inverse; owner only (``None`` until first inverted, or after a failure).
        captures: micro-batches captured so far (for tests: proves that a stale X is not captured).
        refreshes: how many times the value was refreshed.
        inversions: how many times it was (re-)inverted.
        rejections: consecutive refreshes rejected as outliers.
    """

    name: str
    schedule: RefreshSchedule
    shape: tuple[int, ...]
    local_sum: torch.Tensor | None = None
    local_count: float = 0.0
    value: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    captures: int = 0
    refreshes: int = 0
    inversions: int = 0
    rejections: int = 0

    def add(self, total: torch.Tensor, count: int, fresh: bool = False) -> None:
        """Accumulate one micro-batch's sum (``shape``) over ``count`` samples.

        ``fresh``: the caller hands over a tensor that nothing else holds, kept as the sum without a
        copy.
        """
        if self.local_sum is None:
            self.local_sum = total if fresh else total.clone()
        else:
            self.local_sum.add_(total)
        self.local_count += count
        self.captures += 1

    def take_local(self) -> tuple[torch.Tensor | None, float]:
        """Return and reset this step's local sum and count."""
        out = (self.local_sum, self.local_count)
        self.local_sum, self.local_count = None, 0.0
        return out

    def nbytes(self) -> int:
        """Bytes held by the persistent value and inverse."""
        return sum(t.numel() * t.element_size() for t in (self.value, self.inverse) if t is not None)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite.

    A finite sum proves it (an inf or NaN entry makes the sum inf or NaN) for one reduction instead
    of an elementwise test; only when the sum is not finite (a bad entry, or finite entries that
    overflow the sum) are the entries tested.
    """
    if t.numel() == 0:
        return True
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def all_finite_many(tensors: list[torch.Tensor]) -> bool:
    """:func:`all_finite` of every tensor with one host synchronisation.

    The float64 sums of all of them are stacked and tested at once (a float64 sum of finite
    fp32/bf16/fp16 entries cannot overflow); only when that fails are the tensors tested one by one.
    """
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        return True
    sums = torch.stack([t.sum(dtype=torch.float64) for t in tensors])
    return bool(torch.isfinite(sums).all()) or all(all_finite(t) for t in tensors)


def all_finite_device(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every entry of every tensor is finite, without a host synchronisation.

    Returns a 0-d bool tensor on their device: float64 norms of all of them in one multi-tensor op
    (the squares of finite fp32/bf16/fp16 entries cannot overflow float64; float64 entries beyond
    1e154 can: where this says False, :func:`all_finite_many` decides).
    """
    tensors = [t for t in tensors if t.numel() > 0]
    if not tensors:
        raise ValueError("all_finite_device: no tensor with entries given")
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))).all()


def robust_inverse(matrix: torch.Tensor) -> torch.Tensor | None:
    """Inverse of a symmetric positive-definite ``matrix`` (d, d) by Cholesky.

    Tries the matrix's own dtype first, then float64; returns ``None`` when neither gives a finite
    inverse (the caller then falls back to the plain gradient, rule 5).
    """
    inverses, ok, _ = invert_spd_many([matrix])
    if bool(ok[0]):
        return inverses[0]
    return _float64_inverse(matrix)


def _float64_inverse(matrix: torch.Tensor) -> torch.Tensor | None:
    """The float64 retry of :func:`robust_inverse` (after the matrix's own dtype failed)."""
    if matrix.dtype == torch.float64 or not all_finite(matrix):
        return None
    inverses, ok, _ = invert_spd_many([matrix.to(torch.float64)])
    inv = inverses[0].to(matrix.dtype)
    return inv if bool(ok[0]) and all_finite(inv) else None  # fp64 -> fp32 can overflow


#: :func:`invert_spd_many` inverts CPU factors by ``torch.cholesky_inverse`` (tests switch this off
#: to take the accelerators' branch, ``torch.cholesky_solve`` against the identity, on the CPU)
CPU_CHOLESKY_INVERSE = True


def invert_spd_many(matrices: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, list[int]]:
    """Inverses of symmetric positive-definite matrices, batched, without a host synchronisation.

    Each matrix is (d, d) and is inverted in its own dtype. The matrices are stacked by (d, dtype,
    device), factored by one batched ``torch.linalg.cholesky_ex`` per stack and inverted by
    ``torch.cholesky_solve`` against the identity on an accelerator (``torch.cholesky_inverse``
    reads its error flag on the host there) and by ``torch.cholesky_inverse`` on the CPU.

    Returns the inverses (garbage where not ok), ok (len(matrices),) bool on the first matrix's
    device: the factorisation succeeded and the matrix and its inverse are finite, and which matrix
    each entry of ok is about (ok[j] is matrix order[j]: stacks follow each other).
    """
    if not matrices:
        return [], torch.ones(0, dtype=torch.bool), []
    groups: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
    for i, m in enumerate(matrices):
        groups.setdefault((m.shape[-1], m.dtype, m.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(matrices)
    oks: list[torch.Tensor] = []
    order: list[int] = []
    for (d, dtype, device), idx in groups.items():
        stack = torch.stack([matrices[i] for i in idx]) if len(idx) > 1 else matrices[idx[0]].unsqueeze(0)
        chol, info = torch.linalg.cholesky_ex(stack)
        eye = torch.eye(d, dtype=dtype, device=device).expand(len(idx), d, d)
        # a failed factorisation gets an identity factor: inverted harmlessly, flagged by info below
        chol = torch.where((info == 0)[:, None, None], chol, eye)
        # the CPU runs LAPACK's potri (half the work of two triangular solves; its error check
        # costs nothing there); an accelerator solves against the identity, which reads nothing back
        potri = CPU_CHOLESKY_INVERSE and device.type == "cpu"
        inv = torch.cholesky_inverse(chol) if potri else torch.cholesky_solve(eye, chol)
        finite = torch.isfinite(inv).flatten(1).all(1) & torch.isfinite(stack).flatten(1).all(1)
        oks.append((info == 0) & finite)
        for k, i in enumerate(idx):
            out[i] = inv[k]
        order += idx
    ok = torch.cat([o.to(oks[0].device) for o in oks]) if len(oks) > 1 else oks[0]
    return [t for t in out if t is not None], ok, order


@dataclass
class InversionJob:
    """What a block hands the batched inversion of a step (:func:`run_inversions`).

    Attributes:
        matrices: (statistic name, damped SPD matrix (d, d)) to invert.
        scalars: float64 figures (0-d or (k,) tensors, on any device) the block needs back on the host.
        finish: called with {name: inverse or None (the inversion failed)} and the scalars as
            floats; updates the block and returns its report.
    """

    matrices: list[tuple[str, torch.Tensor]]
    scalars: list[torch.Tensor]
    finish: Callable[[dict[str, torch.Tensor | None], list[float]], InversionReport]


def run_inversions(jobs: list[InversionJob]) -> list[InversionReport]:
    """Run every job's inversions in batches with one host synchronisation.

    Every job's matrices inverted in batches (:func:`invert_spd_many`), their success flags and the
    jobs' scalars read back in ONE host synchronisation; a matrix whose own-dtype inversion failed
    is retried in float64 (:func:`robust_inverse`'s rule: rare, a synchronisation each).
    """
    matrices = [m for job in jobs for _, m in job.matrices]
    inverses, ok, order = invert_spd_many(matrices)
    parts = [ok.to(torch.float64)] if matrices else []
    parts += [t.reshape(-1).to(torch.float64) for job in jobs for t in job.scalars]
    if parts:
        device = parts[0].device
        values = torch.cat([t.to(device) for t in parts]).tolist()
    else:
        values = []
    flags = [0.0] * len(matrices)
    for j, i in enumerate(order):
        flags[i] = values[j]
    rest = values[len(matrices) :]
    reports = []
    k = 0
    for job in jobs:
        got: dict[str, torch.Tensor | None] = {}
        for name, m in job.matrices:
            got[name] = inverses[k] if flags[k] > 0 else _float64_inverse(m)
            k += 1
        n = sum(t.numel() for t in job.scalars)
        reports.append(job.finish(got, rest[:n]))
        rest = rest[n:]
    return reports


def stat_dtype(module: nn.Module) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise (bf16/fp16 models keep fp32 statistics)."""
    p = next(module.parameters(), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


@dataclass
class InversionReport:
    """What one block's inversion job did (:meth:`Block.inversion_job`, :func:`run_inversions`)."""

    inverted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Block:
    """A group of parameters preconditioned together (one layer).

    Subclasses define the statistics they keep and how a gradient is preconditioned. Gradients are
    passed in explicitly (ordered as ``self.params``) because their source depends on the engine
    path (``param.grad`` reduced to the owner, or DeepSpeed's partition fragments routed to it).
    """

    kind = "plain"

    def __init__(self, name: str, module: nn.Module, params: list[nn.Parameter]) -> None:
        """A block named ``name`` over ``params`` (in this order) of ``module``."""
        self.name = name
        self.module = module
        self.params = params
        self.param_names: list[str] = []
        self.stats: dict[str, Statistic] = {}
        self.dtype = stat_dtype(module) if params else torch.float32

    # -- capture (hooks) -------------------------------------------------------------------------
    def capture_forward(self, inputs: torch.Tensor, due: set[str]) -> Callable[[torch.Tensor, float], None] | None:
        """Called by the forward hook with the module's input.

        Returns the backward capture (called with the output gradient and its per-sample scale), or
        ``None``.
        """
        return None

    # -- owner side --------------------------------------------------------------------------------
    def normalise(self, name: str, total: torch.Tensor, count: float) -> torch.Tensor:
        """Turn a global sum over ``count`` samples into the statistic's value (rules 2-4)."""
        return total / count

    def inversion_job(self, damping: float, refreshed: set[str]) -> InversionJob | None:
        """The inversion job for the statistics named in ``refreshed``.

        What (re-)inverting the statistics named in ``refreshed`` takes, for the step's batched
        inversion (:func:`run_inversions`); ``None``: nothing to invert.
        """
        return None

    def ready(self) -> bool:
        """Whether every inverse exists, so :meth:`precondition` is not the identity."""
        return all(s.inverse is not None for s in self.stats.values())

    def precondition(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Preconditioned gradients, same shapes and dtypes as ``grads`` (identity here)."""
        return grads

    def curvature_nbytes(self) -> int:
        """Bytes of persistent statistics and inverses held for this block."""
        return sum(s.nbytes() for s in self.stats.values())

    def inversion_cost(self) -> float:
        """Relative cost of inverting this block (sum of d^3 of its factors)."""
        return 0.0

    def memory_cost(self) -> float:
        """Relative memory of this block's factors (sum of d^2)."""
        return float(sum(full_numel(p) for p in self.params)) * 1e-6


class PlainBlock(Block):
    """Parameters no curvature block covers: they take the momentum update on the plain gradient."""

    kind = "plain"
