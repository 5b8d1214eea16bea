"""Running ``launch/train.py`` from a test.

A clean environment, one retried run, and what the job left behind (its summary line, the weights
of a checkpoint).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import torch

from tests.support.distributed import port_taken

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "launch" / "train.py")
SUMMARY = re.compile(
    r"^summary: steps=(\d+) epochs=([\d.]+) best_val_top1=([\d.]+) final_val_top1=([\d.]+) wall_s=([\d.]+)$", re.M
)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")


def job_env(wandb_mode: str = "disabled") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE=wandb_mode, PYTHONUNBUFFERED="1")
    return env


def run_job(cmd: list[str], cwd: Path, wandb_mode: str = "disabled", timeout: int = 240) -> str:
    for _ in range(3):  # a one-process group binds a port found free a moment earlier: retry if taken
        proc = subprocess.run(cmd, cwd=cwd, env=job_env(wandb_mode), capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or not port_taken(out):
            break
    assert proc.returncode == 0, out[-4000:]
    return out


def parse_summary(out: str) -> tuple[int, float, float, float]:
    match = SUMMARY.search(out)
    assert match, out[-3000:]
    steps, epochs, best, final, _ = match.groups()
    return int(steps), float(epochs), float(best), float(final)


def checkpoint_weights(ckpt: Path, tag: str) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"]
