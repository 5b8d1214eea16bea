"""SP-NGD state in DeepSpeed checkpoints, resumable at another world size (docs/design.md §5).

``engine.save_checkpoint`` is wrapped: after DeepSpeed has written its files, every rank writes
``spngd_rank{r}-of-{N}.pt`` (its owned curvature, refresh schedules, momentum keyed by parameter
name — under ZeRO read in full shape with ``safe_get_full_optimizer_state``) by write-then-rename,
and only then is the ``latest`` pointer moved, so a crash while saving never leaves ``latest``
on a half-written checkpoint. ``engine.load_checkpoint`` merges all ranks' files, so N ranks can
write and M ranks read; at another world size DeepSpeed's own (unshardable) optimizer state is
skipped and the fp32 masters are refreshed from the loaded weights.
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
import re
import zipfile
from typing import Any, cast

import torch
import torch.distributed as dist

from spngd_ds.batchnorm import average_batchnorm_buffers
from spngd_ds.blocks.shapes import full_shape
from spngd_ds.deepspeed.engine_api import CheckpointingEngine, DeepSpeedEngineAPI, FlatPartitionOptimizer
from spngd_ds.deepspeed.partitions import gather_full, local_fragment, write_fragment
from spngd_ds.optimizer import SPNGD

logger = logging.getLogger("spngd_ds")
_FILE = re.compile(r"spngd_rank(\d+)-of-(\d+)\.pt$")


def _barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def atomic_save(obj: object, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def full_momentum(opt: SPNGD) -> dict[str, torch.Tensor]:
    """Momentum of every parameter in full shape, keyed by name (a collective under ZeRO)."""
    if not opt.path.holds_flat_partitions:
        return dict(opt.state_dict()["momentum"])
    out: dict[str, torch.Tensor] = {}
    for b in opt.blocks.values():
        for p, name in zip(b.params, b.param_names, strict=True):
            frag = local_fragment(p, opt.param_groups, opt.comm.rank)
            buf = opt.state[frag.flat].get("momentum_buffer") if frag is not None else None
            full = gather_full(opt.comm, frag, buf, full_shape(p))
            if opt.assignment[b.name] == opt.comm.rank:
                out[name] = full.cpu().clone()
    return out


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state dict from every rank's part (curvature and momentum are disjoint by owner)."""
    merged = dict(states[0])
    merged["curvature"] = {}
    merged["momentum"] = {}
    for st in states:
        merged["curvature"].update(st["curvature"])
        merged["momentum"].update(st["momentum"])
    return merged


def resolve_tag(load_dir: str, tag: str | None) -> str:
    """``tag``, or the one named by ``load_dir/latest``; a clear error when there is none."""
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"no checkpoint to resume from: {latest} does not exist")
    with open(latest) as f:
        return f.read().strip()


