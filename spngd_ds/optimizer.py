"""The SP-NGD optimizer: rules 5-8 on the blocks this rank owns (docs/design.md §2-§3).

:class:`SPNGD` holds the curvature blocks, their owners, the capture hooks and the math of one
step: refreshing and inverting due statistics, preconditioning owned gradients, clipping the
preconditioned update by its global norm, momentum SGD with momentum correction, and weight
rescaling. *How* gradients reach owners and updates come back is the job of a path object
(:mod:`spngd_ds.paths`), given to the constructor or set by :func:`spngd_ds.initialize`: the fast
path (standalone and ZeRO stage 0, the default) or the ZeRO-compatible path. ``step()`` hands
over to the path, which uses only the public methods listed by
:class:`spngd_ds.paths.base.StepOptimizer`. The pieces of a refresh live in their own modules:
the exchange of statistics (:mod:`spngd_ds.stat_exchange`), their acceptance and inversion
(:mod:`spngd_ds.refresh`), the owners' decisions (:mod:`spngd_ds.decisions`).

With the default :class:`~spngd_ds.comm.Communicator` the world has one rank and the optimizer is
an ordinary ``torch.optim.Optimizer``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from spngd_ds import decisions
from spngd_ds.assignment import assign_owners, block_cost
from spngd_ds.blocks import Block, BlockOptions, KronBlock, build_blocks
from spngd_ds.blocks.batched import BatchedPreconditioner
from spngd_ds.blocks.shapes import full_shape
from spngd_ds.capture import CurvatureCapture
from spngd_ds.comm import Communicator
from spngd_ds.config import DEFAULT_STALENESS, SPNGDConfig, validate_spngd_params
from spngd_ds.metrics import StepMetrics
from spngd_ds.momentum import apply_momentum
from spngd_ds.optimizer_state import load_state, save_state
from spngd_ds.paths import default_path
from spngd_ds.paths.base import StepPath
from spngd_ds.paths.overlap import can_send_early, send_factors_early, worth_sending_early
from spngd_ds.refresh import invert_refreshed, take_refreshes
from spngd_ds.safety import EXPLOSION_RATIO, MAX_REJECTIONS, OutlierGuard, SkipGuard, step_bound
from spngd_ds.staleness import RefreshSchedule
from spngd_ds.stat_exchange import Due, EarlyFactors, statistics_to_owners
from spngd_ds.step_figures import step_figures

logger = logging.getLogger("spngd_ds")

_DEFAULT: Any = object()

# the outlier rule's constants (spngd_ds.safety), importable from here
__all__ = ["EXPLOSION_RATIO", "MAX_REJECTIONS", "SPNGD"]


class SPNGD(Optimizer):
    """Scalable and Practical Natural Gradient Descent (Osawa et al., TPAMI 2020).

    K-FAC for nn.Linear and nn.Conv2d (groups=1), unit-wise natural gradient for affine BatchNorm,
    plain momentum SGD for every other trainable parameter. The optimizer registers its own hooks
    on ``model``; the training loop stays ``loss.backward(); opt.step(); opt.zero_grad()``, with
    ``loss`` the mean of per-sample losses over the batch.

    Args:
        model: the model whose trainable parameters are optimised.
        lr: learning rate η (>= 0).
        momentum: m in [0, 1); momentum correction m·η_t/η_{t-1} is applied when η changes.
        damping: λ > 0 (rule 5); BatchNorm uses ``bn_damping_scale``·λ.
        weight_decay: wd >= 0, added to the preconditioned gradient (rule 7).
        fisher: "empirical" (true labels) or "mc" (one sampled label per input, needs logits (N, C)).
        bn_damping_scale: factor on λ for BatchNorm blocks.
        weight_rescale: rule 8 for Linear/Conv2d weights that feed a BatchNorm.
        staleness: ``{"threshold": float, "max_interval": int}`` (rule 6) or ``None`` (every step).
        comm_dtype: "fp32", "bf16" or "fp16": dtype of statistics on the wire.
        stat_micro_batches: capture statistics from the first k forwards of a step only (default 1:
            with gradient accumulation, the first micro-batch of each rank; ``None``: every forward,
            which makes k micro-batches exactly one batch of k times the size, at k times the capture).
        clip_norm: scale the preconditioned gradient of all layers (before weight decay) by
            min(1, clip_norm / its global L2 norm over all ranks); ``None``: no clipping.
        overlap_statistics: start sending due A factors to their owners as soon as the forwards
            that capture them have run, behind the backward (:mod:`spngd_ds.paths.overlap`); ``"auto"``:
            always on an accelerator; on the CPU only when forwards of the step follow the one that
            completes A (there the exchange competes with the backward for the same cores).
        a_samples: A (the input covariance of a Linear/Conv2d) from at most the first this-many
            samples of each capturing micro-batch on each rank; ``None`` (default): all of them.
            A is the capture's costliest part (one micro-batch's exact A Gram costs about its
            forward and backward on a CPU), and its sampling noise is the smallest of the
            statistics'; G and BatchNorm's F always use every sample.
        step_bound: rule 13's bound c on a step (:func:`spngd_ds.safety.step_bound`): every layer's
            preconditioned gradient is scaled by min(1, c·L / (lr ‖P(∇)‖ ‖∇‖)), L the loss observed
            for the step (``step(closure)``, :meth:`observe_loss`, DeepSpeed's ``engine.backward``),
            norms over all layers of all ranks; ``None`` or 0: the paper's update, unbounded.
        max_consecutive_skips: this many skipped steps in a row (non-finite gradients, overflows)
            raise :class:`spngd_ds.safety.TrainingStalledError` on every rank; ``None`` or 0: never.
        positions_as_samples: rule 10: every position of a Linear, HF Conv1D, Embedding, LayerNorm or
            RMSNorm applied over (N, T, ...) inputs is a sample (n = N·T, the per-token Fisher of a
            token-mean loss; lr and damping carry over between sequence lengths); ``False``: the
            sequence is the sample (n = N), for losses per sequence. Conv2d always counts images.
        curvature_conv1d, curvature_norm, curvature_embedding: give HF Conv1D layers (Kronecker),
            LayerNorm/RMSNorm (unit-wise, rule 11) and untied nn.Embedding (rule 12) a curvature
            block; ``False``: that kind takes the first-order update.
        max_factor_dim: a Kronecker factor of a larger dimension is kept diagonal (d instead of d²
            elements; a Conv2d with one goes first order); ``None``: no limit.
        communicator: how ranks talk (default: one rank). Set by :func:`spngd_ds.initialize`.
        path: how a step moves gradients to owners and updates back (:mod:`spngd_ds.paths`;
            default :func:`spngd_ds.paths.default_path`, the fast path). :func:`spngd_ds.initialize`
            replaces it by the path its engine needs.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        damping: float = 2.5e-4,
        weight_decay: float = 0.0,
        fisher: str = "empirical",
        bn_damping_scale: float = 64.0,
        weight_rescale: bool = False,
        staleness: dict[str, Any] | None = _DEFAULT,
        comm_dtype: str = "fp32",
        stat_micro_batches: int | None = 1,
        clip_norm: float | None = None,
        overlap_statistics: bool | str = "auto",
        a_samples: int | None = None,
        step_bound: float | None = 1.0,
        max_consecutive_skips: int | None = 50,
        positions_as_samples: bool = True,
        curvature_conv1d: bool = True,
        curvature_norm: bool = True,
        curvature_embedding: bool = True,
        max_factor_dim: int | None = 16384,
        *,
        communicator: Communicator | None = None,
        path: StepPath | None = None,
    ) -> None:
        """Build the blocks and hooks on ``model`` (arguments: see the class)."""
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"SPNGD takes the model (an nn.Module) as its first argument, got {type(model).__name__}: "
                "it needs the layers to register its hooks"
            )
        params_in = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            weight_decay=weight_decay,
            fisher=fisher,
            bn_damping_scale=bn_damping_scale,
            weight_rescale=weight_rescale,
            staleness=DEFAULT_STALENESS if staleness is _DEFAULT else staleness,
            comm_dtype=comm_dtype,
            stat_micro_batches=stat_micro_batches,
            clip_norm=clip_norm,
            overlap_statistics=overlap_statistics,
            a_samples=a_samples,
            step_bound=step_bound,
            max_consecutive_skips=max_consecutive_skips,
            positions_as_samples=positions_as_samples,
            curvature_conv1d=curvature_conv1d,
            curvature_norm=curvature_norm,
            curvature_embedding=curvature_embedding,
            max_factor_dim=max_factor_dim,
        )
        self.config: SPNGDConfig = validate_spngd_params(params_in)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("SPNGD: the model has no trainable parameters")
        cfg = self.config
        super().__init__(
            params, dict(lr=cfg.lr, momentum=cfg.momentum, damping=cfg.damping, weight_decay=cfg.weight_decay)
        )
        self.model = model
        self._params = params
        options = BlockOptions(
            positions_as_samples=cfg.positions_as_samples,
            curvature_conv1d=cfg.curvature_conv1d,
            curvature_norm=cfg.curvature_norm,
            curvature_embedding=cfg.curvature_embedding,
            max_factor_dim=cfg.max_factor_dim,
        )
        block_list, fallback = build_blocks(model, self._new_schedule, cfg.bn_damping_scale, options)
        self.first_order_layers = fallback
        if fallback:
            logger.warning(
                "SPNGD: first-order update (no curvature) for %d layer(s): %s", len(fallback), "; ".join(fallback)
            )
        self.blocks: dict[str, Block] = {b.name: b for b in block_list}
        #: "<layer>.<factor>" of every factor kept diagonal (max_factor_dim; an Embedding's A aside)
        self.diagonal_factors = [
            f"{b.name}.{n}"
            for b in block_list
            for n in sorted(getattr(b, "diagonal", ()))
            if b.kind != "embedding" or n != "A"
        ]
        if self.diagonal_factors:
            logger.warning(
                "SPNGD: %d Kronecker factor(s) larger than max_factor_dim = %s kept diagonal: %s",
                len(self.diagonal_factors),
                cfg.max_factor_dim,
                ", ".join(self.diagonal_factors),
            )
        for b in block_list:
            if isinstance(b, KronBlock):
                b.a_samples = cfg.a_samples
        # standalone: the world of one rank lives where the model does
        self.comm = communicator or Communicator(device=params[0].device)
        self.assignment: dict[str, int] = assign_owners([block_cost(b) for b in block_list], self.comm.world_size)
        self.capture = CurvatureCapture(model, block_list, cfg.fisher)
        self.capture.stat_micro_batches = cfg.stat_micro_batches
        self.stats_log = StepMetrics(device=params[0].device)
        self._batched = BatchedPreconditioner()
        self.step_count = 0
        self.path: StepPath = path if path is not None else default_path()
        #: read by DeepSpeed's engine after ``step()``: True when the step was skipped
        self.overflow = False
        self._last_clip_factor: float | torch.Tensor = 1.0
        self._last_bound_factor: float | torch.Tensor = 1.0
        #: rule 13: the outlier rule's memory and the consecutive-skip stop (spngd_ds.safety)
        self.outliers = OutlierGuard()
        self.skips = SkipGuard(limit=cfg.max_consecutive_skips or None)
        self._held = False
        self._prev_lr: list[float | None] = [None for _ in self.param_groups]
        self._last_refreshed = 0
        self._never_captured_warned: set[str] = set()
        #: due A factors whose exchange started behind the backward (spngd_ds.paths.overlap)
        self._early: EarlyFactors | None = None
        if can_send_early(self):
            self.capture.on_factors_complete = self._factors_complete
        self.capture.start_step(self._due(0))

    # -- construction helpers -----------------------------------------------------------------------
    def _new_schedule(self) -> RefreshSchedule:
        st = self.config.staleness
        if st is None:
            return RefreshSchedule(threshold=None)
        return RefreshSchedule(threshold=st.threshold, max_interval=st.max_interval, noise_scale=st.noise_scale)

    def _due(self, step: int) -> dict[str, set[str]]:
        return {
            b.name: {n for n, s in b.stats.items() if s.schedule.is_due(step)} for b in self.blocks.values() if b.stats
        }

    def set_owners(self, owners: dict[str, int]) -> None:
        """Replace the block -> owner map before the first step (the same map on every rank)."""
        if set(owners) != set(self.blocks) or any(not 0 <= r < self.comm.world_size for r in owners.values()):
            raise ValueError("SPNGD.set_owners: needs every block exactly once, owners in range(world_size)")
        if self.step_count or any(s.value is not None for b in self.blocks.values() for s in b.stats.values()):
            raise RuntimeError("SPNGD.set_owners: owners can only change before the first step")
        self.assignment = dict(owners)

    def _factors_complete(self) -> None:
        """The capture's signal that this step's A factors are complete: start sending them."""
        if self._early is None and not self._held and worth_sending_early(self):
            self._early = send_factors_early(self)

    def _take_early(self) -> EarlyFactors | None:
        early, self._early = self._early, None
        return early

    def owned(self) -> list[Block]:
        """The blocks this rank owns, in model order."""
        return [b for b in self.blocks.values() if self.assignment[b.name] == self.comm.rank]

    @property
    def model_parameters(self) -> list[nn.Parameter]:
        """The model's trainable parameters, in model order (what the blocks' ``params`` hold)."""
        return self._params

    def stop_capturing(self, stat: str) -> None:
        """Later forwards of this step capture no statistic named ``stat`` (e.g. "A", once sent)."""
        self.capture.due = {name: names - {stat} for name, names in self.capture.due.items()}

    def live_parameters(self) -> dict[int, nn.Parameter]:
        """Map id(model parameter) -> the tensor the optimizer updates for it.

        DeepSpeed at stage 0 with bf16/fp16 replaces the groups' parameters by fp32 copies, in the
        same order and shapes; map by position. Raises if the groups no longer line up.
        """
        live = [p for g in self.param_groups for p in g["params"]]
        if len(live) != len(self._params) or any(a.shape != b.shape for a, b in zip(live, self._params, strict=True)):
            raise RuntimeError(
                "SPNGD: the optimizer's parameters no longer match the model's (flat ZeRO partitions?); "
                "use spngd_ds.initialize, which switches SP-NGD to its ZeRO-compatible path"
            )
        return {id(m): p for m, p in zip(self._params, live, strict=True)}

    @property
    def damping(self) -> float:
        """The current λ (first parameter group; a schedule may change it)."""
        return float(self.param_groups[0]["damping"])

    # -- the step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SP-NGD step on the gradients of this step (the path decides where they come from)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if isinstance(loss, torch.Tensor):
                self.observe_loss(loss)
        if not self._held:
            self.path.step(self)
        return loss

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Keep the loss of the step in progress: rule 13's L, and for the stalled-run error.

        ``step(closure)`` and DeepSpeed's ``engine.backward`` call it; a plain loop may. A step that
        observed no loss is not bounded (``step_bound``); the loss is not read otherwise.
        """
        self.skips.observe_loss(loss)

    @contextlib.contextmanager
    def hold_steps(self) -> Iterator[None]:
        """Make ``step()`` do nothing inside this block (DeepSpeed's bf16 wrapper's zero-gradient step)."""
        self._held = True
        try:
            yield
        finally:
            self._held = False

    def skip_step(self, reason: str) -> None:
        """Skip this step entirely: no update, and this step's statistics are discarded."""
        self.stats_log.skipped_steps += 1
        logger.warning(
            "SPNGD: step %d skipped (%s); its statistics and BatchNorm running statistics discarded",
            self.step_count,
            reason,
        )
        self.capture.restore_batchnorm()
        early = self._take_early()
        if early is not None:  # every rank skips this step: every rank finishes the exchange
            early.pending.wait()
        for b in self.blocks.values():
            for s in b.stats.values():
                s.take_local()
        self.capture.start_step(self._due(self.step_count))
        # every rank skips the same steps, so every rank stops at the same one
        self.skips.skipped(self.step_count, reason, float(self.param_groups[0]["lr"]), self.damping)

    def finish_step(self, lrs: list[float] | None = None) -> None:
        """Advance the step counter; ``lrs``: each group's learning rate this step used (rule 7's lr_prev)."""
        self._prev_lr = list(lrs if lrs is not None else self.current_lrs())
        self.skips.applied(self.step_count)
        self.step_count += 1
        self.capture.start_step(self._due(self.step_count))

    def current_lrs(self) -> list[float]:
        """The learning rate of each parameter group now."""
        return [float(g["lr"]) for g in self.param_groups]

    def received_gradient(self, params: list[nn.Parameter]) -> list[bool]:
        """Whether each parameter received a gradient on this rank during this step."""
        got = self.capture.got_grad
        return [id(p) in got or p.grad is not None for p in params]

    # -- statistics -----------------------------------------------------------------------------------
    def due_now(self) -> list[Due]:
        """The (block, statistic) pairs due at this step, in block order (the same on every rank)."""
        step = self.step_count
        return [(b, s) for b in self.blocks.values() for s in b.stats.values() if s.schedule.is_due(step)]

    def local_sample_counts(self, due: list[Due]) -> torch.Tensor:
        """Return this rank's sample count of each statistic of ``due``, (len(due),) float64.

        On the communicator's device; an A factor already sent behind the backward counts what it was sent with.
        """
        early = (
            {id(s): c for (_, s), c in zip(self._early.stats, self._early.counts, strict=True)}
            if self._early is not None
            else {}
        )
        return torch.tensor(
            [early.get(id(s), s.local_count) for _, s in due], dtype=torch.float64, device=self.comm.device
        )

    def refresh_curvature(self, share_decisions: bool = True, sample_totals: torch.Tensor | None = None) -> list[Due]:
        """Reduce due statistics to owners, refresh and re-invert them, share refresh decisions.

        Returns the due (block, statistic) pairs, in the order every rank agrees on. With
        ``share_decisions=False`` the owners' decisions are left for the caller to send with its
        gathered update (docs/design.md rule 6; the fast path: :mod:`spngd_ds.decisions`) before the next step.

        Sample counts are summed over all ranks first (one small all-reduce, unless the caller
        summed :meth:`local_sample_counts` already and gives ``sample_totals``), so that fp16
        statistics can be pre-scaled by the global count: exact whatever each rank's share of the
        samples.
        """
        step, due = self.step_count, self.due_now()
        self._last_refreshed = len(due)
        arrived = statistics_to_owners(
            self.comm,
            self.assignment,
            self.config.comm_dtype,
            self.stats_log,
            due,
            sample_totals,
            self.local_sample_counts,
            self._take_early,
        )
        if arrived is None:
            return due
        with self.stats_log.timer("inversion"):
            refreshed = take_refreshes(step, *arrived, self.outliers, self.stats_log, self._never_captured_warned)
            invert_refreshed(step, self.blocks, refreshed, self.damping, self.stats_log)
        if share_decisions:
            with self.stats_log.timer("comm"):
                self.share_decisions(due)
        return due

    def share_decisions(self, due: list[Due]) -> None:
        """Send the owners' refresh decisions of ``due`` to every rank, in an exchange of their own."""
        decisions.share_decisions(self.comm, self.assignment, due)

    def decisions_exact_in(self, dtype: torch.dtype) -> bool:
        """Whether ``dtype`` holds every refresh decision of this step exactly (float32: up to 2**24)."""
        cfg = self.config.staleness
        return decisions.exact_in(dtype, self.step_count, cfg.max_interval if cfg is not None else 1)

    # -- preconditioning, clipping, update -----------------------------------------------------------
    def precondition_owned(self, grads: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """Return P(∇) of every owned block, scaled by rule 13's bound and ``clip_norm``.

        ``grads``: block name -> averaged gradients in ``params`` order (see
        :func:`spngd_ds.safety.step_bound`). Blocks of equal shapes are batched
        (:class:`~spngd_ds.blocks.batched.BatchedPreconditioner`), the factors computed on the device
        (no host synchronisation). One all-reduce when either is set, none otherwise.
        """
        with self.stats_log.timer("precondition"):
            out = self._batched.precondition(self.owned(), grads)
        bound = self.config.step_bound or None
        lr = float(self.param_groups[0]["lr"])
        nu, norm = step_bound(self.comm, out, grads, lr, bound, self.skips.pending_loss, self.config.clip_norm)
        self._last_bound_factor = nu if nu is not None else 1.0
        self._last_clip_factor = norm if norm is not None else 1.0
        factor = nu * norm if nu is not None and norm is not None else nu if nu is not None else norm
        flat = [d for ds in out.values() for d in ds]
        if factor is None or not flat:
            return out
        it = iter(torch._foreach_mul(flat, factor.to(flat[0].device)))  # one multi-tensor product
        return {name: [next(it) for _ in ds] for name, ds in out.items()}

    def precondition_block(self, block: Block, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """P(∇) of one owned block, or the plain gradient when it has no inverse yet."""
        if not block.ready():
            return grads
        return block.precondition(grads)

    @property
    def last_clip_factor(self) -> float:
        """The clip factor of the last step (1.0 without clipping); read from the device here."""
        f = self._last_clip_factor
        return float(f) if isinstance(f, torch.Tensor) else f

    @property
    def last_bound_factor(self) -> float:
        """Rule 13's factor ν of the last step (1.0 when the bound is off or did not act); read from the device here."""
        f = self._last_bound_factor
        return float(f) if isinstance(f, torch.Tensor) else f

    def momentum_update(self, p: torch.Tensor, direction: torch.Tensor, gi: int) -> None:
        """Rule 7 on ``p`` of group ``gi`` (see :mod:`spngd_ds.momentum`)."""
        self.momentum_update_many([p], [direction], gi)

    def momentum_update_many(self, params: list[torch.Tensor], directions: list[torch.Tensor], gi: int) -> None:
        """Rule 7 on every parameter of ``params`` (all of group ``gi``), each with its direction."""
        prev = self._prev_lr[gi] if gi < len(self._prev_lr) else None
        apply_momentum(self.param_groups[gi], self.state, prev, params, directions)

    def rescaled_blocks(self) -> list[Block]:
        """Blocks whose weight rule 8 rescales (every rank computes the same list)."""
        if not self.config.weight_rescale:
            return []
        return [b for b in self.blocks.values() if b.name in self.capture.feeds_bn]

    @staticmethod
    def rescale_target(weight: torch.Tensor) -> float:
        """Rule 8's bound sqrt(2·C_out) for a Conv2d/Linear weight."""
        return math.sqrt(2.0 * full_shape(weight)[0])

    # -- introspection ----------------------------------------------------------------------------------
    @property
    def comm_nbytes(self) -> int:
        """Bytes this rank sent in the last step (ring-algorithm count)."""
        return self.comm.bytes_sent

    def curvature_nbytes(self) -> int:
        """Bytes of statistics and inverses held on this rank (owned blocks only)."""
        return sum(b.curvature_nbytes() for b in self.owned())

    def metrics(self) -> dict[str, float]:
        """The figures to log (W&B keys), all plain floats (:func:`spngd_ds.step_figures.step_figures`)."""
        return step_figures(self, self._last_refreshed)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return hyperparameters, momentum by parameter name and curvature by layer name.

        Curvature of owned blocks only, refresh schedules of all blocks, so a checkpoint written at world size N
        can be loaded at world size M once every rank's part is merged (:mod:`spngd_ds.optimizer_state`).
        """
        live = None if self.path.holds_flat_partitions else self.live_parameters
        return save_state(
            self.blocks,
            self.owned(),
            self.state,
            self.param_groups,
            live,
            self.step_count,
            self._prev_lr,
            self.config.model_dump(),
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (possibly merged from several ranks' files)."""
        live = None if self.path.holds_flat_partitions else self.live_parameters
        self.step_count, self._prev_lr = load_state(
            state_dict,
            self.blocks,
            self.owned(),
            self.state,
            self.param_groups,
            live,
            self.config.model_dump(),
            self.defaults,
        )
        self.capture.start_step(self._due(self.step_count))
