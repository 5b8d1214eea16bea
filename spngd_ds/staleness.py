"""Rule 6: stale statistics with an adaptive refresh interval per statistic.

Each statistic X (A or G of a Kronecker block, F of a unit-wise block) owns one
:class:`RefreshSchedule`. When X is refreshed at step ``t`` its relative change
``r = ||X_new - X_old||_F / ||X_old||_F`` decides the next interval: below the threshold the
interval grows by one (up to ``max_interval``), otherwise it resets to 1. X is next due at
``t + interval``. Between refreshes X is neither captured, communicated nor re-inverted.

**Sampling noise.** X_new and X_old are estimates from n_new and n_old samples, so even at fixed
weights r is not 0: r² ≈ r_true² + ν² with ν² = ρ (1/n_new + 1/n_old), where ρ is the relative
per-sample variance of the statistic (E||X̂_n − X||² = ρ ||X||² / n). At the 64 samples a step of
the digits job, ν alone is above the threshold for G and BatchNorm's F, so a rule on r alone never
lets them go stale. The rule therefore compares the change with the threshold *after* removing the
expected noise: the interval grows when ``r² < threshold² + (noise_scale · ν)²``, i.e. when the
change that is not explained by sampling noise is below the threshold. ρ comes from the statistic
itself (the Wishart variance of a Gram of independent vectors, see :func:`wishart_rho`), n from
the global sample count of each refresh: both are the same on every rank and at every world size
for the same global batch, so the decision is too. ``noise_scale = 0`` gives the plain rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def change_figures(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """(2,) float64 on ``new``'s device, without a host synchronisation.

    ``||old||_F`` and ``||new - old||_F``, each computed in the statistics' own dtype (zeros when
    there is no old value); :func:`ratio_from` turns them into the relative change.
    """
    if old is None:
        return new.new_zeros(2, dtype=torch.float64)
    return torch.stack([torch.linalg.vector_norm(old), torch.linalg.vector_norm(new - old)]).to(torch.float64)


def ratio_from(figures: list[float], old: torch.Tensor | None, new: torch.Tensor) -> float:
    """``||new - old||_F / ||old||_F`` from :func:`change_figures` read back.

    ``inf`` when there is no (or a zero, or a non-finite) old value. A norm that overflowed its
    dtype (finite entries whose squares do not fit) is recomputed in float64: rare, one
    synchronisation.
    """
    if old is None:
        return math.inf
    denom, diff = figures
    if not (math.isfinite(denom) and math.isfinite(diff)):
        denom = float(torch.linalg.vector_norm(old.double()))
        if denom == 0.0 or not math.isfinite(denom):
            return math.inf
        return float(torch.linalg.vector_norm((new - old).double())) / denom
    if denom == 0.0:
        return math.inf
    return diff / denom


def relative_change(old: torch.Tensor | None, new: torch.Tensor) -> float:
    """``||new - old||_F / ||old||_F``; ``inf`` when there is no (or a zero) old value.

    Norms in the statistics' dtype, float64 only where they overflow it (:func:`ratio_from`).
    """
    if old is None:
        return math.inf
    return ratio_from(change_figures(old, new).tolist(), old, new)


def rho_figures(value: torch.Tensor) -> torch.Tensor:
    """(2,) float64 on ``value``'s device, without a host synchronisation.

    ``||X||_F`` (in X's dtype) and ``(Σ tr X)²`` over the blocks of ``value`` (in float64);
    :func:`rho_from` turns them into :func:`wishart_rho`.
    """
    v = value.unsqueeze(0) if value.dim() == 2 else value
    fro = torch.linalg.vector_norm(v).to(torch.float64)
    trace2 = torch.diagonal(v, dim1=-2, dim2=-1).to(torch.float64).sum(-1).pow(2).sum()
    return torch.stack([fro, trace2])


def rho_from(figures: list[float], value: torch.Tensor, vectors_per_sample: float = 1.0) -> float:
    """:func:`wishart_rho` of ``value`` from its :func:`rho_figures` read back.

    float64 again only when the norm overflowed ``value``'s dtype.
    """
    fro, trace2 = figures
    if not math.isfinite(fro):  # the squares overflowed v's dtype (or v is not finite)
        return wishart_rho(value, vectors_per_sample)
    fro2 = fro * fro
    if not (math.isfinite(fro2) and math.isfinite(trace2)) or fro2 <= 0.0:
        return 0.0
    return (1.0 + trace2 / fro2) / max(float(vectors_per_sample), 1.0)


def wishart_rho(value: torch.Tensor, vectors_per_sample: float = 1.0) -> float:
    """Relative per-sample variance ρ of a statistic that is a mean of outer products u uᵀ.

    For X = E[u uᵀ] estimated from n independent vectors, the Wishart (Gaussian fourth-moment)
    variance of each entry is (X_ij² + X_ii X_jj)/n, so E||X̂ − X||²_F / ||X||²_F = ρ/n with
    ρ = 1 + (tr X)²/||X||²_F (one plus the effective rank of X). ``value`` is (d, d) or a stack of
    independent blocks (C, k, k) (BatchNorm's F: the sums run over all blocks).

    A sample of a convolution contributes T output locations; they are not independent, so the
    true ρ lies between this formula's (1 vector per sample) and it divided by T. Passing
    ``vectors_per_sample = T`` gives the lower end: the noise floor is then never overestimated,
    and a real change is never taken for noise (the rule errs on the side of refreshing).
    Returns 0 for a zero or non-finite value (no noise correction).
    """
    v = value.unsqueeze(0) if value.dim() == 2 else value
    fro = float(torch.linalg.vector_norm(v))  # in v's dtype: 40x faster than in float64 on the CPU
    if not math.isfinite(fro):  # the squares overflowed v's dtype: redo in float64
        fro = float(torch.linalg.vector_norm(v.double()))
    fro2 = fro * fro
    trace2 = float(torch.diagonal(v, dim1=-2, dim2=-1).double().sum(-1).pow(2).sum())
    if not (math.isfinite(fro2) and math.isfinite(trace2)) or fro2 <= 0.0:
        return 0.0
    return (1.0 + trace2 / fro2) / max(float(vectors_per_sample), 1.0)


@dataclass
class RefreshSchedule:
    """The refresh interval of one statistic.

    Attributes:
        threshold: rule 6's threshold, or ``None`` to refresh every step (``staleness=None``).
        max_interval: the largest interval in steps.
        noise_scale: weight of the sampling-noise floor in the rule (module docstring); 0: plain rule.
        interval: the current interval Δ_X in steps (starts at 1).
        next_step: the step index at which X is next due (starts at 0: due at the first step).
        noise_rho: ρ of the statistic as last refreshed (set by its block), or ``None``.
        pending_samples: global sample count behind the value being refreshed (set by its block
            when it normalises the value; ``observe(samples=...)`` takes precedence).
        last_samples: global sample count behind the current value (the previous refresh).
        last_ratio: r of the last refresh (diagnostics: benchmarks, logs).
        last_floor: the noise floor ν that r was compared against at the last refresh.
    """

    threshold: float | None
    max_interval: int = 1
    noise_scale: float = 1.0
    interval: int = 1
    next_step: int = 0
    noise_rho: float | None = field(default=None, compare=False)
    pending_samples: float | None = field(default=None, compare=False)
    last_samples: float | None = field(default=None, compare=False)
    last_ratio: float = field(default=math.nan, compare=False)
    last_floor: float = field(default=0.0, compare=False)
    #: ρ noted as device figures (:func:`rho_figures`, the value, vectors per sample), not yet
    #: read back: :meth:`settle_rho` turns them into ``noise_rho``
    rho_pending: tuple[torch.Tensor, torch.Tensor, float] | None = field(default=None, compare=False, repr=False)

    def is_due(self, step: int) -> bool:
        """Whether the statistic is captured, communicated and re-inverted at ``step``."""
        return step >= self.next_step

    def note_value(self, rho: float, samples: float) -> None:
        """What the block knows about the value it is about to hand in: its ρ and sample count."""
        self.noise_rho, self.rho_pending = rho, None
        self.pending_samples = samples

    def note_value_figures(self, value: torch.Tensor, vectors_per_sample: float, samples: float) -> None:
        """:meth:`note_value` without a host synchronisation.

        ρ of ``value`` as device figures (:func:`rho_figures`), read back by :meth:`settle_rho` (the
        optimizer reads every due statistic's figures at once).
        """
        self.rho_pending = (rho_figures(value), value, vectors_per_sample)
        self.pending_samples = samples

    def settle_rho(self, figures: list[float] | None = None) -> None:
        """Set ``noise_rho`` from the noted figures.

        ``figures`` read back by the caller, or read here (one synchronisation). Nothing to do when
        none are pending.
        """
        if self.rho_pending is None:
            return
        tensor, value, vectors = self.rho_pending
        self.rho_pending = None
        self.noise_rho = rho_from(figures if figures is not None else tensor.tolist(), value, vectors)

    def noise_floor(self, samples: float | None = None) -> float:
        """ν = noise_scale · sqrt(ρ (1/n_new + 1/n_old)).

        The r expected from sampling noise alone between the current value (``last_samples``) and a
        new one from ``samples`` samples; 0 when any of them is unknown (the first refreshes) or
        ``noise_scale`` is 0.
        """
        self.settle_rho()
        n_new = samples if samples is not None else self.pending_samples
        n_old = self.last_samples
        rho = self.noise_rho
        if not self.noise_scale or rho is None or not n_new or not n_old or n_new <= 0 or n_old <= 0:
            return 0.0
        return self.noise_scale * math.sqrt(rho * (1.0 / n_new + 1.0 / n_old))

    def observe(self, step: int, ratio: float, samples: float | None = None) -> None:
        """Record a refresh at ``step`` whose relative change was ``ratio`` and set the next one.

        ``samples``: the global number of samples behind the new value (what the statistic was
        normalised by); without it, the count the block noted for this refresh is used.
        """
        n_new = samples if samples is not None else self.pending_samples
        floor = self.noise_floor(n_new)
        self.last_ratio, self.last_floor = ratio, floor
        self.last_samples, self.pending_samples = n_new, None
        if self.threshold is None:
            self.interval = 1
        elif math.isfinite(ratio) and ratio * ratio < self.threshold * self.threshold + floor * floor:
            self.interval = min(self.interval + 1, self.max_interval)
        else:
            self.interval = 1
        self.next_step = step + self.interval

    def postpone(self, step: int) -> None:
        """A refresh at ``step`` was lost (e.g. non-finite statistics): try again next step."""
        self.pending_samples = None
        self.next_step = step + 1

    def state(self) -> tuple[int, int]:
        """``(interval, next_step)``: what every rank must agree on."""
        return self.interval, self.next_step

    def load(self, state: tuple[int, int]) -> None:
        """Inverse of :meth:`state`."""
        self.interval, self.next_step = int(state[0]), int(state[1])
