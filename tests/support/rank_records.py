"""What each rank of a multi-process test run ended with, in a file of its own.

A launcher that stops every rank as soon as one exits non-zero (torchrun's elastic agent does) can
kill a rank before its own error reaches the shared output, so a test that counts messages in that
output can see one rank's error where every rank raised it. A rank that records its outcome in its
own file (``<out>.rank{r}.json``, written whole or not at all) before it exits, and then waits a
bounded time until its siblings have recorded theirs, leaves the test a complete account.

The record also says how many ``torch.distributed`` collectives the rank had called by then
(:func:`count_collectives`), and whether it had a process group at all, which is how a test proves
that a refusal came before any collective.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
import traceback
import types
from pathlib import Path
from typing import Any

#: torch.distributed functions that talk to other ranks (with torch 2.14's ``*_single`` forms and
#: the private ``_all_gather_base``/``_reduce_scatter_base`` older DeepSpeed paths call).
COLLECTIVE = re.compile(
    r"^_?(all_reduce|broadcast|all_gather|reduce_scatter|all_to_all|barrier|monitored_barrier|reduce|gather"
    r"|scatter|send|recv|isend|irecv|batch_isend_irecv)(_[a-z_]+)?$"
)


def count_collectives() -> dict[str, int]:
    """Wrap every collective of ``torch.distributed`` with a counter; return the live counts.

    The counts map a collective's name to its calls so far in this process.

    Both ``torch.distributed`` and ``torch.distributed.distributed_c10d`` are patched, so calls made
    through either module (DeepSpeed's comm layer looks them up on ``torch.distributed`` at call
    time; torch's own ``*_object`` helpers call ``distributed_c10d``'s functions) are counted; one
    ``all_gather_object`` therefore counts its inner collectives too. Call it before anything that
    may communicate has run.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    counts: dict[str, int] = {}
    for name in dir(c10d):
        original = getattr(c10d, name)
        if not COLLECTIVE.match(name) or not isinstance(original, types.FunctionType):
            continue

        def counted(*args: Any, _name: str = name, _fn: Any = original, **kwargs: Any) -> Any:
            counts[_name] = counts.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        wrapper = functools.wraps(original)(counted)
        for module in (c10d, dist):
            if getattr(module, name, None) is original:
                setattr(module, name, wrapper)
    return counts


def record_path(out: str, rank: int) -> Path:
    """Where rank ``rank`` of a run with ``--out out`` records how it ended (``{rank}`` in ``out`` is dropped)."""
    return Path(f"{out.replace('{rank}', '')}.rank{rank}.json")


def write_record(out: str, rank: int, record: dict[str, Any]) -> None:
    """Write ``record`` as JSON to :func:`record_path`, whole or not at all.

    A temporary file is renamed, so a reader never sees half of it.
    """
    path = record_path(out, rank)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def failure_record(exc: BaseException, counts: dict[str, int]) -> dict[str, Any]:
    """What a rank records when ``exc`` ends it.

    The exception's type, message and last traceback line, the whole traceback, the collectives
    called so far, and whether a process group existed.
    """
    import torch.distributed as dist

    return {
        "ok": False,
        "type": type(exc).__name__,
        "message": str(exc),
        "last_line": traceback.format_exception_only(exc)[-1].strip(),
        "traceback": "".join(traceback.format_exception(exc)),
        "collectives": sum(counts.values()),
        "collective_calls": dict(counts),
        "process_group_initialized": dist.is_available() and dist.is_initialized(),
    }


def success_record(counts: dict[str, int]) -> dict[str, Any]:
    """What a rank records when it finished: the collectives it called."""
    return {"ok": True, "collectives": sum(counts.values()), "collective_calls": dict(counts)}


def wait_for_records(out: str, world: int, timeout: float) -> None:
    """Return once every rank of ``world`` has recorded its outcome, or after ``timeout`` seconds.

    A failing rank waits here before it exits, so that a launcher that stops the other ranks on the
    first failure cannot stop one before it got as far as this one (no collective involved).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(record_path(out, r).exists() for r in range(world)):
            return
        time.sleep(0.05)


def read_records(out: Path | str, world: int) -> list[dict[str, Any] | None]:
    """Every rank's record of a run with ``--out out`` (None where a rank recorded nothing)."""
    paths = [record_path(str(out), r) for r in range(world)]
    return [json.loads(p.read_text()) if p.exists() else None for p in paths]
