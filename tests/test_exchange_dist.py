"""The exchange layer (spngd_ds.comm: to_owners / from_owners / fragments, async, buckets) on 2, 3
and 4 gloo ranks without DeepSpeed: one launch of tests/exchange_worker.py per world size runs every
case (unequal owners, a rank that owns nothing, empty and zero-sized items, several buckets, fp32 /
bf16 / float64 wire dtypes, fragments cut anywhere, bytes by wrapping torch.distributed, the device
check). The worker asserts; this test launches it and reads rank 0's summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import ROOT, free_port

WORKER = ROOT / "tests" / "exchange_worker.py"


def launch(nproc: int, out: Path, timeout: float = 90.0) -> dict[str, object]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(WORKER), "--out", str(out)]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=str(ROOT), start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)  # the launcher and every rank it started
            popen.communicate()
            raise
    if popen.returncode != 0:
        raise AssertionError(f"exchange worker failed ({popen.returncode}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return dict(json.loads(out.read_text()))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_exchange_on_gloo_ranks(world: int, tmp_path: Path) -> None:
    summary = launch(world, tmp_path / "summary.json")
    assert summary["world"] == world and summary["ranks_done"] == world
    assert summary["exchange_runs"] == 5 * 3 * 2  # layouts x wire dtypes x bucket sizes
    assert int(str(summary["buckets_small"])) > 1  # the small bucket really cut the exchange
    assert summary["fragment_trials"] == 3
    assert summary["device_checks"] == 6
