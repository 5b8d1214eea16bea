"""Rule 13: a step that cannot blow up (DESIGN.md §2).

Three guards, each one idea:

- :func:`step_bound` -- the KL clip of the preconditioned step (kfac-pytorch's ``kl_clip``):
  with Δθ = -η P(∇) the quadratic model of the KL divergence between the predictive distributions
  before and after the step is ½ η² Σ_layers ⟨P(∇), ∇⟩; the preconditioned gradient of every layer
  with curvature is scaled by ν = min(1, sqrt(kl_clip / (η² Σ ⟨P(∇), ∇⟩))). The sum runs over
  every rank's owned blocks (one all-reduce, shared with ``clip_norm``'s), and ν is computed on the
  device. The step's size is measured in the metric the preconditioner itself defines, so the bound
  leaves a well-scaled natural-gradient step alone and acts on a step that is large in that
  metric (lr too high, a gradient far above what the curvature has seen).
- :class:`OutlierGuard` -- when a refreshed statistic is rejected as an outlier (relative change
  above ``EXPLOSION_RATIO``), but its new norm is no larger than a scale the statistic has had
  before (the peak norm of its accepted values), the jump is a return from a collapse (the
  gradients vanished at zero loss and grow again), not a corrupted batch: it is accepted, so the
  inverse of the collapsed statistic does not stay in charge while the gradients grow. A jump
  above every scale seen is rejected, at most ``MAX_REJECTIONS`` times in a row.
- :class:`SkipGuard` -- ``max_consecutive_skips`` skipped steps in a row stop the run with
  :class:`TrainingStalledError`, naming the cause, the step, the last finite loss and what to
  change. Every rank skips the same steps (the decision is agreed), so every rank raises at the
  same step, before any further collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from spngd_ds.comm import Communicator
from spngd_ds.reductions import all_reduce_sum

# A refreshed statistic whose relative change ||X_new - X_old|| / ||X_old|| exceeds this is an outlier
# (a corrupted batch, an overflow that stayed finite) unless it returns to a scale seen before.
EXPLOSION_RATIO = 1e6
# consecutive rejections of one statistic after which the next value is accepted whatever it is
MAX_REJECTIONS = 3


class TrainingStalledError(RuntimeError):
    """Raised on every rank when ``max_consecutive_skips`` steps in a row were skipped."""


def step_bound(
    comm: Communicator,
    directions: dict[str, list[torch.Tensor]],
    grads: dict[str, list[torch.Tensor]],
    curved: set[str],
    lr: float,
    kl_clip: float | None,
    clip_norm: float | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The factors that scale the owned preconditioned gradients, as 0-dim float64 device tensors.

    Args:
        comm: the communicator (the sums run over every rank's owned blocks: one all-reduce).
        directions: block name -> P(∇) of each parameter (this rank's owned blocks).
        grads: block name -> ∇ of each parameter, same shapes as ``directions``.
        curved: the names of the blocks with curvature (the KL sum and ν cover these only; the
            others take the plain gradient, as in kfac-pytorch).
        lr: η of the step (the learning rate the update uses).
        kl_clip: the KL bound (``None``: no KL clip).
        clip_norm: the limit on the global L2 norm of every direction after the KL clip
            (``None``: none).

    Returns:
        ``(kl_factor, norm_factor)``: ν, for the blocks in ``curved``, and
        min(1, clip_norm / ‖P(∇) after ν‖), for every block; ``None`` for one that is off. A
        non-positive or non-finite sum leaves its factor at 1.
    """
    if kl_clip is None and clip_norm is None:
        return None, None
    device = comm.device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sq_curved, sq_plain, vg = zero, zero, zero
    for name, ds in directions.items():
        sq = torch.stack([torch.sum(d.double() ** 2) for d in ds]).sum().to(device) if ds else zero
        if name in curved:
            sq_curved = sq_curved + sq
            if kl_clip is not None and ds:
                vg = vg + torch.stack(
                    [torch.sum(d.double() * g.double()) for d, g in zip(ds, grads[name], strict=True)]
                ).sum().to(device)
        else:
            sq_plain = sq_plain + sq
    sums = all_reduce_sum(comm, torch.stack([sq_curved, sq_plain, vg]))
    one = torch.ones((), dtype=torch.float64, device=device)
    kl = norm = None
    if kl_clip is not None:
        quad = sums[2] * (lr * lr)
        ok = torch.isfinite(quad) & (quad > 0)
        kl = torch.where(ok, torch.clamp(torch.sqrt(kl_clip / torch.where(ok, quad, one)), max=1.0), one)
    if clip_norm is not None:
        nu = kl if kl is not None else one
        total = torch.sqrt(sums[0] * nu * nu + sums[1])
        ok = torch.isfinite(total) & (total > 0)
        norm = torch.where(ok, torch.clamp(clip_norm / torch.where(ok, total, one), max=1.0), one)
    return kl, norm


