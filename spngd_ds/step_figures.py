"""The figures SP-NGD logs after a step.

W&B keys ``spngd/...``, assembled from the optimizer's public state: what
:meth:`SPNGD.metrics <spngd_ds.optimizer.SPNGD.metrics>` returns.
"""

from __future__ import annotations

from typing import Any, Protocol

from spngd_ds.blocks import Block, KronBlock
from spngd_ds.capture import CurvatureCapture
from spngd_ds.metrics import StepMetrics
from spngd_ds.safety import OutlierGuard, SkipGuard


class Reported(Protocol):
    """The members of :class:`~spngd_ds.optimizer.SPNGD` the figures read (see there)."""

    @property
    def blocks(self) -> dict[str, Block]:
        """Every curvature block, by layer name, in model order."""
        ...

    @property
    def stats_log(self) -> StepMetrics:
        """The step's timers and byte counts."""
        ...

    @property
    def capture(self) -> CurvatureCapture:
        """The hooks that capture curvature statistics."""
        ...

    @property
    def outliers(self) -> OutlierGuard:
        """Rule 13's outlier rule memory."""
        ...

    @property
    def skips(self) -> SkipGuard:
        """Rule 13's consecutive-skip stop."""
        ...

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups."""
        ...

    @property
    def first_order_layers(self) -> list[str]:
        """Layers that take the first-order update (no curvature)."""
        ...

    @property
    def diagonal_factors(self) -> list[str]:
        """``<layer>.<factor>`` of every Kronecker factor kept diagonal."""
        ...

    @property
    def step_count(self) -> int:
        """Steps applied so far."""
        ...

    @property
    def damping(self) -> float:
        """The current λ."""
        ...

    @property
    def comm_nbytes(self) -> int:
        """Bytes this rank sent in the last step."""
        ...

    @property
    def last_clip_factor(self) -> float:
        """The clip factor of the last step (1.0 without clipping)."""
        ...

    @property
    def last_bound_factor(self) -> float:
        """Rule 13's factor ν of the last step (1.0 when the bound did not act)."""
        ...

    def owned(self) -> list[Block]:
        """The blocks this rank owns, in model order."""
        ...

    def curvature_nbytes(self) -> int:
        """Bytes of statistics and inverses held on this rank."""
        ...


def step_figures(opt: Reported, refreshed: int) -> dict[str, float]:
    """Return the figures of the last step to log.

    The figures to log, all plain floats; ``refreshed``: how many statistics were due at the
    last step (``spngd/refresh_fraction`` is its share of all statistics).
    """
    schedules = [s.schedule for b in opt.blocks.values() for s in b.stats.values()]
    pis = [b.pi for b in opt.owned() if isinstance(b, KronBlock) and b.stats["A"].value is not None]
    m = opt.stats_log
    out = {
        "spngd/damping": opt.damping,
        "spngd/lr": float(opt.param_groups[0]["lr"]),
        "spngd/pi_mean": float(sum(pis) / len(pis)) if pis else 1.0,
        "spngd/refresh_fraction": refreshed / len(schedules) if schedules else 0.0,
        "spngd/mean_interval": float(sum(s.interval for s in schedules) / len(schedules)) if schedules else 0.0,
        "spngd/inversion_failures": float(m.inversion_failures),
        "spngd/bn_channel_failures": float(m.bn_channel_failures),
        "spngd/nonfinite_stats": float(m.nonfinite_stats),
        "spngd/rejected_stats": float(m.rejected_stats),
        "spngd/skipped_steps": float(m.skipped_steps),
        "spngd/comm_bytes": float(opt.comm_nbytes),
        "spngd/curvature_bytes": float(opt.curvature_nbytes()),
        "spngd/time_capture": float(opt.capture.last_seconds),
        "spngd/first_order_layers": float(len(opt.first_order_layers) + never_captured(opt)),
        "spngd/clip_factor": float(opt.last_clip_factor),
        "spngd/step_bound_factor": float(opt.last_bound_factor),
        "spngd/accepted_after_rejections": float(opt.outliers.accepted_after_rejections),
        "spngd/accepted_after_collapse": float(opt.outliers.recovered),
        "spngd/consecutive_skips": float(opt.skips.consecutive),
        "spngd/factors_sent_early": float(m.factors_sent_early),
        "spngd/diagonal_factors": float(len(opt.diagonal_factors)),
    }
    for key in ("comm", "inversion", "precondition"):
        out[f"spngd/time_{key}"] = float(m.timers.get(key, 0.0))
    return out


def never_captured(opt: Reported) -> int:
    """Blocks with statistics of which this rank has never captured one (after a first step)."""
    if opt.step_count == 0:
        return 0
    return sum(1 for b in opt.blocks.values() if b.stats and all(s.captures == 0 for s in b.stats.values()))
