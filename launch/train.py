#!/usr/bin/env python
"""Train an image classifier with DeepSpeed and SP-NGD (or any DeepSpeed optimizer).

One entry point for every launcher::

    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/digits_cpu.json
    torchrun --nproc_per_node 2 launch/train.py --deepspeed_config ds_configs/digits_cpu.json
    python launch/train.py --deepspeed_config ds_configs/digits_cpu.json

Training-job settings are flags (defaults: the digits job). A config may also carry them in a
top-level ``"spngd_recipe"`` block (keys = flag names without ``--``); flags given on the command
line win. The last line on rank 0 is ``summary: steps=... epochs=... best_val_top1=...
final_val_top1=... wall_s=...`` (top-1 in percent).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import spngd_ds  # noqa: E402
from spngd_ds.distenv import ensure_single_process_env  # noqa: E402
from spngd_ds.recipes import checkpoint  # noqa: E402
from spngd_ds.recipes.client_optimizers import pop_client_optimizer  # noqa: E402
from spngd_ds.recipes.data import DATASETS, build_datasets  # noqa: E402
from spngd_ds.recipes.dsconfig import (  # noqa: E402
    batch_layout,
    ensure_buffer_dtype,
    fill_auto,
    load_ds_config,
    pop_recipe,
)
from spngd_ds.recipes.loaders import build_loaders, rank_and_world  # noqa: E402
from spngd_ds.recipes.models import build_model  # noqa: E402
from spngd_ds.recipes.monitor import WandbLogger, prepare_wandb_env  # noqa: E402
from spngd_ds.recipes.trainer import LoopConfig, fit  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / "ds_configs" / "digits_cpu.json"
# Flags a config's "spngd_recipe" block may set.
RECIPE_FLAGS = (
    "dataset",
    "data_path",
    "model",
    "image_size",
    "epochs",
    "max_steps",
    "seed",
    "eval_interval",
    "log_interval",
    "mixup_alpha",
    "random_erasing",
    "bn_gamma_init_std",
    "num_workers",
    "eval_batch_size",
    "checkpoint_interval",
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of the training job."""
    import deepspeed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)} (default digits)")
    p.add_argument("--data_path", default=None, help="imagefolder root holding train/ and val/")
    p.add_argument("--model", default="small_resnet", help="small_resnet or a torchvision name, e.g. resnet50")
    p.add_argument("--image_size", type=int, default=32, help="input side in pixels (ImageNet: 224)")
    p.add_argument("--epochs", type=float, default=10.0, help="epochs to train (may be fractional)")
    p.add_argument(
        "--max_steps", type=int, default=None, help="stop after this many optimizer steps (schedule unchanged)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds model init, shuffling and augmentation")
    p.add_argument("--checkpoint_dir", default="checkpoints", help="checkpoints (and W&B files) go here")
    p.add_argument("--checkpoint_interval", type=int, default=0, help="save every N steps; 0: only at the end")
    p.add_argument("--no_checkpoint", action="store_true", help="save no checkpoint at all")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint_dir")
    p.add_argument("--eval_interval", type=int, default=0, help="evaluate every N steps; 0: every epoch")
    p.add_argument("--log_interval", type=int, default=10, help="log train figures every N steps")
    p.add_argument("--mixup_alpha", type=float, default=0.0, help="mixup Beta(alpha, alpha); 0: off")
    p.add_argument("--random_erasing", type=float, default=0.0, help="random-erasing probability; 0: off")
    p.add_argument("--bn_gamma_init_std", type=float, default=None, help="BN gamma ~ N(1, std); recipe: 0.05")
    p.add_argument("--num_workers", type=int, default=0, help="data-loader workers per rank")
    p.add_argument("--eval_batch_size", type=int, default=None, help="validation batch per rank")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Flags and the DeepSpeed config dict (``"spngd_recipe"`` applied as flag defaults, then removed)."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    config_path = pre.deepspeed_config or str(DEFAULT_CONFIG)
    try:
        config = load_ds_config(config_path)
        recipe = pop_recipe(config, RECIPE_FLAGS)
    except ValueError as exc:
        parser.error(str(exc))
    parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    args.deepspeed_config_path = config_path
    if args.dataset not in DATASETS:
        parser.error(f"--dataset must be one of {', '.join(DATASETS)}, got {args.dataset!r}")
    if args.no_checkpoint:
        args.checkpoint_dir = None
    return args, config


