"""Baseline optimizers DeepSpeed cannot build on the CPU, handed to it as client optimizers.

DeepSpeed's ``"type": "Lamb"`` is ``deepspeed.ops.lamb.FusedLamb``, a CUDA-only fused op, so a LAMB
baseline would not run on a machine without a GPU. A config names one of :data:`CLIENT_OPTIMIZERS`
instead, e.g.::

    "optimizer": {"type": "pytorch_optimizer.Lamb", "params": {"lr": 0.02, "betas": [0.9, 0.999]}}

and :func:`pop_client_optimizer` (called by ``launch/train.py`` before ``spngd_ds.initialize``)
removes the block, builds the optimizer over the model's parameters, and returns it; DeepSpeed then
takes it as ``optimizer=...`` and still builds the config's ``"scheduler"`` around it. This is the
training job's business: the library (``spngd_ds``) knows nothing of it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["CLIENT_OPTIMIZERS", "ClientOptimizer", "pop_client_optimizer"]


@dataclass(frozen=True)
class ClientOptimizer:
    """One optimizer type the job builds itself.

    Attributes:
        type: the ``"type"`` a config writes (matched case-insensitively).
        module: the module that defines it (imported on use).
        attr: the class name in that module.
        extra: the pip extra that installs the module.
    """

    type: str
    module: str
    attr: str
    extra: str = "train"

    def cls(self) -> Callable[..., torch.optim.Optimizer]:
        """The optimizer class, imported on first use; ``ValueError`` when it is missing."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise ValueError(
                f'optimizer type "{self.type}" needs the package {self.module!r}: '
                f"pip install 'spngd_ds[{self.extra}]'"
            ) from exc
        return getattr(module, self.attr)


#: Types the job accepts in addition to DeepSpeed's own (keys are lower case).
CLIENT_OPTIMIZERS: dict[str, ClientOptimizer] = {
    c.type.lower(): c for c in (ClientOptimizer("pytorch_optimizer.Lamb", "pytorch_optimizer", "Lamb"),)
}


def _keyword_names(cls: Callable[..., Any]) -> list[str]:
    """The constructor's keyword arguments, without ``params`` and ``**kwargs`` (which would swallow typos)."""
    names = []
    for name, p in inspect.signature(cls).parameters.items():
        if name not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.append(name)
    return names


def _plain(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value  # JSON arrays (betas) as tuples


def pop_client_optimizer(config: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer | None:
    """Build the config's optimizer here when DeepSpeed lacks its type (see :data:`CLIENT_OPTIMIZERS`).

    When ``config["optimizer"]["type"]`` is one of them, the block is removed from ``config`` (in
    place), ``zero_allow_untested_optimizer`` is set under ZeRO (DeepSpeed requires it for any client
    optimizer), and the optimizer over ``model.parameters()`` is returned. Otherwise nothing changes
    and ``None`` is returned.

    Raises:
        ValueError: a key of the block or of its ``params`` that the optimizer does not take (named,
            with a did-you-mean and the allowed keys), or its package is not installed.
    """
    block = config.get("optimizer")
    if not isinstance(block, dict):
        return None
    entry = CLIENT_OPTIMIZERS.get(str(block.get("type", "")).lower())
    if entry is None:
        return None
    where = f'optimizer "{entry.type}"'
    for key in block:
        if key not in ("type", "params"):
            raise ValueError(f"{where}: unknown key {key!r} (allowed keys: type, params)")
    params = block.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: params must be a JSON object, got {type(params).__name__}")
    cls = entry.cls()
    allowed = _keyword_names(cls)
    for key in params:
        if key not in allowed:
            guess = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            raise ValueError(f"{where}: unknown params key {key!r}{hint} (allowed: {', '.join(allowed)})")
    optimizer = cls(model.parameters(), **{k: _plain(v) for k, v in params.items()})
    del config["optimizer"]
    if int((config.get("zero_optimization") or {}).get("stage", 0) or 0) > 0:
        config["zero_allow_untested_optimizer"] = True
    return optimizer
