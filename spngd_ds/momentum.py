"""Momentum SGD with momentum correction (rule 7), applied in place to a parameter group.

For every parameter θ of a group with learning rate lr, momentum m and weight decay wd, given its
update direction d (the preconditioned gradient, or the plain gradient of a first-order layer):
v <- m_eff v - lr (d + wd θ); θ <- θ + v, with m_eff = m · lr / lr_prev when the learning rate
changed since the group's previous update (lr_prev) and m_eff = m otherwise.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch


def apply_momentum(
    group: dict[str, Any],
    state: MutableMapping[Any, Any],
    prev_lr: float | None,
    params: list[torch.Tensor],
    directions: list[torch.Tensor],
) -> None:
    """Apply rule 7 to every parameter of ``params`` (all of one param group), in place.

    Three multi-tensor ops (four with weight decay). Each parameter's velocity lives in
    ``state[p]["momentum_buffer"]`` (same shape and dtype as the parameter; created as zeros).

    Args:
        group: The param group (``lr``, ``momentum`` and ``weight_decay`` are read).
        state: The optimizer's per-parameter state (``Optimizer.state``).
        prev_lr: The group's learning rate at its previous update, or None before the first one.
        params: The parameters to update, each of any shape.
        directions: One update direction per parameter, of its shape (cast to its dtype).
    """
    if not params:
        return
    lr, m, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
    m_eff = m * lr / prev_lr if prev_lr is not None and prev_lr > 0 and prev_lr != lr else m
    ds = [d if d.dtype == p.dtype else d.to(p.dtype) for p, d in zip(params, directions, strict=True)]
    if wd != 0.0:
        ds = list(torch._foreach_add(ds, params, alpha=wd))
    bufs = []
    for p in params:
        p_state = state[p]
        buf = p_state.get("momentum_buffer")
        if buf is None:
            buf = p_state["momentum_buffer"] = torch.zeros_like(p)
        bufs.append(buf)
    torch._foreach_mul_(bufs, m_eff)
    torch._foreach_add_(bufs, ds, alpha=-lr)
    torch._foreach_add_(params, bufs)
