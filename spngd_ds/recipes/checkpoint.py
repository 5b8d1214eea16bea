"""Training-loop state saved next to DeepSpeed's checkpoint, and resuming from it.

DeepSpeed saves the model, the optimizer (SP-NGD's state included), the scheduler and its step
counters; :func:`save` adds the loop's position (epoch, step, micro-batches done in the epoch, the
shuffle seed) and every rank's RNG states as ``client_state``. Because the training order is a
function of ``(seed, epoch)`` (:mod:`spngd_ds.recipes.loaders`), a resumed job skips the
micro-batches already done and continues on exactly the batches it would have seen.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

__all__ = ["TrainState", "capture_rng", "load", "restore_rng", "save"]

_CLIENT_KEY = "spngd_train_state"


@dataclass
class TrainState:
    """Where the training loop is.

    Attributes:
        epoch: current epoch, counted from 0.
        step: optimizer steps done since the start of training.
        micro_in_epoch: micro-batches (per rank) done in the current epoch.
        best_val_top1: best validation top-1 so far, in percent (-1 before any evaluation).
        last_val_top1: latest validation top-1, in percent (-1 before any evaluation).
        last_eval_step: ``step`` of the latest evaluation (-1 before any).
        seed: the run's seed (shuffle order and augmentation depend on it).
        world_size: data-parallel ranks when the state was saved.
    """

    epoch: int = 0
    step: int = 0
    micro_in_epoch: int = 0
    best_val_top1: float = -1.0
    last_val_top1: float = -1.0
    last_eval_step: int = -1
    seed: int = 0
    world_size: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """A state from the fields in ``data``; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _numpy_state_to_plain(state: Any) -> tuple[str, list[int], int, int, float]:
    # Plain Python values, so the checkpoint loads without NumPy pickles.
    name, keys, pos, has_gauss, cached = state
    return (str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached))


def capture_rng() -> dict[str, Any]:
    """This process's RNG states: Python ``random``, NumPy's global RNG, torch CPU (and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng() -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (a collective when a process group exists)."""
    mine = capture_rng()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def save(engine: DeepSpeedEngine, checkpoint_dir: str, state: TrainState) -> str:
    """Save a DeepSpeed checkpoint tagged ``step{N}`` with ``state`` and all ranks' RNG states.

    A collective: every rank must call it. Returns the tag.
    """
    tag = f"step{state.step}"
    os.makedirs(checkpoint_dir, exist_ok=True)
    client_state = {_CLIENT_KEY: asdict(state), "rng_states": _gather_rng()}
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state=client_state)
    return tag


def load(engine: DeepSpeedEngine, checkpoint_dir: str) -> TrainState | None:
    """Load the latest checkpoint in ``checkpoint_dir`` into ``engine``; ``None`` when there is none.

    RNG states are restored when the world size matches the saved one (otherwise the loop's
    per-step seeding still reproduces the augmentation; only data-worker randomness differs).
    """
    if not os.path.isfile(os.path.join(checkpoint_dir, "latest")):
        return None
    load_path, client_state = engine.load_checkpoint(checkpoint_dir)
    if load_path is None or not client_state or _CLIENT_KEY not in client_state:
        return None
    state = TrainState.from_dict(client_state[_CLIENT_KEY])
    rng_states = client_state.get("rng_states") or []
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if len(rng_states) == world and rank < len(rng_states):
        restore_rng(rng_states[rank])
    return state
