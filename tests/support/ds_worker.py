"""A worker for the distributed tests.

Trains a tiny model with spngd_ds.initialize under torchrun (or one process) on a deterministic
global batch and writes the final parameters; each rank also records how it ended in
``<out>.rank{r}.json`` (tests/support/rank_records.py).

Not collected by pytest (no test_ prefix); tests/deepspeed/ launch it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def build_model(kind: str) -> nn.Module:
    """The matrix's models (tests/support/cells.py), except "convbn" with torch's default initialisation."""
    from tests.support.cells import build_model as matrix_model

    if kind != "convbn":
        return matrix_model(kind)
    torch.manual_seed(1234)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


def global_batch(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def ds_config(a: argparse.Namespace, world: int) -> dict[str, Any]:
    stal = None if a.staleness == "off" else {"threshold": 0.5, "max_interval": 3}
    params = {
        "lr": a.lr,
        "momentum": 0.9,
        "damping": 1e-2,
        "weight_decay": 1e-4,
        "staleness": stal,
        "comm_dtype": a.comm_dtype,
        "bn_damping_scale": 64.0,
        "fisher": "empirical",
    }
    params["stat_micro_batches"] = a.stat_micro_batches or None  # 0: every micro-batch (the references)
    params["overlap_statistics"] = True  # what "auto" does on an accelerator: A sent behind the backward
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": a.global_batch // (world * a.gas),
        "gradient_accumulation_steps": a.gas,
        "optimizer": {"type": "SPNGD", "params": params},
        "zero_optimization": {"stage": a.stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    if a.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
        if a.grad_accum_fp32:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if a.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000}
    if a.offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if a.poly:
        from tests.support.cells import POLY

        cfg["scheduler"] = {"type": "SPNGDPolyDecay", "params": dict(POLY)}
    if a.config_override:
        cfg.update(json.loads(a.config_override))
    return cfg


def _perturb_after_update(engine, opt, step: int) -> None:  # type: ignore[no-untyped-def]
    """After SP-NGD's update (and all-gather) of ``step``, add 1e-3 to the first parameter on this rank only.

    A silent divergence that only a rank-agreement check can see.
    """
    finish = opt.finish_step

    def finish_step(*args: Any, **kwargs: Any) -> None:
        if opt.step_count == step:
            with torch.no_grad():
                next(engine.module.parameters()).add_(1e-3)
        finish(*args, **kwargs)

    opt.finish_step = finish_step


def _crash_while_saving_spngd_file() -> None:
    """Die like a killed process while ``torch.save`` writes this rank's ``spngd_rank*.pt``.

    Whatever path the checkpoint code writes to first: half the bytes reach the disk, then
    ``os._exit(1)``.
    """
    import io

    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(f, str | os.PathLike) and os.path.basename(os.fspath(f)).startswith("spngd_rank"):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
            os._exit(1)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def die_with_launcher() -> None:
    """Linux: get SIGKILL when the torchrun agent that started us dies.

    A test that times out kills the agent; torchrun puts workers in their own session, so a
    process-group kill misses them.
    """
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main() -> None:
    die_with_launcher()
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mlp")
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--grad_accum_fp32", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--gas", type=int, default=1)
    p.add_argument("--global_batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--start_step", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--staleness", default="on")
    p.add_argument("--poly", action="store_true", help="SPNGDPolyDecay: the learning rate changes every step")
    p.add_argument("--nan_grad_step", type=int, default=-1, help="a NaN in one input of rank 0 at this step")
    p.add_argument("--comm_dtype", default="fp32")
    p.add_argument("--stat_micro_batches", type=int, default=0)
    p.add_argument("--save_dir", default="")
    p.add_argument("--load_dir", default="")
    p.add_argument("--config_override", default="")
    p.add_argument("--patch_fp16", action="store_true")
    p.add_argument("--inject_overflow_step", type=int, default=-1)
    p.add_argument("--repeat_batch", action="store_true", help="the batch of step 0 at every step")
    p.add_argument(
        "--nan_forward_from",
        type=int,
        default=-1,
        help="rank 0's loss is NaN at every step from this one on (a forward that turns NaN)",
    )
    p.add_argument(
        "--stall_ok",
        action="store_true",
        help="a TrainingStalledError ends the loop (recorded in info['stalled']) instead of failing",
    )
    # fault injection for tests/deepspeed/test_reliability.py (off by default)
    p.add_argument(
        "--perturb_rank",
        type=int,
        default=-1,
        help="this rank adds 1e-3 to one parameter right after SP-NGD's update of --perturb_step "
        "(before the engine's rank-agreement check)",
    )
    p.add_argument("--perturb_step", type=int, default=-1)
    p.add_argument(
        "--crash_in_save_rank",
        type=int,
        default=-1,
        help="this rank dies (os._exit) half-way through writing its SP-NGD checkpoint file, i.e. after "
        "DeepSpeed's own files",
    )
    p.add_argument(
        "--cells",
        default="",
        help="JSON file with a list of tests/support/cells.py Cell dicts: run each, write <out>/<cell name>.pt",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    if a.patch_fp16:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        type(acc).is_fp16_supported = lambda self: True
        type(acc).supported_dtypes = lambda self: [torch.float, torch.bfloat16, torch.float16]
    import spngd_ds

    if a.cells:
        run_cells(a.cells, a.out)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = build_model(a.model)
    engine, opt, _, _ = spngd_ds.initialize(model=model, config=ds_config(a, world))
    rank = engine.global_rank
    if rank == a.perturb_rank:
        _perturb_after_update(engine, opt, a.perturb_step)
    if rank == a.crash_in_save_rank:
        _crash_while_saving_spngd_file()
    if a.load_dir:
        engine.load_checkpoint(a.load_dir)
    micro = a.global_batch // (world * a.gas)
    dtype = next(engine.module.parameters()).dtype
    losses = []
    stalled = None
    for step in range(a.start_step, a.start_step + a.steps):
        x, y = global_batch(0 if a.repeat_batch else step, a.global_batch)
        xs = x[rank * micro * a.gas : (rank + 1) * micro * a.gas]
        ys = y[rank * micro * a.gas : (rank + 1) * micro * a.gas]
        for k in range(a.gas):
            out = engine(xs[k * micro : (k + 1) * micro].to(engine.device, dtype))
            loss = F.cross_entropy(out.float(), ys[k * micro : (k + 1) * micro].to(engine.device))
            if step == a.inject_overflow_step and k == 0:
                loss = loss * float("inf")
            if step == a.nan_grad_step and k == 0 and rank == 0:
                loss = loss * float("nan")
            if 0 <= a.nan_forward_from <= step and rank == 0:
                loss = loss * float("nan")
            engine.backward(loss)
            try:
                engine.step()
            except RuntimeError as exc:
                from spngd_ds.safety import TrainingStalledError

                if not (a.stall_ok and isinstance(exc, TrainingStalledError)):
                    raise
                stalled = {"message": str(exc), "step": step}
        losses.append(float(loss.detach()))
        if stalled is not None:
            break
    if a.save_dir:
        engine.save_checkpoint(a.save_dir)
    from deepspeed.utils import safe_get_full_fp32_param

    params = {}
    for name, prm in engine.module.named_parameters():
        full = safe_get_full_fp32_param(prm) if a.stage > 0 or a.precision != "fp32" else prm.detach()
        params[name] = (full if full is not None else prm.detach()).float().cpu().clone()
    info = {
        "losses": losses,
        "curvature_nbytes": opt.curvature_nbytes(),
        "comm_nbytes": opt.comm_nbytes,
        "assignment": opt.assignment,
        "metrics": opt.metrics(),
        "schedules": {f"{b.name}:{s.name}": s.schedule.state() for b in opt.blocks.values() for s in b.stats.values()},
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "lr": engine.get_lr(),
        "step_count": opt.step_count,
        "stalled": stalled,
    }
    if rank == 0 or a.out.endswith("{rank}"):
        torch.save({"params": params, "info": info}, a.out.replace("{rank}", str(rank)))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()  # a gloo group left alive at exit can abort the process


def full_fp32_params(engine) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Every parameter in full shape, fp32 master copy where DeepSpeed keeps one (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, prm in engine.module.named_parameters():
        full = safe_get_full_fp32_param(prm)
        out[name] = (full if full is not None else prm.detach()).float().cpu().clone()
    return out


def stage0_masters(engine, opt) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """ZeRO stage 0 under bf16/fp16.

    The fp32 copies SP-NGD updates (DeepSpeed's wrapper puts them in the optimizer's groups, in the
    model's parameter order), not their half-precision casts.
    """
    live = opt.live_parameters()
    return {name: live[id(prm)].detach().float().cpu().clone() for name, prm in engine.module.named_parameters()}


def _fragment_elements_sent(opt, rank: int) -> tuple[int, int] | None:  # type: ignore[no-untyped-def]
    """ZeRO path: elements of its fragments this rank sends to other owners per exchange.

    With the owners the path chose and with the plain multi-load assignment (None on the fast path).
    """
    from spngd_ds.assignment import assign_owners, block_cost
    from spngd_ds.blocks.shapes import full_shape
    from spngd_ds.comm import FragmentPlan, OwnerLayout

    plan = getattr(opt.path, "plan", None)
    if plan is None:
        return None
    lpt = assign_owners([block_cost(b) for b in opt.blocks.values()], opt.comm.world_size)
    shapes = [(tuple(full_shape(p)), lpt[b.name]) for b in opt.blocks.values() for p in b.params]
    other = FragmentPlan(OwnerLayout.build(shapes, opt.comm.world_size), plan.fragments)
    return plan.sent_bytes(rank, 1, "to"), other.sent_bytes(rank, 1, "to")


def run_cells(path: str, out_dir: str) -> None:
    """Run every cell of the JSON list in ``path`` in this process group.

    Rank 0 writes ``out_dir/<cell name>.pt`` with the parameters and what the optimizer reports.
    """
    import deepspeed
    import torch.distributed as dist

    import spngd_ds
    from tests.support import cells as C

    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    with open(path) as f:
        todo = [C.Cell.from_json(d) for d in json.load(f)]
    for cell in todo:
        cfg = C.ds_config(cell, world)
        if cell.zero_init:
            with deepspeed.zero.Init(config_dict_or_path=cfg):
                model = C.build_model(cell.model)
        else:
            model = C.build_model(cell.model)
        engine, opt, _, _ = spngd_ds.initialize(model=model, config=cfg)
        micro = C.GLOBAL_BATCH // (world * cell.gas)
        dtype = torch.bfloat16 if cell.precision == "bf16" else torch.float32
        for step in range(cell.steps):
            x, y = C.global_batch(step)
            xs = x[rank * micro * cell.gas : (rank + 1) * micro * cell.gas]
            ys = y[rank * micro * cell.gas : (rank + 1) * micro * cell.gas]
            for k in range(cell.gas):
                loss = C.loss_of(engine(xs[k * micro : (k + 1) * micro].to(dtype)), ys[k * micro : (k + 1) * micro])
                engine.backward(loss)
                engine.step()
        params = full_fp32_params(engine)
        if cell.stage == 0 and cell.precision != "fp32":
            params = stage0_masters(engine, opt)
        owned = [b.name for b in opt.owned()]
        owned_counts: list[int | None] = [None] * world
        dist.all_gather_object(owned_counts, len(owned))
        # elements this rank's fragment exchange sends: owners as chosen / plain LPT
        sent: list[int | None] = [None] * world
        dist.all_gather_object(sent, _fragment_elements_sent(opt, rank))  # type: ignore[misc]
        info = {
            "metrics": opt.metrics(),
            "assignment": dict(opt.assignment),
            "owned_counts": owned_counts,
            "fragment_elements_sent": sent,
            "step_count": opt.step_count,
            "global_steps": engine.global_steps,
            "skipped_steps": engine.skipped_steps,
            "lr": engine.get_lr(),
        }
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            torch.save({"params": params, "info": info}, os.path.join(out_dir, f"{cell.name}.pt"))
        engine.destroy() if hasattr(engine, "destroy") else None
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()


#: How long a failing rank waits for its siblings to record their outcome before it exits (torchrun
#: stops every rank once one has exited non-zero); only a sibling that never records costs all of it.
SIBLING_WAIT_S = 60.0


def recorded_main() -> int:
    """Run :func:`main` and record how this rank ended in ``<out>.rank{r}.json`` (tests/support/rank_records.py).

    The exception, or success, with the collectives called until then. A failing rank prints its
    traceback, records, waits for its siblings' records, and returns 1.
    """
    from tests.support.rank_records import (
        count_collectives,
        failure_record,
        success_record,
        wait_for_records,
        write_record,
    )

    # Counted from the start of the process: spngd_ds.initialize validates the config before it
    # calls deepspeed.init_distributed, so a refusal must come with 0 calls and no process group.
    counts = count_collectives()
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", required=True)
    out = p.parse_known_args()[0].out
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        main()
    except BaseException as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)  # torch's hook prefixes it with [rankN]
        write_record(out, rank, failure_record(exc, counts))
        wait_for_records(out, world, SIBLING_WAIT_S)
        return 1
    write_record(out, rank, success_record(counts))
    return 0


if __name__ == "__main__":
    code = recorded_main()
    from spngd_ds.process_exit import exit_process

    exit_process(code)  # the result is written: skip the teardown gloo's threads can abort
