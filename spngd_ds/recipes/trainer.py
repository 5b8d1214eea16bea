"""The training loop around a DeepSpeed engine: augmentation, steps, evaluation, logging, checkpoints.

The loop is the one a DeepSpeed user already writes (``engine(x)``, ``engine.backward(loss)``,
``engine.step()`` for every micro-batch); SP-NGD needs nothing else from it. One *step* below is one
optimizer step, i.e. ``gradient_accumulation_steps`` micro-batches on every rank.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from spngd_ds.batchnorm import average_batchnorm_buffers
from spngd_ds.recipes import checkpoint
from spngd_ds.recipes.augment import BatchRandomErasing, MixedBatch, mixed_accuracy, mixup, mixup_cross_entropy, seeded
from spngd_ds.recipes.checkpoint import TrainState
from spngd_ds.recipes.loaders import Loaders, rank_and_world, reseed_workers
from spngd_ds.recipes.monitor import WandbLogger

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

__all__ = [
    "EvalResult",
    "LoopConfig",
    "Summary",
    "augmentation_seed",
    "engine_device",
    "evaluate",
    "fit",
    "input_dtype",
    "optimizer_metrics",
]


@dataclass(frozen=True)
class LoopConfig:
    """What the loop does, in optimizer steps unless stated.

    Attributes:
        total_steps: stop after this many optimizer steps.
        steps_per_epoch: optimizer steps in one epoch (loader batches // accumulation steps).
        seed: base seed of augmentation (shuffling is seeded in the sampler).
        eval_interval: evaluate every this many steps; 0 evaluates at the end of every epoch.
            The last step is always evaluated.
        checkpoint_dir: where checkpoints go; ``None`` saves none.
        checkpoint_interval: save every this many steps (0: only at the end).
        mixup_alpha: mixup Beta parameter (0: off).
        random_erasing: per-sample random-erasing probability (0: off).
        log_interval: reduce train loss/accuracy over ranks and log every this many steps.
        progress: show the tqdm bar (rank 0 only).
    """

    total_steps: int
    steps_per_epoch: int
    seed: int = 0
    eval_interval: int = 0
    checkpoint_dir: str | None = None
    checkpoint_interval: int = 0
    mixup_alpha: float = 0.0
    random_erasing: float = 0.0
    log_interval: int = 10
    progress: bool = True


@dataclass(frozen=True)
class EvalResult:
    """Validation figures over all ranks: ``top1`` in percent, ``loss`` mean cross-entropy (nats)."""

    top1: float
    loss: float
    count: int


@dataclass(frozen=True)
class Summary:
    """End-of-run figures; top-1 values in percent, ``wall_s`` in seconds of the loop."""

    steps: int
    epochs: float
    best_val_top1: float
    final_val_top1: float
    wall_s: float

    def line(self) -> str:
        """The one summary line the script prints."""
        return (
            f"summary: steps={self.steps} epochs={self.epochs:.2f} best_val_top1={self.best_val_top1:.2f} "
            f"final_val_top1={self.final_val_top1:.2f} wall_s={self.wall_s:.1f}"
        )


def input_dtype(engine: DeepSpeedEngine) -> torch.dtype:
    """The dtype the engine's model takes: bf16/fp16 when DeepSpeed runs it in that precision."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def engine_device(engine: DeepSpeedEngine) -> torch.device:
    """The device of this rank's model (``engine.device``)."""
    return torch.device(engine.device)


def augmentation_seed(seed: int, micro_batch_index: int, rank: int) -> int:
    """Seed of one micro-batch's augmentation: a function of the run seed, the batch and the rank."""
    return (seed * 1_000_003 + micro_batch_index) * 65_537 + rank


def _all_reduce(tensor: torch.Tensor, maximum: bool = False) -> torch.Tensor:
    """Sum (or max) ``tensor`` over ranks in place; unchanged without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if maximum else dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def evaluate(engine: DeepSpeedEngine, loader: DataLoader[Any]) -> EvalResult:
    """Top-1 and loss of the engine's model on ``loader``, summed over all ranks.

    Every rank must call it. Ranks with fewer batches run extra (discarded) forward passes so that
    ZeRO-3's parameter gathers stay in step. The model's train/eval mode is restored after.
    """
    device, dtype = engine_device(engine), input_dtype(engine)
    was_training = engine.training
    average_batchnorm_buffers(engine.module)  # every rank evaluates (and saves) the same model
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    n_batches = torch.tensor([len(loader)], dtype=torch.int64, device=device)
    max_batches = int(_all_reduce(n_batches.clone(), maximum=True).item())
    last: torch.Tensor | None = None
    for x, y in loader:
        x = x.to(device=device, dtype=dtype, non_blocking=True)
        y = y.to(device=device, non_blocking=True)
        logits = engine(x).float()
        sums[0] += (logits.argmax(dim=1) == y).sum()
        sums[1] += F.cross_entropy(logits, y, reduction="sum")
        sums[2] += y.numel()
        last = x[:1]
    if max_batches > int(n_batches.item()):
        if last is None:
            last = loader.dataset[0][0].unsqueeze(0).to(device=device, dtype=dtype)
        for _ in range(max_batches - int(n_batches.item())):
            engine(last)
    _all_reduce(sums)
    engine.train(was_training)
    count = int(sums[2].item())
    if count == 0:
        return EvalResult(0.0, math.nan, 0)
    return EvalResult(100.0 * float(sums[0].item()) / count, float(sums[1].item()) / count, count)


def optimizer_metrics(optimizer: object) -> dict[str, float]:
    """``optimizer.metrics()`` (SP-NGD's figures) as floats; ``{}`` for an optimizer without one.

    Keys without a ``/`` namespace get ``spngd/`` in front; keys like ``spngd/damping`` stay.
    """
    fn = getattr(optimizer, "metrics", None)
    if not callable(fn):
        return {}
    out: dict[str, float] = {}
    for key, value in dict(fn()).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key if "/" in key else f"spngd/{key}"] = float(value)
    return out


class _Meter:
    """Running sums of train loss and accuracy since the last log, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, acc, micro-batches

    def add(self, loss: torch.Tensor, acc: torch.Tensor) -> None:
        self.sums[0] += loss.detach().double()
        self.sums[1] += acc.detach().double()
        self.sums[2] += 1

    def reduce_and_reset(self) -> tuple[float, float]:
        """Mean loss and accuracy (in [0, 1]) over all ranks' micro-batches since the last call."""
        sums = _all_reduce(self.sums.clone())
        self.sums.zero_()
        n = max(float(sums[2].item()), 1.0)
        return float(sums[0].item()) / n, float(sums[1].item()) / n


def fit(
    engine: DeepSpeedEngine,
    optimizer: Any,
    loaders: Loaders,
    cfg: LoopConfig,
    state: TrainState,
    logger: WandbLogger,
) -> Summary:
    """Train from ``state`` until ``cfg.total_steps``; returns the summary (``state`` is updated).

    Every rank must call it with the same configuration. Evaluation and checkpoints are
    collectives run on all ranks; progress and logging happen on rank 0.
    """
    rank, _ = rank_and_world()
    gas = int(engine.gradient_accumulation_steps())
    micro_batch = int(engine.train_micro_batch_size_per_gpu())
    global_batch = int(engine.train_batch_size())
    micro_per_epoch = cfg.steps_per_epoch * gas
    device, dtype = engine_device(engine), input_dtype(engine)
    eraser = BatchRandomErasing(p=cfg.random_erasing) if cfg.random_erasing > 0 else None
    meter = _Meter(device)
    bar = tqdm(
        total=cfg.total_steps,
        initial=min(state.step, cfg.total_steps),
        disable=not (rank == 0 and cfg.progress),
        unit="step",
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    window_start, window_steps, paused = start, 0, 0.0
    last_ckpt_step = -1

    def epochs_done() -> float:
        return state.epoch + state.micro_in_epoch / micro_per_epoch

    def run_eval() -> None:
        nonlocal paused
        t0 = time.perf_counter()
        result = evaluate(engine, loaders.val)
        state.last_val_top1 = result.top1
        state.best_val_top1 = max(state.best_val_top1, result.top1)
        state.last_eval_step = state.step
        if rank == 0:
            bar.write(
                f"step {state.step} epoch {epochs_done():.2f}: val_top1={result.top1:.2f}% "
                f"val_loss={result.loss:.4f} (n={result.count})"
            )
        logger.log({"val/top1": result.top1, "val/loss": result.loss, "train/step": state.step}, engine.global_samples)
        paused += time.perf_counter() - t0

    def run_checkpoint() -> None:
        nonlocal paused, last_ckpt_step
        assert cfg.checkpoint_dir is not None
        t0 = time.perf_counter()
        tag = checkpoint.save(engine, cfg.checkpoint_dir, state)
        last_ckpt_step = state.step
        if rank == 0:
            bar.write(f"step {state.step}: checkpoint {cfg.checkpoint_dir}/{tag}")
        paused += time.perf_counter() - t0

    def log_train() -> None:
        nonlocal window_start, window_steps, paused
        loss, acc = meter.reduce_and_reset()
        now = time.perf_counter()
        train_s = max(now - window_start - paused, 1e-9)
        samples_per_s = window_steps * global_batch / train_s
        window_start, window_steps, paused = now, 0, 0.0
        lrs = engine.get_lr()
        metrics = {
            "train/loss": loss,
            "train/acc": 100.0 * acc,
            "train/lr": float(lrs[0]) if lrs else math.nan,
            "train/samples_per_s": samples_per_s,
            "train/epoch": epochs_done(),
            "train/step": float(state.step),
        }
        metrics.update(optimizer_metrics(optimizer))  # all ranks call it, in case it is a collective
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{100.0 * acc:.1f}", samples_s=f"{samples_per_s:.0f}")
        logger.log(metrics, engine.global_samples)

    engine.train()
    while state.step < cfg.total_steps:
        sampler = loaders.train_sampler
        sampler.set_epoch(state.epoch)
        sampler.skip(state.micro_in_epoch * micro_batch)
        reseed_workers(loaders.train, cfg.seed, state.epoch, rank)
        end_of_epoch = False
        for x, y in loaders.train:
            index = state.epoch * micro_per_epoch + state.micro_in_epoch
            with seeded(augmentation_seed(cfg.seed, index, rank)):
                mixed = mixup(x, y, cfg.mixup_alpha)
                inputs = eraser(mixed.inputs) if eraser is not None else mixed.inputs
            batch = MixedBatch(
                inputs.to(device=device, dtype=dtype, non_blocking=True),
                mixed.targets_a.to(device, non_blocking=True),
                mixed.targets_b.to(device, non_blocking=True),
                mixed.lam,
            )
            logits = engine(batch.inputs)
            loss = mixup_cross_entropy(logits, batch)
            engine.backward(loss)
            engine.step()
            meter.add(loss, mixed_accuracy(logits.detach(), batch))
            state.micro_in_epoch += 1
            if state.micro_in_epoch % gas != 0:
                continue
            # --- an optimizer step just happened ---
            state.step += 1
            window_steps += 1
            bar.update(1)
            end_of_epoch = state.micro_in_epoch >= micro_per_epoch
            if end_of_epoch:
                state.epoch += 1
                state.micro_in_epoch = 0
            last = state.step >= cfg.total_steps
            if state.step % max(cfg.log_interval, 1) == 0 or last:
                log_train()
            if (cfg.eval_interval > 0 and state.step % cfg.eval_interval == 0) or (
                cfg.eval_interval == 0 and end_of_epoch
            ):
                run_eval()
            if cfg.checkpoint_dir and cfg.checkpoint_interval > 0 and state.step % cfg.checkpoint_interval == 0:
                run_checkpoint()
            if end_of_epoch or last:
                break
        if not end_of_epoch and state.step < cfg.total_steps:
            # The loader ran dry before micro_per_epoch (cannot happen with drop_last loaders of the
            # planned length, but never loop forever): start the next epoch.
            state.epoch += 1
            state.micro_in_epoch = 0
    if state.last_eval_step != state.step:
        run_eval()
    if cfg.checkpoint_dir and last_ckpt_step != state.step:
        run_checkpoint()
    bar.close()
    return Summary(
        steps=state.step,
        epochs=epochs_done(),
        best_val_top1=state.best_val_top1,
        final_val_top1=state.last_val_top1,
        wall_s=time.perf_counter() - start,
    )
