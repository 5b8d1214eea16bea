"""A cheap check that every data-parallel rank holds the same parameters and schedules.

Ranks must never silently diverge: after a step, every rank must hold the same parameters and the
same refresh schedules.

Each rank reduces its state to a short float64 fingerprint (per parameter: sum and sum of squares;
per statistic: interval and next step); fingerprints are all-gathered and must be bit-identical.
On by default in the test-suite (``SPNGD_CHECK_AGREEMENT=1``); off in production unless asked.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from spngd_ds.optimizer import SPNGD

ENV_FLAG = "SPNGD_CHECK_AGREEMENT"


def enabled() -> bool:
    """Whether the environment asks for the check after every step."""
    return os.environ.get(ENV_FLAG, "0") not in ("", "0", "false", "False")


def fingerprint(opt: SPNGD, params: Iterable[torch.Tensor]) -> torch.Tensor:
    """float64 vector summarising ``params`` and every refresh schedule of ``opt``."""
    parts: list[torch.Tensor] = []
    for p in params:
        v = p.detach().double()
        parts.append(torch.stack([v.sum(), (v * v).sum()]).cpu())
    for b in opt.blocks.values():
        for s in b.stats.values():
            parts.append(torch.tensor(s.schedule.state(), dtype=torch.float64))
    parts.append(torch.tensor([float(opt.step_count)], dtype=torch.float64))
    return torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float64)


def check_rank_agreement(opt: SPNGD, params: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> None:
    """Raise ``RuntimeError`` naming the ranks whose fingerprint differs from rank 0's."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = fingerprint(opt, params).to(device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    bad = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if bad:
        first = int((gathered[bad[0]] != gathered[0]).nonzero()[0])
        raise RuntimeError(
            f"SPNGD: ranks {bad} disagree with rank 0 after step {opt.step_count} "
            f"(first differing fingerprint entry {first}: parameters or refresh schedules diverged)"
        )
