"""The driver the step-time regimes share.

The driver the step-time regimes share (``bench/step_time.py --regime ...``): the process group,
engines on copies of one model, the timed optimizer step, the rotation of engines over the same
batches, reductions over ranks and steps, and the JSON with the machine it was measured on.

Times are wall seconds; a step's time is this rank's unless reduced with :func:`slowest_rank`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

#: SP-NGD's own split of a step, ``opt.metrics()["spngd/time_<key>"]``
SPLIT_KEYS = ("capture", "comm", "inversion", "precondition")
THRESHOLD = common.DEFAULT_STALENESS["threshold"]


def init_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device; sets the environment DeepSpeed reads."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def close_distributed() -> None:
    """Wait for every rank, then take the process group down."""
    dist.barrier()
    dist.destroy_process_group()


def a_samples_params(a_samples: int | None) -> dict[str, Any]:
    """The SP-NGD parameters ``--a_samples`` adds (none when it is not given)."""
    return {} if a_samples is None else {"a_samples": a_samples}


def build_engines(
    model_kind: str, blocks: dict[str, dict[str, Any]], micro_batch: int, gas: int = 1
) -> dict[str, tuple[Any, Any]]:
    """Build one engine per ``"optimizer"`` block on copies of the same model.

    name -> (engine, SPNGD or None) for each ``"optimizer"`` block, each on its own copy of the same
    initial model (seed 0), ZeRO 0, fp32, ``gas`` micro-batches a step.
    """
    import spngd_ds

    base = common.build_model(model_kind, seed=0)
    out: dict[str, tuple[Any, Any]] = {}
    for name, block in blocks.items():
        cfg = common.ds_config(block, micro_batch, stage=0, gas=gas)
        model = copy.deepcopy(base)
        engine, opt, _, _ = spngd_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        out[name] = (engine, opt if block["type"] == "SPNGD" else None)
    return out


def rotation(names: Sequence[str], step: int) -> Iterator[str]:
    """The engines in this step's turn order (it rotates every step, so machine noise hits each engine alike)."""
    for k in range(len(names)):
        yield names[(step + k) % len(names)]


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA kernels are asynchronous; nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(
    engine: Any,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    counter: common.CollectiveCounter | None = None,
    collectives: list[list[tuple[float, bool]]] | None = None,
) -> float:
    """Time one optimizer step on this rank.

    Wall seconds of one optimizer step on this rank: forward + ``engine.backward`` + ``engine.step``
    of each micro-batch (ranks aligned by a barrier first; a generator of micro-batches is drawn
    inside the timed window). With a ``counter``, the seconds of each collective of the step and
    whether it was asynchronous, in call order, are appended to ``collectives``.
    """
    sync(device)
    dist.barrier()
    window = counter.window() if counter is not None else None
    with window if window is not None else contextlib.nullcontext():
        start = time.perf_counter()
        for xb, yb in micro_batches:
            loss = F.cross_entropy(engine(xb.to(device)), yb.to(device))
            engine.backward(loss)
            engine.step()
        sync(device)
        seconds = time.perf_counter() - start
    if window is not None and collectives is not None:
        collectives.append([(c["seconds"], c["async"]) for c in window.calls])
    return seconds


def due_by_kind(opt: Any) -> dict[str, float]:
    """Share of the statistics of each kind (A, G, F) due at the coming step."""
    acc: dict[str, list[bool]] = {}
    for b in opt.blocks.values():
        for st in b.stats.values():
            acc.setdefault(st.name, []).append(st.schedule.is_due(opt.step_count))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def intervals_by_kind(opt: Any) -> dict[str, float]:
    """Mean refresh interval of the statistics of each kind (A, G, F) at the end of the run."""
    acc: dict[str, list[int]] = {}
    for b in opt.blocks.values():
        for st in b.stats.values():
            acc.setdefault(st.name, []).append(st.schedule.interval)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def slowest_rank(values: list[float], world: int) -> list[float]:
    """Element-wise max over ranks of a per-step list (a collective)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def split_means(split: dict[str, list[float]], world: int, mean_step_s: float) -> dict[str, float]:
    """Time each part of SP-NGD's split step.

    Mean seconds a step of each part of SP-NGD's split (slowest rank per step), and ``rest``:
    what the step took beyond them (forward, backward, update).
    """
    out = {k: mean(slowest_rank(split[k], world)) for k in SPLIT_KEYS}
    out["rest"] = mean_step_s - sum(out.values())
    return out


def mean(v: list[float]) -> float:
    """Arithmetic mean; 0 for an empty list."""
    return sum(v) / len(v) if v else 0.0


def median(v: list[float]) -> float:
    """Median (upper middle); nan for an empty list."""
    finite = sorted(x for x in v if math.isfinite(x))
    return finite[len(finite) // 2] if finite else math.nan


def record_layer_io(
    model: torch.nn.Module, names: list[str], xb: torch.Tensor, yb: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs and output gradients of the named modules over one forward/backward of ``model``."""
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook_for(name: str) -> Any:
        def hook(module: torch.nn.Module, inp: Any, out: torch.Tensor) -> None:
            inputs[name] = inp[0].detach().clone()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach().clone()))

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    F.cross_entropy(model(xb), yb).backward()
    for h in handles:
        h.remove()
    return inputs, grads


def finish(res: dict[str, Any], name: str, load_before: list[float], wall_start: float) -> Path:
    """Add the machine and the wall seconds to ``res`` and write it.

    Add the machine (with the load average at the start) and the wall seconds to ``res`` and write
    ``bench/results/<name>.json``; returns the path.
    """
    res["machine"] = common.machine_info() | {"load_average_at_start": load_before}
    res["wall_s"] = time.perf_counter() - wall_start
    return common.write_json(name, res)
