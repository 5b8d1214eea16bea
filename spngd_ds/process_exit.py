"""Ending a distributed process without the interpreter's teardown (part of the library).

torch's gloo process group runs and frees its work items on worker threads of its own. A work item
(a barrier keeps every earlier one alive) can hold the last C++ reference to a tensor Python also
sees, and letting it go takes the GIL. When that happens while the interpreter finalizes, CPython
ends the worker thread with ``pthread_exit``, the unwind meets a ``noexcept`` frame, and the process
aborts: SIGABRT, "terminate called without an active exception", after the job has finished and
written everything (pytorch/pytorch#190489; the core dump of one such abort here shows exactly this
stack: ``ProcessGroupGloo::runLoop`` → ``~AsyncBarrierWork`` → ``~AsyncAllgatherWork`` →
``decref_pyobject`` → ``take_gil`` → ``PyThread_exit_thread``). ``destroy_process_group()`` does not
prevent it: DeepSpeed keeps references to the groups, so their threads outlive the call. Measured
on 2 CPU ranks: about 1 run in 40 of a ZeRO-3 bf16 test job, and the 12-step training job once in
a full test run. The launcher then reports the whole run as failed.

:func:`exit_process` flushes what a job writes (logging, stdout, stderr) and leaves by
``os._exit``, so that nothing is finalized after that point. Call it last, once every rank has
destroyed its process group and closed what it writes (W&B's ``finish``, checkpoints): ``atexit``
handlers do not run.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

__all__ = ["exit_process"]


def exit_process(code: int = 0) -> NoReturn:
    """Flush logging, stdout and stderr, then end the process with exit status ``code``.

    ``code`` is 0-255. The interpreter's teardown is skipped (see the module docstring for why).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to save
            pass
    os._exit(code)