@dataclass
class OutlierGuard:
    """Per-statistic memory of the outlier rule (owner side): the peak norm of accepted values.

    Counters (cumulative): ``rejected`` (jumps above every scale seen, rejected), ``recovered``
    (jumps back to a scale seen before, accepted), ``accepted_after_rejections`` (values accepted
    because ``MAX_REJECTIONS`` rejections in a row preceded them).
    """

    peaks: dict[int, torch.Tensor] = field(default_factory=dict)
    rejected: int = 0
    recovered: int = 0
    accepted_after_rejections: int = 0

    def accepted(self, key: int, value: torch.Tensor) -> None:
        """Record an accepted value (no host synchronisation: the peak stays on the device)."""
        norm = torch.linalg.vector_norm(value.double())
        peak = self.peaks.get(key)
        self.peaks[key] = norm if peak is None else torch.maximum(peak, norm)

    def judge(self, key: int, old: torch.Tensor, new: torch.Tensor, ratio: float, rejections: int) -> str:
        """``"accept"``, ``"recover"`` (accept: a return to a scale seen before), ``"force"``
        (accept after ``MAX_REJECTIONS`` rejections) or ``"reject"``, for a refresh from ``old`` to
        ``new`` whose relative change is ``ratio``; ``key`` names the statistic. Reads the device
        only when ``ratio`` is above ``EXPLOSION_RATIO``."""
        if ratio <= EXPLOSION_RATIO:
            return "accept"
        if rejections >= MAX_REJECTIONS:
            self.accepted_after_rejections += 1
            return "force"
        peak = self.peaks.get(key)
        peak_norm = float(peak) if peak is not None else float(torch.linalg.vector_norm(old.double()))
        if float(torch.linalg.vector_norm(new.double())) <= peak_norm:
            self.recovered += 1
            return "recover"
        self.rejected += 1
        return "reject"


@dataclass
class SkipGuard:
    """Counts consecutive skipped steps and keeps the loss of the last applied step.

    ``limit``: skipped steps in a row that stop the run (``None``: never). The loss is kept as the
    tensor handed to :meth:`observe_loss` (no host synchronisation) and read only when stopping.
    """

    limit: int | None
    consecutive: int = 0
    causes: dict[str, int] = field(default_factory=dict)
    pending_loss: torch.Tensor | None = None
    last_loss: torch.Tensor | None = None
    last_loss_step: int | None = None

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """The loss of the step in progress (a tensor is detached, never read here)."""
        self.pending_loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))

    def applied(self, step: int) -> None:
        """Step ``step`` was applied: the skip count restarts, its loss becomes the last finite one."""
        self.consecutive = 0
        self.causes.clear()
        if self.pending_loss is not None:
            self.last_loss, self.last_loss_step, self.pending_loss = self.pending_loss, step, None

    def skipped(self, step: int, reason: str, lr: float, damping: float) -> None:
        """Step ``step`` was skipped for ``reason``; raises :class:`TrainingStalledError` at the limit."""
        self.pending_loss = None
        self.consecutive += 1
        self.causes[reason] = self.causes.get(reason, 0) + 1
        if self.limit is None or self.consecutive < self.limit:
            return
        causes = ", ".join(f"{c} ({n}x)" for c, n in sorted(self.causes.items(), key=lambda kv: -kv[1]))
        if self.last_loss is not None:
            value = float(self.last_loss.float().mean())
            shown = f"{value:.6g}" if math.isfinite(value) else "non-finite"
            loss = f"the loss of the last applied step ({self.last_loss_step}) was {shown}"
        else:
            loss = "no loss was observed (pass a closure to step(), or call observe_loss(loss))"
        raise TrainingStalledError(
            f"SPNGD: {self.consecutive} consecutive steps skipped, up to step {step} ({causes}); {loss}. "
            f"The run cannot go on: every update is non-finite. Lower lr (now {lr:g}) or raise damping "
            f"(now {damping:g}), check the data and the model's forward for NaN/Inf, or set "
            "max_consecutive_skips to null to keep skipping"
        )
