"""SP-NGD's checkpoint (format ``spngd_ds/1``).

SP-NGD's checkpoint: what :meth:`SPNGD.state_dict <spngd_ds.optimizer.SPNGD.state_dict>` writes
and ``load_state_dict`` restores (format ``spngd_ds/1``).

Momentum is keyed by parameter name and curvature by layer name (owned blocks only; refresh
schedules of all blocks), so a checkpoint written at world size N can be loaded at world size M
once every rank's part is merged. Under ZeRO (``param_groups`` hold DeepSpeed's flat partitions)
the elementwise state is saved by position instead: DeepSpeed's own checkpoint restores those.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import nn

from spngd_ds.blocks import Block, KronBlock
from spngd_ds.blocks.embedding import EmbeddingBlock

logger = logging.getLogger("spngd_ds")

FORMAT = "spngd_ds/1"


def save_state(
    blocks: dict[str, Block],
    owned: list[Block],
    state: MutableMapping[Any, Any],
    param_groups: list[dict[str, Any]],
    live: Callable[[], dict[int, nn.Parameter]] | None,
    step: int,
    prev_lr: list[float | None],
    config: dict[str, Any],
) -> dict[str, Any]:
    """Return the state dict of an SP-NGD optimizer.

    The state dict of an optimizer with ``blocks`` (``owned`` by this rank), elementwise
    ``state`` and ``param_groups``; ``live()`` maps id(model parameter) -> the tensor updated for
    it (``None``: the groups hold flat partitions, saved by position); ``step``: steps applied;
    ``prev_lr``: each group's learning rate of the last update; ``config``: the validated
    hyperparameters as a plain dict.
    """
    names = {id(p): n for b in blocks.values() for p, n in zip(b.params, b.param_names, strict=True)}
    momentum: dict[str, torch.Tensor] = {}
    if live is not None:
        tensors = live()
        for b in owned:
            for p in b.params:
                buf = state.get(tensors[id(p)], {}).get("momentum_buffer")
                if buf is not None:
                    momentum[names[id(p)]] = buf.detach().clone()
    curvature = {
        b.name: {
            # the sample count behind the value: the owner's noise floor for the next refresh
            s.name: {"value": s.value, "inverse": _own_storage(s.inverse), "samples": s.schedule.last_samples}
            for s in b.stats.values()
            if s.value is not None
        }
        | ({"pi": b.pi} if isinstance(b, KronBlock | EmbeddingBlock) else {})
        for b in owned
        if b.stats
    }
    flat = [p for g in param_groups for p in g["params"]]
    return {
        "format": FORMAT,
        "step": step,
        "prev_lr": list(prev_lr),
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in param_groups],
        "momentum": momentum,
        "curvature": curvature,
        "schedules": {f"{b.name}:{s.name}": s.schedule.state() for b in blocks.values() for s in b.stats.values()},
        "elementwise_state": {i: dict(state[p]) for i, p in enumerate(flat)} if live is None else None,
        "config": config,
    }


def load_state(
    state_dict: dict[str, Any],
    blocks: dict[str, Block],
    owned: list[Block],
    state: MutableMapping[Any, Any],
    param_groups: list[dict[str, Any]],
    live: Callable[[], dict[int, nn.Parameter]] | None,
    config: dict[str, Any],
    group_keys: dict[str, Any],
) -> tuple[int, list[float | None]]:
    """Restore a state dict written by :func:`save_state`.

    Restore :func:`save_state` output (possibly merged from several ranks' files) into the
    same objects (see there); ``group_keys``: the parameter-group hyperparameters, whose
    checkpointed values win over ``config``. Returns the step count and the previous learning
    rates to resume with.
    """
    if state_dict.get("format") != FORMAT:
        raise ValueError(
            f"SPNGD.load_state_dict: not an SP-NGD state dict (missing format '{FORMAT}'); "
            f"keys found: {sorted(state_dict)[:8]}"
        )
    for group, saved in zip(param_groups, state_dict["param_groups"], strict=False):
        group.update(saved)
    keep_schedules = _log_config_changes(config, state_dict.get("config") or {}, group_keys)
    step = int(state_dict["step"])
    for key, sched in state_dict["schedules"].items():
        bname, sname = key.rsplit(":", 1)
        if keep_schedules and bname in blocks and sname in blocks[bname].stats:
            blocks[bname].stats[sname].schedule.load(sched)
    if not keep_schedules:  # every statistic is refreshed at the next step under the new rule
        for b in blocks.values():
            for st in b.stats.values():
                st.schedule.load((1, step))
    if live is None and state_dict.get("elementwise_state") is not None:
        flat = [p for g in param_groups for p in g["params"]]
        for i, st in state_dict["elementwise_state"].items():
            state[flat[int(i)]] = dict(st)
    elif live is not None:
        tensors = live()
        momentum = state_dict["momentum"]
        for b in owned:
            for p, n in zip(b.params, b.param_names, strict=True):
                if n in momentum:
                    target = tensors[id(p)]
                    state[target]["momentum_buffer"] = momentum[n].to(target.device, target.dtype).clone()
    for b in owned:
        saved = state_dict["curvature"].get(b.name, {})
        for s in b.stats.values():
            if s.name in saved:
                s.value = saved[s.name]["value"]
                s.inverse = saved[s.name]["inverse"]
                s.schedule.last_samples = saved[s.name].get("samples")
        if isinstance(b, KronBlock | EmbeddingBlock) and "pi" in saved:
            b.pi = float(saved["pi"])
    return step, list(state_dict["prev_lr"])


def _log_config_changes(now: dict[str, Any], saved: dict[str, Any], group_keys: dict[str, Any]) -> bool:
    """Log the hyperparameters that changed since the checkpoint.

    Log every hyperparameter that differs from the checkpoint's; the saved refresh schedules
    are kept only when the staleness rule is unchanged (returns whether they are).
    """
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
    for key, (old, new) in changed.items():
        if key in group_keys:  # a parameter-group value: the checkpoint's (and its schedule's) wins
            logger.warning("SPNGD: config has %s = %r; the checkpoint's %s = %r is kept", key, new, key, old)
        else:
            logger.warning("SPNGD: resuming with %s = %r (checkpoint had %r)", key, new, old)
    return "staleness" not in changed


def _own_storage(t: torch.Tensor | None) -> torch.Tensor | None:
    """Return ``t`` holding only its own elements.

    ``t``, or a copy of it when it is a view of a larger tensor (a slot of a stack of inverses),
    so that a checkpoint holds only its own elements.
    """
    if t is None or t._base is None:
        return t
    return t.clone()
