"""GPU checks (marked ``cuda``; skipped where ``torch.cuda.is_available()`` is false).

Run by ``gpu_check/run.sh`` on a machine with one NVIDIA GPU: ``python -m pytest -m cuda tests``.

- NCCL on one rank: ``spngd_ds.initialize`` builds the engine over an NCCL process group and SP-NGD
  takes steps there (every tensor a collective sees must be on the GPU; gloo on the CPU cannot tell).
- One SP-NGD step on the GPU gives the parameters one step on the CPU gives (fp32, TF32 off).
- bf16 at ZeRO stages 0-3 and fp16 (dynamic loss scale) at stages 1-3: a few steps, every loss
  finite, the loss goes down, and SP-NGD stepped (fp16 overflow steps may be skipped, counted).

All tests share one world-of-one NCCL group created by the first engine (``spngd_ds.initialize``
fills in the single-process environment), so they run in the pytest process itself.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() false)"),
]

STEPS = 6
BATCH = 16


def tiny_model() -> nn.Module:
    """Conv2d + BatchNorm + Linear, the layer kinds SP-NGD preconditions (Kronecker and unit-wise)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )


def batch(device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return x.to(device), y.to(device)


def ds_config(stage: int, precision: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 1000,
        "optimizer": {"type": "SPNGD", "params": {"lr": 0.05, "momentum": 0.9, "damping": 1e-2}},
        "zero_optimization": {"stage": stage},
    }
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"buffer_dtype": "bf16"}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
        cfg["data_types"] = {"buffer_dtype": "fp16"}
    return cfg


def train(stage: int, precision: str, steps: int = STEPS) -> tuple[Any, Any, list[float]]:
    import spngd_ds

    engine, opt, _, _ = spngd_ds.initialize(model=tiny_model(), config=ds_config(stage, precision))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    x, y = batch(engine.device)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return engine, opt, losses


def test_nccl_one_rank_initialize() -> None:
    import torch.distributed as dist

    import spngd_ds

    engine, opt, losses = train(0, "fp32")
    assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    assert isinstance(opt, spngd_ds.SPNGD) and opt.step_count == STEPS
    assert all(p.is_cuda for p in engine.module.parameters())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses


def test_one_step_on_gpu_matches_cpu() -> None:
    import spngd_ds

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_model().to(device)
        opt = spngd_ds.SPNGD(model, lr=0.05, momentum=0.9, damping=1e-2)
        x, y = batch(device)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        results[device] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    start = tiny_model().state_dict()
    for name, cpu in results["cpu"].items():
        if cpu.is_floating_point():
            torch.testing.assert_close(results["cuda"][name], cpu, rtol=1e-4, atol=1e-5, msg=name)
    moved = [n for n, v in results["cpu"].items() if v.is_floating_point() and not torch.equal(v, start[n])]
    assert moved, "the step changed no parameter"


@pytest.mark.parametrize(
    ("precision", "stage"), [("bf16", 0), ("bf16", 1), ("bf16", 2), ("bf16", 3), ("fp16", 1), ("fp16", 2), ("fp16", 3)]
)
def test_half_precision_stages_train(precision: str, stage: int) -> None:
    engine, opt, losses = train(stage, precision, steps=STEPS + 4)
    assert all(math.isfinite(v) for v in losses), losses
    assert min(losses[-3:]) < losses[0], f"{precision} stage {stage}: loss did not go down: {losses}"
    skipped = int(getattr(getattr(opt, "stats_log", None), "skipped_steps", 0))  # fp16 overflow steps
    assert opt.step_count >= STEPS + 4 - 3, (opt.step_count, skipped)
    assert all(p.is_cuda for p in engine.module.parameters())
