"""launch/train.py with the default SP-NGD digits config.

A stopped-and-resumed run continues exactly (SP-NGD's curvature state, refresh intervals and
momentum come back with the checkpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.support.train_job import TRAIN, checkpoint_weights, parse_summary, run_job

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "ds_configs" / "digits_cpu.json")


pytestmark = pytest.mark.dist


def _cmd(ckpt: Path, *extra: str) -> list[str]:
    return [sys.executable, TRAIN, "--deepspeed_config", CONFIG, "--checkpoint_dir", str(ckpt), "--no_progress",
            "--eval_interval", "100", *extra]  # fmt: skip


@pytest.mark.timeout(400)
def test_spngd_resume_continues_exactly(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_job(_cmd(straight, "--max_steps", "6"), cwd=tmp_path)
    run_job(_cmd(split, "--max_steps", "3"), cwd=tmp_path)
    out = run_job(_cmd(split, "--max_steps", "6", "--resume"), cwd=tmp_path)
    assert "resume: step 3" in out and parse_summary(out)[0] == 6
    a, b = checkpoint_weights(straight, "step6"), checkpoint_weights(split, "step6")
    for key in a:
        assert torch.equal(a[key], b[key]), key
