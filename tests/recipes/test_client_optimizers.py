"""Baselines that run everywhere.

pytorch-optimizer's LAMB as a client optimizer of the training job (DeepSpeed's own ``"Lamb"`` is
CUDA-only), selected by ``"type": "pytorch_optimizer.Lamb"``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from spngd_ds.recipes.client_optimizers import CLIENT_OPTIMIZERS, pop_client_optimizer

ROOT = Path(__file__).resolve().parents[2]
LAMB_CONFIGS = ("digits_cpu_lamb.json", "imagenet_resnet50_32k_lamb.json")

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


def _lamb_config(**params: object) -> dict[str, Any]:
    return {"optimizer": {"type": "pytorch_optimizer.Lamb", "params": dict(params)}, "zero_optimization": {"stage": 0}}


def test_lamb_block_becomes_a_client_optimizer() -> None:
    model = nn.Linear(3, 2)
    cfg = _lamb_config(lr=0.02, betas=[0.8, 0.99], weight_decay=0.01)
    opt = pop_client_optimizer(cfg, model)
    assert isinstance(opt, pytorch_optimizer.Lamb)
    assert "optimizer" not in cfg and "zero_allow_untested_optimizer" not in cfg
    group = opt.param_groups[0]
    assert group["lr"] == 0.02 and tuple(group["betas"]) == (0.8, 0.99) and group["weight_decay"] == 0.01
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}


def test_lamb_under_zero_allows_the_client_optimizer() -> None:
    cfg = _lamb_config(lr=0.01)
    cfg["zero_optimization"]["stage"] = 2
    assert pop_client_optimizer(cfg, nn.Linear(3, 2)) is not None
    assert cfg["zero_allow_untested_optimizer"] is True


def test_deepspeed_types_are_left_to_deepspeed() -> None:
    for block in ({"type": "SPNGD", "params": {}}, {"type": "Lamb", "params": {"lr": 1e-3}}, None):
        cfg = {"optimizer": block} if block is not None else {}
        before = json.dumps(cfg)
        assert pop_client_optimizer(cfg, nn.Linear(3, 2)) is None
        assert json.dumps(cfg) == before


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ({"type": "pytorch_optimizer.Lamb", "params": {"betas1": [0.9]}}, "key 'betas1'; did you mean 'betas'"),
        ({"type": "pytorch_optimizer.Lamb", "params": {"max_coeff": 10.0}}, "unknown params key 'max_coeff'"),
        ({"type": "pytorch_optimizer.Lamb", "parms": {}}, "unknown key 'parms'"),
        ({"type": "pytorch_optimizer.Lamb", "params": [0.1]}, "params must be a JSON object"),
    ],
)
def test_bad_lamb_blocks_name_the_key(block: dict[str, Any], match: str) -> None:
    cfg = {"optimizer": block}
    with pytest.raises(ValueError, match=match):
        pop_client_optimizer(cfg, nn.Linear(3, 2))
    assert cfg["optimizer"] is block  # nothing removed on error


def test_registry_is_pytorch_optimizers_lamb_as_in_the_benchmark() -> None:
    # bench/convergence.py's LAMB is pytorch_optimizer.Lamb(betas=(0.9, 0.999)); the job's is the same class
    assert CLIENT_OPTIMIZERS["pytorch_optimizer.lamb"].cls() is pytorch_optimizer.Lamb
    assert "pytorch_optimizer.Lamb(" in (ROOT / "bench" / "convergence.py").read_text()


@pytest.mark.parametrize("name", LAMB_CONFIGS)
def test_lamb_configs_build_the_client_optimizer(name: str) -> None:
    cfg = json.loads((ROOT / "ds_configs" / name).read_text())
    assert cfg["optimizer"]["type"] == "pytorch_optimizer.Lamb"
    assert isinstance(pop_client_optimizer(cfg, nn.Linear(3, 2)), pytorch_optimizer.Lamb)


@pytest.mark.dist
def test_digits_lamb_config_trains_through_launch_train(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--deepspeed_config",
        str(ROOT / "ds_configs" / LAMB_CONFIGS[0]),
        "--max_steps",
        "5",
        "--no_checkpoint",
        "--no_progress",
        "--log_interval",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "optimizer pytorch_optimizer." in out and ".Lamb" in out, out[-3000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith("summary:")]
    assert summary and summary[-1].startswith("summary: steps=5 "), out[-3000:]
