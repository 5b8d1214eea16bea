"""The parts of a DeepSpeed engine (``deepspeed.DeepSpeedEngine``, 0.19) that SP-NGD touches.

DeepSpeed ships no type information, so these Protocols say what the coupling relies on: the
checkpoint wrapping needs only :class:`CheckpointingEngine`; wiring the step, the backward and the
path needs the whole :class:`DeepSpeedEngineAPI`. SP-NGD replaces some of these methods on the
engine object (an instance attribute shadows the method), which mypy reports as ``method-assign``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class FlatPartitionOptimizer(Protocol):
    """DeepSpeed's ZeRO or BF16 optimizer wrapper, which keeps fp32 master copies in flat partitions."""

    def refresh_fp32_params(self) -> None:
        """Copy the (low-precision or loaded) model weights into the fp32 master partitions."""
        ...


class StatefulScheduler(Protocol):
    """A learning-rate scheduler whose state a checkpoint restores."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the scheduler from ``state_dict`` (as its ``state_dict()`` returned it)."""
        ...


class CheckpointingEngine(Protocol):
    """What :func:`~spngd_ds.deepspeed.checkpoint.wrap_checkpointing` needs of every engine.

    Attributes:
        module: The wrapped model.
        global_steps: Optimizer steps taken so far (names the default checkpoint tag).
    """

    module: torch.nn.Module
    global_steps: int

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> object:
        """``save_checkpoint(save_dir, tag=None, client_state=None, save_latest=True, **kwargs)``."""
        ...

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> object:
        """``load_checkpoint(load_dir, tag=None, **kwargs)``, returning ``(load_path, client_state)``."""
        ...


class DeepSpeedEngineAPI(CheckpointingEngine, Protocol):
    """The DeepSpeed engine as SP-NGD's coupling uses it.

    Attributes:
        optimizer: The optimizer the engine steps: SP-NGD itself (ZeRO 0, fp32), DeepSpeed's bf16
            wrapper, or a ZeRO optimizer (a :class:`FlatPartitionOptimizer` under ZeRO 1-3).
        lr_scheduler: The engine's scheduler, or None.
        global_samples: Samples consumed so far.
        skipped_steps: Steps skipped so far (overflow, or reported so by SP-NGD).
        enable_backward_allreduce: Whether ``engine.backward`` all-reduces the gradients.
    """

    optimizer: object
    lr_scheduler: StatefulScheduler | None
    global_samples: int
    skipped_steps: int
    enable_backward_allreduce: bool

    def step(self, *args: Any, **kwargs: Any) -> object:
        """The optimizer step (a no-op away from the gradient-accumulation boundary)."""
        ...

    def backward(self, *args: Any, **kwargs: Any) -> object:
        """``backward(loss, ...)``: the backward pass of a scalar ``loss``."""
        ...

    def zero_optimization_stage(self) -> int:
        """The ZeRO stage, 0-3."""
        ...

    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        ...

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the next ``step()`` applies an update (the last micro-batch of the step)."""
        ...

    def fp16_enabled(self) -> bool:
        """Whether the engine runs fp16 with a loss scale."""
        ...
