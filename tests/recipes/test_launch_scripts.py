"""launch/multinode.sh and the hostfile example: executable, usage text, the command it builds."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "multinode.sh"
HOSTFILE = ROOT / "launch" / "hostfile.example"

pytestmark = pytest.mark.timeout(60)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"MASTER_ADDR", "MASTER_PORT", "DATA_PATH", "CONFIG"}}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30)


def test_scripts_are_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert os.access(ROOT / "launch" / "train.py", os.X_OK)


def test_usage_and_missing_data_path() -> None:
    help_ = _run("-h")
    assert help_.returncode == 0 and "Usage: launch/multinode.sh -d DATA_PATH" in help_.stdout
    missing = _run("-H", str(HOSTFILE))
    assert missing.returncode == 2 and "DATA_PATH" in missing.stderr


def test_dry_run_builds_the_deepspeed_command() -> None:
    proc = _run("-d", "/data/imagenet", "-H", str(HOSTFILE), "-c", "ds_configs/imagenet_resnet50_131k.json", "-r",
                "-x", "--", "--max_steps", "5")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[0] == "deepspeed"
    pairs = dict(zip(argv[1:-1:1], argv[2::1], strict=False))
    assert pairs["--hostfile"] == str(HOSTFILE) and pairs["--num_nodes"] == "16" and pairs["--num_gpus"] == "8"
    assert pairs["--master_addr"] == "node001" and pairs["--master_port"] == "29500"
    assert argv.index("launch/train.py") < argv.index("--deepspeed_config")
    assert pairs["--deepspeed_config"] == "ds_configs/imagenet_resnet50_131k.json"
    assert pairs["--data_path"] == "/data/imagenet"
    assert pairs["--checkpoint_dir"] == "checkpoints/imagenet_resnet50_131k"
    assert argv[-3:] == ["--resume", "--max_steps", "5"]


def test_hostfile_example_has_128_slots() -> None:
    lines = [ln.split() for ln in HOSTFILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 16
    assert sum(int(slots.split("=")[1]) for _, slots in lines) == 128
