"""One interface for the ways an SP-NGD step moves gradients to owners and updates back.

:class:`StepPath` is what :class:`~spngd_ds.optimizer.SPNGD` calls: ``step`` (from
``SPNGD.step``), and around DeepSpeed's engine step ``before_engine_step`` / ``after_engine_step``
(a step the engine skipped without calling the optimizer discards that step's statistics). The
opening every path shares (timers and byte count reset, finiteness and received-gradient flags
agreed over the ranks, the skip of a non-finite step) is :meth:`StepPath.open_step`.

:class:`StepOptimizer` is the optimizer as a path sees it: the public members of ``SPNGD`` that
paths (and :mod:`spngd_ds.paths.overlap`) use, and nothing private.

Why the imports point this way. The optimizer needs a path (its default, the fast path) and a path
needs the optimizer's math (refresh, precondition, update). One of the two must know the other
only by an interface. Here the paths know the optimizer only through the Protocol
:class:`StepOptimizer`, defined in this module, and never import :mod:`spngd_ds.optimizer`, not
even for type checking; ``optimizer.py`` imports the paths package (its default path,
:func:`spngd_ds.paths.default_path`, and the overlap functions). So the dependency is one edge,
optimizer -> paths, with no circle counting ``TYPE_CHECKING`` imports; ``SPNGD(model)`` works with
no path argument; and the interface the paths may use is written down in one place, checked by
mypy wherever ``SPNGD`` is handed to a path. The other direction (paths importing the optimizer,
the optimizer's default resolved through a registry) would leave ``SPNGD`` without a path until
something imports the paths package, an import order the user would have to know about.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import MutableMapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from spngd_ds.blocks import Block
from spngd_ds.capture import CurvatureCapture
from spngd_ds.comm import Communicator
from spngd_ds.config import SPNGDConfig
from spngd_ds.metrics import StepMetrics
from spngd_ds.reductions import any_rank_each, any_rank_each_and_sum
from spngd_ds.stat_exchange import Due


class StepOptimizer(Protocol):
    """The members of SPNGD that paths use.

    The public interface of :class:`~spngd_ds.optimizer.SPNGD` that paths use (see that class
    for each member's meaning).
    """

    #: set by a path: whether the step in progress was skipped (DeepSpeed's engine reads it)
    overflow: bool

    @property
    def config(self) -> SPNGDConfig:
        """The validated hyperparameters."""
        ...

    @property
    def comm(self) -> Communicator:
        """How the ranks talk."""
        ...

    @property
    def capture(self) -> CurvatureCapture:
        """The hooks that capture curvature statistics."""
        ...

    @property
    def stats_log(self) -> StepMetrics:
        """The step's timers and byte counts."""
        ...

    @property
    def blocks(self) -> dict[str, Block]:
        """Every curvature block, by layer name, in model order."""
        ...

    @property
    def assignment(self) -> dict[str, int]:
        """Block name -> the rank that owns it."""
        ...

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups."""
        ...

    @property
    def state(self) -> MutableMapping[Any, Any]:
        """The optimizer's per-parameter state (momentum buffers)."""
        ...

    @property
    def step_count(self) -> int:
        """Steps applied so far."""
        ...

    @property
    def model_parameters(self) -> list[nn.Parameter]:
        """The model's trainable parameters, in model order."""
        ...

    def live_parameters(self) -> dict[int, nn.Parameter]:
        """Map id(model parameter) -> the tensor the optimizer updates for it."""
        ...

    def owned(self) -> list[Block]:
        """The blocks this rank owns, in model order."""
        ...

    def set_owners(self, owners: dict[str, int]) -> None:
        """Replace the block -> owner map before the first step."""
        ...

    def received_gradient(self, params: list[nn.Parameter]) -> list[bool]:
        """Whether each parameter received a gradient on this rank during this step."""
        ...

    def due_now(self) -> list[Due]:
        """The (block, statistic) pairs due at this step, in block order."""
        ...

    def local_sample_counts(self, due: list[Due]) -> torch.Tensor:
        """This rank's sample count of each statistic of ``due``, (len(due),) float64."""
        ...

    def stop_capturing(self, stat: str) -> None:
        """Later forwards of this step capture no statistic named ``stat``."""
        ...

    def refresh_curvature(self, share_decisions: bool = True, sample_totals: torch.Tensor | None = None) -> list[Due]:
        """Reduce due statistics to owners, refresh and re-invert them; return the due pairs."""
        ...

    def share_decisions(self, due: list[Due]) -> None:
        """Send the owners' refresh decisions of ``due`` to every rank."""
        ...

    def decisions_exact_in(self, dtype: torch.dtype) -> bool:
        """Whether ``dtype`` holds every refresh decision of this step exactly."""
        ...

    def precondition_owned(self, grads: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """Return P(∇) of every owned block (block name -> tensors of its gradients' shapes)."""
        ...

    def momentum_update(self, p: torch.Tensor, direction: torch.Tensor, gi: int) -> None:
        """Rule 7 on ``p`` (any shape) of group ``gi`` with ``direction`` (its shape)."""
        ...

    def momentum_update_many(self, params: list[torch.Tensor], directions: list[torch.Tensor], gi: int) -> None:
        """Rule 7 on every parameter of ``params`` (all of group ``gi``), each with its direction."""
        ...

    def rescaled_blocks(self) -> list[Block]:
        """Blocks whose weight rule 8 rescales."""
        ...

    def rescale_target(self, weight: torch.Tensor) -> float:
        """Rule 8's bound sqrt(2·C_out) for a Conv2d/Linear weight."""
        ...

    def current_lrs(self) -> list[float]:
        """The learning rate of each parameter group now."""
        ...

    def skip_step(self, reason: str) -> None:
        """Skip this step: no update, its statistics discarded."""
        ...

    def finish_step(self, lrs: list[float] | None = None) -> None:
        """Advance the step counter; ``lrs``: each group's learning rate this step used."""
        ...


class StepPath(ABC):
    """How one optimizer step moves gradients to the owners of their blocks and updates back."""

    #: whether ``param_groups`` hold DeepSpeed's flat fp32 partitions instead of the model's tensors
    holds_flat_partitions: bool = False

    @abstractmethod
    def step(self, opt: StepOptimizer) -> None:
        """One step on the gradients of this step; called by ``SPNGD.step``."""

    @abstractmethod
    def before_engine_step(self, opt: StepOptimizer) -> None:
        """Called before DeepSpeed's engine steps at a gradient-accumulation boundary."""

    @abstractmethod
    def after_engine_step(self, opt: StepOptimizer) -> bool:
        """Report whether SP-NGD's step was applied.

        Called after DeepSpeed's engine stepped at a gradient-accumulation boundary. A step the
        engine skipped without calling the optimizer (fp16 overflow) is skipped here, its statistics
        discarded.
        """

    @abstractmethod
    def report_skipped(self, opt: StepOptimizer) -> None:
        """Tell whoever drives the step (DeepSpeed's engine) that this step was skipped."""

    def open_step(
        self, opt: StepOptimizer, local_bad: bool, params: list[nn.Parameter], with_sample_totals: bool = False
    ) -> tuple[dict[int, bool], torch.Tensor | None] | None:
        """Open a step the same way on every path.

        The opening every path shares: reset the step's timers and byte count; agree over the
        ranks (one small all-reduce) whether any rank's gradient is non-finite (``local_bad``, this
        rank's verdict) and which of ``params`` received a gradient on some rank; skip the step
        (:meth:`report_skipped`) when one is non-finite.

        Returns ``None`` for a skipped step, else id(parameter) -> received a gradient somewhere,
        and with ``with_sample_totals`` the due statistics' sample counts summed over the ranks in
        the same all-reduce ((len(due),) float64; ``None`` with one rank, where the statistics'
        own counts are the totals).
        """
        opt.overflow = False
        opt.stats_log.reset_timers()
        opt.comm.reset_bytes()
        flags: Sequence[bool] = [local_bad, *opt.received_gradient(params)]
        totals: torch.Tensor | None = None
        if with_sample_totals:
            if opt.comm.world_size > 1:
                with opt.stats_log.timer("comm"):  # the due statistics' sample counts in the same all-reduce
                    flags, totals = any_rank_each_and_sum(opt.comm, flags, opt.local_sample_counts(opt.due_now()))
        else:
            with opt.stats_log.timer("comm"):
                flags = any_rank_each(opt.comm, flags)
        if flags[0]:
            opt.skip_step("non-finite gradient")
            self.report_skipped(opt)
            return None
        return {id(p): f for p, f in zip(params, flags[1:], strict=True)}, totals
