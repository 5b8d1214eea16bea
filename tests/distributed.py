"""Launching test ranks from a test: tests/ds_worker.py under torchrun, or functions on forked gloo ranks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "ds_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(
    nproc: int, args: list[str], timeout: float = 240.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the worker on ``nproc`` ranks; raise with its output when it fails and ``check``."""
    tag = uuid.uuid4().hex  # marks every process of this launch, to find the ranks torchrun detached
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT), SPNGD_TEST_LAUNCH=tag)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", str(WORKER), *args,
    ]
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT), start_new_session=True
    ) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)  # the launcher and what shares its session
            # torchrun starts ranks in sessions of their own; a rank that had not yet asked to die
            # with its parent (die_with_launcher) would keep the pipes open and hang communicate()
            kill_tagged(tag)
            popen.communicate()
            raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if check and proc.returncode != 0:
        err = without_deprecation_noise(proc.stderr)
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{err[-8000:]}")
    return proc


def without_deprecation_noise(text: str) -> str:
    """``text`` less the FutureWarning pairs torch prints on every deprecated collective DeepSpeed
    calls, which otherwise fill the tail of a failed run's stderr and hide why a rank died."""
    lines = text.splitlines()
    keep = []
    for i, line in enumerate(lines):
        if "FutureWarning:" in line or (line.strip() == "return func(*args, **kwargs)"
                                        and i > 0 and "FutureWarning:" in lines[i - 1]):
            continue
        keep.append(line)
    return "\n".join(keep)


def kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment carries ``SPNGD_TEST_LAUNCH=tag`` (Linux /proc)."""
    needle = f"SPNGD_TEST_LAUNCH={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def fork_ranks(target: Callable[[int, int, str], None], world: int, out: Path, timeout: float = 240.0) -> list[Any]:
    """Run ``target(rank, port, str(out))`` on ``world`` processes forked from this one (gloo ranks
    that rendezvous on one free port), kill any still alive after ``timeout`` seconds, assert that
    every rank exited with 0, and return what each saved as ``out/rank{r}.pt`` (None where a rank
    saved nothing there)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * world, [p.exitcode for p in procs]
    files = [out / f"rank{r}.pt" for r in range(world)]
    return [torch.load(f, weights_only=False) if f.exists() else None for f in files]


def run_worker(nproc: int, out: Path, *args: str, **kw: Any) -> dict[str, Any]:
    """Run the worker and load rank 0's result ``{"params": ..., "info": ...}``."""
    torchrun(nproc, [*args, "--out", str(out)], **kw)
    return dict(torch.load(out, weights_only=False))


def max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of max|a - b| / max|b|."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
