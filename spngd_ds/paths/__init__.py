"""The paths of an SP-NGD step.

How an SP-NGD step moves gradients to the owners of their curvature blocks and the results
back (docs/design.md §3 "Paths are objects"), behind one interface (:mod:`spngd_ds.paths.base`).
:func:`spngd_ds.initialize` picks one per engine:

- :class:`~spngd_ds.paths.fast.FastPath`: standalone and ZeRO stage 0. SP-NGD reduces the
  gradients itself, owners update their layers, the parameters are gathered back.
- :class:`~spngd_ds.paths.compatible.CompatiblePath`: ZeRO 1, 2, 3 (and CPU offload). DeepSpeed
  reduces and partitions gradients and owns the fp32 master weights; owners precondition before
  DeepSpeed's step, which then calls SP-NGD on its flat partitions for the momentum update.

:mod:`spngd_ds.paths.overlap` sends A factors to their owners behind the backward, for either path.
"""

from __future__ import annotations

from typing import Any

from spngd_ds.paths.base import StepOptimizer, StepPath
from spngd_ds.paths.fast import FastPath

__all__ = ["CompatiblePath", "FastPath", "StepOptimizer", "StepPath", "default_path"]


def default_path() -> StepPath:
    """The path of a standalone ``SPNGD``: the fast path, reporting skipped steps on the optimizer."""
    return FastPath()


def __getattr__(name: str) -> Any:
    # the compatible path is for DeepSpeed's ZeRO engines only: imported when asked for
    if name == "CompatiblePath":
        from spngd_ds.paths.compatible import CompatiblePath

        return CompatiblePath
    raise AttributeError(f"module 'spngd_ds.paths' has no attribute {name!r}")
