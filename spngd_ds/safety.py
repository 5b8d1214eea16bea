"""Rule 13: a step that cannot blow up (docs/design.md §2).

Three guards, each one idea:

- :func:`step_bound` -- the preconditioned step may not be longer than the loss allows. Along
  the gradient, the first-order model of the loss reaches 0 at distance L / ‖∇‖ (the Polyak step
  length of a loss bounded below by 0: cross-entropy, squared error); every layer's P(∇) is scaled
  by ν = min(1, step_bound · L / (η ‖P(∇)‖ ‖∇‖)), norms over all layers of all ranks, so that the
  step η ν ‖P(∇)‖ is at most ``step_bound`` times that distance (and its predicted decrease
  η ν ⟨P(∇), ∇⟩ at most ``step_bound`` · L). The bound does not trust P: when the preconditioner
  is too large by any factor or points off the gradient (damping far too small; a statistic that
  collapsed at zero loss, where the empirical Fisher falls like L² while the curvature falls like
  L; a stale inverse), the bounded step is the same. A KL clip (kfac-pytorch) measures the step in
  P's own metric and lets exactly those steps through. L is the loss the optimizer observed for
  the step (``step(closure)``, :meth:`SPNGD.observe_loss`, DeepSpeed's ``engine.backward``),
  averaged over ranks; without one, or with L <= 0, ν = 1. The sums ride one all-reduce, shared
  with ``clip_norm``'s, and ν is computed on the device.
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
    lr: float,
    bound: float | None,
    loss: torch.Tensor | None,
    clip_norm: float | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The factors that scale the owned preconditioned gradients, as 0-dim float64 device tensors.

    Args:
        comm: the communicator (the sums run over every rank's owned blocks: one all-reduce).
        directions: block name -> P(∇) of each parameter (this rank's owned blocks).
        grads: block name -> ∇ of each parameter, same shapes as ``directions``.
        lr: η of the step (the learning rate the update uses).
        bound: ``step_bound`` c (``None``: no bound).
        loss: this rank's observed loss of the step (0-dim), or ``None``.
        clip_norm: the limit on the global L2 norm of every direction after ν (``None``: none).

    Returns:
        ``(bound_factor, norm_factor)``: ν = min(1, c L / (η ‖P(∇)‖ ‖∇‖)) with L the mean over ranks
        of their losses (1 when a rank observed none, L <= 0, or the product is not positive and
        finite), and min(1, clip_norm / ‖ν P(∇)‖); ``None`` for one that is off.
    """
    if bound is None and clip_norm is None:
        return None, None
    device = comm.device
    zero = torch.zeros((), dtype=torch.float64, device=device)

    def squares(ts: list[torch.Tensor]) -> torch.Tensor:  # Σ ‖t‖², one multi-tensor norm
        ts = [t for t in ts if t.numel() > 0]
        if not ts:
            return zero
        return torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float64)).square().sum().to(device)

    sq = squares([d for ds in directions.values() for d in ds])
    gsq = squares([g for name in directions for g in grads[name]]) if bound is not None else zero
    seen = zero + (1.0 if loss is not None else 0.0)
    value = loss.detach().to(device, torch.float64).reshape(()) if loss is not None else zero
    sums = all_reduce_sum(comm, torch.stack([sq, gsq, value, seen]))
    one = torch.ones((), dtype=torch.float64, device=device)
    nu = norm = None
    if bound is not None:
        mean_loss = sums[2] / comm.world_size
        predicted = torch.sqrt(sums[0] * sums[1]) * lr
        ok = (
            (sums[3] == comm.world_size)
            & torch.isfinite(predicted)
            & (predicted > 0)
            & torch.isfinite(mean_loss)
            & (mean_loss > 0)
        )
        nu = torch.where(ok, torch.clamp(bound * mean_loss / torch.where(ok, predicted, one), max=1.0), one)
    if clip_norm is not None:
        scale = nu if nu is not None else one
        total = torch.sqrt(sums[0]) * scale
        ok = torch.isfinite(total) & (total > 0)
        norm = torch.where(ok, torch.clamp(clip_norm / torch.where(ok, total, one), max=1.0), one)
    return nu, norm


@dataclass
class OutlierGuard:
    """Per-statistic memory of the outlier rule (owner side): the peak norm of accepted values.

    It works on the norms the owner reads back once per refresh step with the other decision
    figures, so it adds no host synchronisation. Counters (cumulative): ``rejected`` (jumps above
    every scale seen, rejected), ``recovered`` (jumps back to a scale seen before, accepted),
    ``accepted_after_rejections`` (values accepted because ``MAX_REJECTIONS`` rejections in a row
    preceded them).
    """

    peaks: dict[int, float] = field(default_factory=dict)
    rejected: int = 0
    recovered: int = 0
    accepted_after_rejections: int = 0

    def accepted(self, key: int, norm: float) -> None:
        """Record an accepted value of the statistic ``key`` by its Frobenius norm."""
        peak = self.peaks.get(key)
        self.peaks[key] = norm if peak is None or not math.isfinite(peak) else max(peak, norm)

    def judge(self, key: int, ratio: float, new_norm: float, old_norm: float, rejections: int) -> str:
        """The verdict on a refresh of statistic ``key`` whose relative change is ``ratio``.

        ``"accept"``, ``"recover"`` (accept: a return to a scale seen before), ``"force"`` (accept
        after ``MAX_REJECTIONS`` rejections) or ``"reject"``, for a refresh of the statistic ``key``
        whose relative change is ``ratio``, from a value of norm ``old_norm`` to one of norm
        ``new_norm``.
        """
        if ratio <= EXPLOSION_RATIO:
            return "accept"
        if rejections >= MAX_REJECTIONS:
            self.accepted_after_rejections += 1
            return "force"
        if new_norm <= self.peaks.get(key, old_norm):
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
    pending_sum: torch.Tensor | None = None
    pending_count: int = 0
    last_loss: torch.Tensor | None = None
    last_loss_step: int | None = None

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """A loss of the step in progress (a tensor is detached, never read here).

        Several (micro-batches) are averaged.
        """
        value = loss.detach().double().mean() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        self.pending_sum = value if self.pending_sum is None else self.pending_sum + value
        self.pending_count += 1
        self.pending_loss = self.pending_sum / self.pending_count

    def _clear_pending(self) -> None:
        self.pending_loss, self.pending_sum, self.pending_count = None, None, 0

    def applied(self, step: int) -> None:
        """Step ``step`` was applied: the skip count restarts, its loss becomes the last finite one."""
        self.consecutive = 0
        self.causes.clear()
        if self.pending_loss is not None:
            self.last_loss, self.last_loss_step = self.pending_loss, step
        self._clear_pending()

    def skipped(self, step: int, reason: str, lr: float, damping: float) -> None:
        """Record a step skipped for ``reason``; raise at the limit.

        A step was skipped for ``reason`` (``step``: the optimizer's step count, which a skipped
        step does not advance); raises :class:`TrainingStalledError` at the limit.
        """
        self._clear_pending()
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
            f"SPNGD: {self.consecutive} consecutive steps skipped since step {step} ({causes}); {loss}. "
            f"The run cannot go on: every update is non-finite. Lower lr (now {lr:g}) or raise damping "
            f"(now {damping:g}), check the data and the model's forward for NaN/Inf, or set "
            "max_consecutive_skips to null to keep skipping"
        )
