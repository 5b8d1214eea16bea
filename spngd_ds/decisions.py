"""Owners' refresh decisions reach every rank.

Rule 6: every rank agrees on when each statistic is refreshed next, so that every rank captures
it and takes part in its exchange at the same step.

A decision is a statistic's (interval, next step) pair, decided by its owner. It travels as two
numbers per statistic from owners to all: with the fast path inside the gathered update (when the
update's dtype holds it exactly), otherwise in an exchange of its own (:func:`share_decisions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spngd_ds.comm import Communicator, OwnerLayout
from spngd_ds.stat_exchange import Due


def decision_states(
    comm: Communicator, owners: dict[str, int], due: list[Due], dtype: torch.dtype
) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
    """Return the refresh decisions of ``due`` as exchange items.

    The refresh decisions of ``due`` as exchange items: one (2 elements, owner) item per
    statistic, and this rank's own decisions, (interval, next step) as (2,) tensors of
    ``dtype`` on the communicator's device, in ``due`` order.
    """
    items = [(2, owners[b.name]) for b, _ in due]
    mine = [
        torch.tensor(s.schedule.state(), dtype=dtype, device=comm.device) for b, s in due if owners[b.name] == comm.rank
    ]
    return items, mine


def load_decisions(due: list[Due], states: Sequence[torch.Tensor]) -> None:
    """Every rank takes the owners' decisions: ``states`` (2,) per statistic of ``due``."""
    for (_, s), state in zip(due, states, strict=True):
        s.schedule.load((int(state[0]), int(state[1])))


def share_decisions(comm: Communicator, owners: dict[str, int], due: list[Due]) -> None:
    """Share the owners' refresh decisions of ``due`` with every rank.

    The owners' decisions of ``due`` reach every rank in an exchange of their own (float64
    pairs, owners to all); nothing with one rank or nothing due.
    """
    if comm.world_size == 1 or not due:
        return
    items, mine = decision_states(comm, owners, due, torch.float64)
    layout = OwnerLayout.build(items, comm.world_size)
    load_decisions(due, comm.from_owners(layout, mine, torch.float64))


def exact_in(dtype: torch.dtype, step: int, max_interval: int) -> bool:
    """Whether a ``dtype`` holds every refresh decision of step ``step`` exactly.

    Whether every decision of step ``step``, intervals and next steps, is an integer ``dtype``
    holds exactly (float32: up to 2**24), so that it can travel with values of that dtype. The
    largest is a next step, at most ``step + max_interval``.
    """
    mantissa = {torch.float64: 53, torch.float32: 24}.get(dtype)
    return mantissa is not None and step + max_interval <= 2**mantissa
