"""spngd_ds.process_exit keeps the exit status and the job's last output.

The exit status is kept and what the job printed or logged last (no newline, buffered in a pipe)
still arrives.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.dist


def test_exit_process_keeps_status_and_flushes_output() -> None:
    code = textwrap.dedent(
        """
        import atexit, logging, sys
        from spngd_ds.process_exit import exit_process
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
        atexit.register(lambda: print("atexit ran"))
        print("last words", end="")
        logging.getLogger("job").info("logged")
        exit_process(3)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a buffered stdout, as a plain job has
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=60)
    assert r.returncode == 3
    assert r.stdout == "last words"  # flushed from the pipe's buffer; the atexit handler did not run
    assert r.stderr.strip() == "logged"