def read_states(tag_dir: str) -> tuple[list[dict[str, Any]], int]:
    """Every rank's SP-NGD file in ``tag_dir`` and the world size that wrote them."""
    files = sorted(f for f in glob.glob(os.path.join(tag_dir, "spngd_rank*-of-*.pt")) if _FILE.search(f))
    if not files:
        raise FileNotFoundError(f"checkpoint {tag_dir} has no SP-NGD state (spngd_rank*-of-*.pt)")
    match = _FILE.search(files[0])
    assert match is not None
    world = int(match.group(2))
    if len(files) != world:
        present = {os.path.basename(f) for f in files}
        missing = [n for n in (f"spngd_rank{r:05d}-of-{world:05d}.pt" for r in range(world)) if n not in present]
        raise FileNotFoundError(
            f"checkpoint {tag_dir} is incomplete: {len(files)} of {world} SP-NGD rank files; missing: "
            + ", ".join(missing)
        )
    states = []
    for f in files:
        # weights_only: SP-NGD's state is tensors, dicts, lists, numbers and strings; a file that
        # carries anything else (a pickled callable can run code on load) is refused, not executed
        try:
            states.append(torch.load(f, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as exc:
            raise RuntimeError(
                f"refusing SP-NGD checkpoint file {f}: it holds objects other than tensors, containers, "
                f"numbers and strings, which torch.load(weights_only=True) will not unpickle ({exc}); "
                "load only checkpoints you trust, and never with weights_only=False"
            ) from None
        except Exception as exc:  # truncated or corrupt file: name it
            raise RuntimeError(f"cannot read SP-NGD checkpoint file {f}: {type(exc).__name__}: {exc}") from None
    return states, world


def wrap_checkpointing(engine: CheckpointingEngine, opt: SPNGD) -> None:
    """Wrap ``engine.save_checkpoint`` / ``engine.load_checkpoint`` as the module docstring says."""
    save_original = engine.save_checkpoint
    load_original = engine.load_checkpoint

    def save_checkpoint(
        save_dir: str,
        tag: object = None,
        client_state: dict[str, Any] | None = None,
        save_latest: bool = True,
        **kwargs: Any,
    ) -> object:
        tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
        # BatchNorm running statistics differ per rank (each normalised its own batches) and
        # DeepSpeed saves rank 0's: save, and go on with, their average over ranks
        average_batchnorm_buffers(engine.module, opt.comm)
        result = save_original(save_dir, tag=tag, client_state=client_state or {}, save_latest=False, **kwargs)
        state = opt.state_dict()
        state["momentum"] = full_momentum(opt)
        state["world_size"] = opt.comm.world_size
        tag_dir = os.path.join(save_dir, tag)
        os.makedirs(tag_dir, exist_ok=True)
        atomic_save(state, os.path.join(tag_dir, f"spngd_rank{opt.comm.rank:05d}-of-{opt.comm.world_size:05d}.pt"))
        _barrier()
        if save_latest and opt.comm.rank == 0:
            atomic_write_text(os.path.join(save_dir, "latest"), tag)
        _barrier()
        return result

    def load_checkpoint(load_dir: str, tag: str | None = None, **kwargs: Any) -> object:
        tag = resolve_tag(load_dir, tag)
        tag_dir = os.path.join(load_dir, tag)
        if not os.path.isdir(tag_dir):
            raise FileNotFoundError(f"checkpoint directory not found: {tag_dir}")
        check_model_states(tag_dir)
        states, saved_world = read_states(tag_dir)
        flat = opt.path.holds_flat_partitions
        resharded = saved_world != opt.comm.world_size
        if resharded:
            logger.warning(
                "SPNGD: resuming a checkpoint written by %d ranks on %d ranks: curvature re-assigned by name; "
                "DeepSpeed optimizer partitions rebuilt from the weights",
                saved_world,
                opt.comm.world_size,
            )
        want_scheduler = bool(kwargs.get("load_lr_scheduler_states", True))
        if resharded and flat:
            # DeepSpeed cannot re-partition its ZeRO optimizer state: load the module only, and keep
            # the scheduler's state in the returned client state (restored below)
            kwargs.update(load_module_only=True, load_lr_scheduler_states=False)
        result = load_original(load_dir, tag=tag, **kwargs)
        if resharded and flat:
            # flat partitions exist only under a real DeepSpeed engine with a ZeRO/BF16 optimizer
            full_engine = cast(DeepSpeedEngineAPI, engine)
            cast(FlatPartitionOptimizer, full_engine.optimizer).refresh_fp32_params()
            result = _restore_engine_counters(full_engine, result, want_scheduler)
        merged = merge_states(states)
        # flat ZeRO partitions: DeepSpeed restored its own at the same world size; momentum comes
        # from the full-shape copy below in every case
        merged["elementwise_state"] = None
        opt.load_state_dict(merged)
        if flat:
            _set_full_momentum(opt, merged["momentum"])
        return result

    engine.save_checkpoint = save_checkpoint  # type: ignore[method-assign]
    engine.load_checkpoint = load_checkpoint  # type: ignore[method-assign]


_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def _restore_engine_counters(engine: DeepSpeedEngineAPI, result: object, want_scheduler: bool) -> object:
    """Restore after a module-only load what a full load restores.

    A module-only load (ZeRO at another world size) leaves the learning-rate scheduler and the
    engine's step, sample and skipped-step counters behind (the schedule and the W&B axis would
    start again). They are in the client state DeepSpeed returns; they are taken out of it, as a
    full load does.

    Args:
        engine: The engine that loaded.
        result: What ``load_checkpoint`` returned: ``(load_path, client_state)``.
        want_scheduler: Whether the caller asked for the scheduler's state.

    Returns:
        ``(load_path, client_state)`` with those entries taken out (``result`` itself when there
        is no client state).
    """
    load_path, client_state = result if isinstance(result, tuple) else (result, None)
    if not isinstance(client_state, dict):
        return result
    scheduler_state = client_state.pop("lr_scheduler", None)
    if want_scheduler and engine.lr_scheduler is not None and scheduler_state is not None:
        engine.lr_scheduler.load_state_dict(scheduler_state)
    for key in _ENGINE_COUNTERS:
        if key in client_state:
            setattr(engine, key, client_state.pop(key))
    for key in ("dp_world_size", "mp_world_size", "optimizer"):
        client_state.pop(key, None)
    return load_path, client_state


def check_model_states(tag_dir: str) -> None:
    """Raise a clear error when DeepSpeed's model-states file is missing or truncated.

    The error names the file in ``tag_dir`` (DeepSpeed's own error does not say which file).

    Raises:
        FileNotFoundError: No model-states file.
        RuntimeError: A DeepSpeed ``.pt`` file that is not a ``torch.save`` archive.
    """
    files = sorted(glob.glob(os.path.join(tag_dir, "*model_states.pt")))
    if not files:
        raise FileNotFoundError(
            f"checkpoint {tag_dir} has no DeepSpeed model states (mp_rank_00_model_states.pt or "
            "zero_pp_rank_*_model_states.pt): it is incomplete"
        )
    for f in sorted(glob.glob(os.path.join(tag_dir, "*.pt"))):
        if _FILE.search(f):
            continue  # SP-NGD's own files are checked by read_states
        if not zipfile.is_zipfile(f):
            raise RuntimeError(f"cannot read DeepSpeed checkpoint file {f}: truncated or not a torch.save archive")


def _set_full_momentum(opt: SPNGD, momentum: dict[str, torch.Tensor]) -> None:
    """Write full-shape momentum into the flat partitions this rank holds (no collective)."""
    for b in opt.blocks.values():
        for p, name in zip(b.params, b.param_names, strict=True):
            frag = local_fragment(p, opt.param_groups, opt.comm.rank)
            if frag is None or name not in momentum:
                continue
            buf = opt.state[frag.flat].setdefault("momentum_buffer", torch.zeros_like(frag.flat))
            write_fragment(frag, buf, momentum[name].to(buf.device, torch.float32))
