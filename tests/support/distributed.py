"""Launching test ranks from a test: tests/support/ds_worker.py under torchrun, or functions on forked gloo ranks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "support" / "ds_worker.py"


#: torchrun arguments that let it bind its own ports: the rendezvous store and the store the
#: ranks share are bound to port 0 (the kernel picks a free one and it stays bound). A port taken
#: from :func:`free_port` is released before the launcher binds it, and any process on the machine
#: can take it in between (the launch then fails with EADDRINUSE or joins a stranger's store).
STANDALONE = ("--standalone",)

#: exit status of a forked rank whose store could not bind its port (:func:`start_ranks` retries).
PORT_TAKEN = 75


def free_port() -> int:
    """A port that was free a moment ago.

    Another process may bind it before the caller does: callers retry, see :func:`start_ranks`.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_taken(text: str) -> bool:
    """Whether ``text`` (an error or a launch's output) says a port to bind was already in use."""
    return "EADDRINUSE" in text or "ddress already in use" in text


def torchrun(
    nproc: int, args: list[str], timeout: float = 240.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the worker on ``nproc`` ranks; raise with its output when it fails and ``check``."""
    tag = uuid.uuid4().hex  # marks every process of this launch, to find the ranks torchrun detached
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT), SPNGD_TEST_LAUNCH=tag)
    cmd = [sys.executable, "-m", "torch.distributed.run", *STANDALONE, f"--nproc_per_node={nproc}", str(WORKER), *args]
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
    """``text`` less the FutureWarning pairs torch prints on every deprecated collective.

    Those pairs come from every deprecated collective DeepSpeed calls; they would otherwise fill the
    tail of a failed run's stderr and hide why a rank died.
    """
    lines = text.splitlines()
    keep = []
    for i, line in enumerate(lines):
        if "FutureWarning:" in line or (
            line.strip() == "return func(*args, **kwargs)" and i > 0 and "FutureWarning:" in lines[i - 1]
        ):
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


def _forked_rank(target: Callable[[int, int], None], rank: int, port: int) -> None:
    """Body of a forked rank.

    ``target(rank, port)``; exit with :data:`PORT_TAKEN` when the port was taken by another process
    before rank 0's store bound it.
    """
    try:
        target(rank, port)
    except Exception as exc:
        if port_taken(str(exc)):
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(PORT_TAKEN)
        raise


def start_ranks(target: Callable[[int, int], None], world: int, timeout: float, attempts: int = 3) -> list[int | None]:
    """Run ``target(rank, port)`` on ``world`` processes forked from this one that rendezvous on one free port.

    Kill every rank still alive after ``timeout`` seconds and return the exit codes. When rank 0's
    store finds the port taken (:func:`free_port` cannot reserve it), every rank is stopped and the
    launch is repeated on a new port, up to ``attempts`` times.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("fork")
    for attempt in range(attempts):
        port = free_port()
        procs = [ctx.Process(target=_forked_rank, args=(target, r, port)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                if any(p.exitcode == PORT_TAKEN for p in procs):
                    break
                left = deadline - time.monotonic()
                wait([p.sentinel for p in procs if p.is_alive()], timeout=max(0.0, min(1.0, left)))
        finally:
            for p in procs:  # only the ranks started here, by their own handle
                if p.is_alive():
                    p.kill()
                p.join()
        codes = [p.exitcode for p in procs]
        if PORT_TAKEN not in codes or attempt == attempts - 1:
            return codes
    raise AssertionError("unreachable")


def fork_ranks(target: Callable[[int, int, str], None], world: int, out: Path, timeout: float = 240.0) -> list[Any]:
    """Run ``target(rank, port, str(out))`` on ``world`` forked gloo ranks and return what each saved.

    The ranks rendezvous on one free port (see :func:`start_ranks`); any still alive after
    ``timeout`` seconds is killed, every rank must exit with 0, and what each saved as
    ``out/rank{r}.pt`` is returned (None where a rank saved nothing there).
    """
    codes = start_ranks(lambda rank, port: target(rank, port, str(out)), world, timeout)
    assert codes == [0] * world, f"rank exit codes {codes} (tracebacks above, in the captured stderr)"
    files = [out / f"rank{r}.pt" for r in range(world)]
    return [torch.load(f, weights_only=False) if f.exists() else None for f in files]


def run_worker(nproc: int, out: Path, *args: str, **kw: Any) -> dict[str, Any]:
    """Run the worker and load rank 0's result ``{"params": ..., "info": ...}``."""
    torchrun(nproc, [*args, "--out", str(out)], **kw)
    return dict(torch.load(out, weights_only=False))


#: torchrun timeout of a launch that must fail at start-up (7-39 s measured on 2 busy cores).
REFUSAL_TIMEOUT_S = 150.0


def assert_refused_on_every_rank(
    records: list[dict[str, Any] | None], message: str, proc: subprocess.CompletedProcess[str]
) -> None:
    """Every rank recorded an error containing ``message``, before any collective or process group.

    The error's last line contains ``message``; it was raised before any collective call (counted by
    the worker) and before a process group existed.
    """
    for rank, record in enumerate(records):
        assert record is not None, f"rank {rank} recorded nothing:\n{without_deprecation_noise(proc.stderr)[-4000:]}"
        assert not record["ok"] and message in record["last_line"], (rank, record["last_line"])
        assert record["collectives"] == 0, (rank, record["collective_calls"])
        assert record["process_group_initialized"] is False, rank


def max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Max over tensors of max|a - b| / max|b|."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