def _set_threads() -> None:
    # Several ranks on one CPU host: split the cores instead of oversubscribing them.
    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def main(argv: list[str] | None = None) -> int:
    """Train as the command line says; the exit status."""
    args, config = parse_args(argv)
    ensure_single_process_env(args.local_rank)
    _set_threads()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    # Everything that can be wrong with the setup fails here, before DeepSpeed starts the process
    # group (on the CPU that JIT-builds an op on first use), with one line instead of a traceback.
    try:
        data = build_datasets(args.dataset, args.data_path, args.image_size)
        model = build_model(args.model, data.num_classes, data.in_channels, args.bn_gamma_init_std)
        # Baselines DeepSpeed cannot build on the CPU (e.g. "pytorch_optimizer.Lamb") become client optimizers.
        client_optimizer = pop_client_optimizer(config, model)
        if os.environ.get("WORLD_SIZE", "").isdigit():
            batch_layout(config, int(os.environ["WORLD_SIZE"]))
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None

    import deepspeed

    deepspeed.init_distributed()
    rank, world = rank_and_world()
    try:
        layout = batch_layout(config, world)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    loaders = build_loaders(
        data.train,
        data.val,
        layout.micro_batch,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
        rank=rank,
        world_size=world,
    )
    steps_per_epoch = loaders.train_sampler.num_samples // layout.micro_batch // layout.accumulation
    if steps_per_epoch < 1:
        raise SystemExit(f"{len(data.train)} training samples are fewer than one global batch of {layout.global_batch}")
    # The schedule's horizon is --epochs; --max_steps only stops the run early (a smoke test, a
    # preemption), so a run stopped and resumed follows the same schedule as one run straight through.
    horizon = max(1, math.ceil(args.epochs * steps_per_epoch))
    total_steps = horizon if args.max_steps is None else min(horizon, args.max_steps)
    fill_auto(config, steps_per_epoch, horizon)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    buffer_dtype = ensure_buffer_dtype(config, has_bn)
    if buffer_dtype and rank == 0:
        print(f'config: set "data_types": {{"buffer_dtype": "{buffer_dtype}"}} (BatchNorm buffers follow the params)')

    wandb_block = config.get("wandb") or {}
    if wandb_block.get("enabled", False):
        prepare_wandb_env(args.checkpoint_dir or ".")
    args.deepspeed_config = None  # the edited dict is passed instead (DeepSpeed refuses both)
    engine, optimizer, _, _ = spngd_ds.initialize(
        args=args, model=model, optimizer=client_optimizer, model_parameters=model.parameters(), config=config
    )

    state = checkpoint.TrainState(seed=args.seed, world_size=world)
    if args.resume and args.checkpoint_dir:
        loaded = checkpoint.load(engine, args.checkpoint_dir)
        if loaded is None:
            if rank == 0:
                print(f"resume: no checkpoint in {args.checkpoint_dir}, starting from step 0", flush=True)
        else:
            state = loaded
            if rank == 0:
                print(f"resume: step {state.step}, epoch {state.epoch}, batch {state.micro_in_epoch}", flush=True)
            if state.seed != args.seed and rank == 0:
                print(f"resume: checkpoint seed {state.seed} replaces --seed {args.seed}", flush=True)
    if rank == 0:
        print(
            f"train: {args.dataset} {len(data.train)}/{len(data.val)} samples, model {args.model}, "
            f"{world} rank(s), global batch {layout.global_batch} = {layout.micro_batch} x "
            f"{layout.accumulation} x {world}, {steps_per_epoch} steps/epoch, running {total_steps} of {horizon} "
            f"steps, optimizer {_optimizer_name(engine, optimizer)}",
            flush=True,
        )
    logger = WandbLogger(
        enabled=bool(wandb_block.get("enabled", False)),
        rank=rank,
        project=wandb_block.get("project") or "spngd_ds",
        group=wandb_block.get("group"),
        team=wandb_block.get("team"),
        run_config={"args": {k: v for k, v in vars(args).items() if _plain(v)}, "deepspeed": config},
    )
    loop = LoopConfig(
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        seed=state.seed,
        eval_interval=args.eval_interval,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_interval=args.checkpoint_interval,
        mixup_alpha=args.mixup_alpha,
        random_erasing=args.random_erasing,
        log_interval=args.log_interval,
        progress=not args.no_progress,
    )
    summary = fit(engine, optimizer, loaders, loop, state, logger)
    if rank == 0:
        if logger.run is not None:
            logger.run.summary.update(
                {"best_val_top1": summary.best_val_top1, "final_val_top1": summary.final_val_top1}
            )
        logger.finish()
        print(summary.line(), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _optimizer_name(engine: Any, optimizer: Any) -> str:
    """``module.Class`` of the optimizer that does the update (the client one inside DeepSpeed's wrappers)."""
    inner = getattr(engine, "basic_optimizer", None) or optimizer
    return f"{type(inner).__module__}.{type(inner).__qualname__}"


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


if __name__ == "__main__":
    from spngd_ds.process_exit import exit_process

    exit_process(main())  # not sys.exit: gloo's threads can abort the interpreter's teardown
