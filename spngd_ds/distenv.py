"""Process-group environment for a launch without a launcher (part of the library).

``spngd_ds.initialize`` calls :func:`ensure_single_process_env` before starting the process group,
so that a plain ``python script.py`` is a world of one rank; ``launch/train.py`` calls it too.

``deepspeed`` and ``torchrun`` export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. A plain ``python launch/train.py`` exports none of them, and DeepSpeed then tries
to discover the ranks through MPI (``mpi4py``). :func:`ensure_single_process_env` fills in a
one-process group on the loopback address instead.
"""

from __future__ import annotations

import os
import socket

__all__ = ["MPI_ENV_KEYS", "ensure_single_process_env", "free_port"]

#: Variables by which MPI launchers (Open MPI, MPICH/Intel MPI, Slurm+PMI) announce a rank.
MPI_ENV_KEYS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_single_process_env(local_rank: int | None = None) -> bool:
    """Export a one-process group's variables when no launcher did.

    Sets ``RANK=0``, ``WORLD_SIZE=1``, ``LOCAL_RANK`` (``local_rank`` or 0),
    ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT``, each only if missing. Does nothing when
    ``RANK`` and ``WORLD_SIZE`` are already set or an MPI launcher's variables are present.

    Returns:
        True when the variables were filled in (a plain ``python`` launch).
    """
    env = os.environ
    if ("RANK" in env and "WORLD_SIZE" in env) or any(k in env for k in MPI_ENV_KEYS):
        return False
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", str(local_rank if local_rank is not None and local_rank >= 0 else 0))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return True
