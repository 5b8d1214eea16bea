"""A worker for the distributed tests: trains a tiny model with spngd_ds.initialize under
torchrun (or one process) on a deterministic global batch and writes the final parameters.

Not collected by pytest (no test_ prefix); tests/test_deepspeed_*.py launch it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_model(kind: str) -> nn.Module:
    torch.manual_seed(1234)
    if kind == "mlp":
        # 8 curvature blocks, no BatchNorm: exact equivalence of any batch split
        layers: list[nn.Module] = [nn.Flatten()]
        dims = [16, 24, 20, 18, 16, 14, 12, 10, 5]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)
    if kind == "conv":
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Tanh(),
            nn.Flatten(), nn.Linear(4 * 2 * 2, 5),
        )
    if kind == "convbn":
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
            nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
        )
    raise ValueError(kind)


def global_batch(step: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def ds_config(a: argparse.Namespace, world: int) -> dict:
    stal = None if a.staleness == "off" else {"threshold": 0.5, "max_interval": 3}
    params = {"lr": a.lr, "momentum": 0.9, "damping": 1e-2, "weight_decay": 1e-4, "staleness": stal,
              "comm_dtype": a.comm_dtype, "bn_damping_scale": 64.0, "fisher": "empirical"}
    if a.stat_micro_batches:
        params["stat_micro_batches"] = a.stat_micro_batches
    cfg: dict = {
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
    if a.config_override:
        cfg.update(json.loads(a.config_override))
    return cfg


def main() -> None:
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
    p.add_argument("--comm_dtype", default="fp32")
    p.add_argument("--stat_micro_batches", type=int, default=0)
    p.add_argument("--save_dir", default="")
    p.add_argument("--load_dir", default="")
    p.add_argument("--config_override", default="")
    p.add_argument("--patch_fp16", action="store_true")
    p.add_argument("--inject_overflow_step", type=int, default=-1)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    if a.patch_fp16:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        type(acc).is_fp16_supported = lambda self: True  # type: ignore[method-assign]
        type(acc).supported_dtypes = lambda self: [torch.float, torch.bfloat16, torch.float16]  # type: ignore
    import spngd_ds

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = build_model(a.model)
    engine, opt, _, _ = spngd_ds.initialize(model=model, config=ds_config(a, world))
    rank = engine.global_rank
    if a.load_dir:
        engine.load_checkpoint(a.load_dir)
    micro = a.global_batch // (world * a.gas)
    dtype = next(engine.module.parameters()).dtype
    losses = []
    for step in range(a.start_step, a.start_step + a.steps):
        x, y = global_batch(step, a.global_batch)
        xs = x[rank * micro * a.gas : (rank + 1) * micro * a.gas]
        ys = y[rank * micro * a.gas : (rank + 1) * micro * a.gas]
        for k in range(a.gas):
            out = engine(xs[k * micro : (k + 1) * micro].to(engine.device, dtype))
            loss = F.cross_entropy(out.float(), ys[k * micro : (k + 1) * micro].to(engine.device))
            if step == a.inject_overflow_step and k == 0:
                loss = loss * float("inf")
            engine.backward(loss)
            engine.step()
        losses.append(float(loss.detach()))
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
    }
    if rank == 0 or a.out.endswith("{rank}"):
        torch.save({"params": params, "info": info}, a.out.replace("{rank}", str(rank)))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()  # a gloo group left alive at exit can abort the process


if __name__ == "__main__":
    main()
