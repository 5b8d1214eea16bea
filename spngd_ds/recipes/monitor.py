"""Weights & Biases logging from rank 0, next to DeepSpeed's own ``"wandb"`` monitor.

DeepSpeed's monitor (``"wandb": {"enabled": true, "project": ...}`` in the config) opens a run on
rank 0 inside ``deepspeed.initialize`` and logs its own figures (train loss, lr) against
``global_samples``. :class:`WandbLogger` logs into that same run when there is one (or opens it
otherwise), against the same ``global_samples`` axis, so both sets of curves line up: the
recipe's train loss/accuracy, validation top-1, lr, throughput and the optimizer's ``metrics()``.

Offline use: ``WANDB_MODE=offline`` needs no login; :func:`prepare_wandb_env` chooses offline by
itself when no API key is configured, so a first run never stops at a login prompt.
"""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

__all__ = ["WandbLogger", "has_wandb_credentials", "prepare_wandb_env"]


def has_wandb_credentials() -> bool:
    """Whether an API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry from ``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def prepare_wandb_env(wandb_dir: str) -> str:
    """Set W&B environment defaults before DeepSpeed opens its run; returns the mode in effect.

    - ``WANDB_DIR`` defaults to ``wandb_dir`` (runs go to ``wandb_dir/wandb/``), created here.
    - ``WANDB_MODE`` defaults to ``offline`` when no credentials are configured.
    Variables the user exported win.
    """
    os.makedirs(wandb_dir, exist_ok=True)
    os.environ.setdefault("WANDB_DIR", os.path.abspath(wandb_dir))
    if "WANDB_MODE" not in os.environ and not has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


class WandbLogger:
    """Rank-0 W&B logger; a no-op on other ranks or when ``enabled`` is false.

    Args:
        enabled: log at all (the DeepSpeed config's ``wandb.enabled``).
        rank: this process's global rank; only rank 0 logs.
        project: W&B project (the config's ``wandb.project``).
        group, team: W&B group and entity, as in DeepSpeed's block.
        run_config: hyperparameters to attach to the run (flags, the DeepSpeed config).
    """

    def __init__(
        self,
        enabled: bool,
        rank: int,
        project: str = "spngd_ds",
        group: str | None = None,
        team: str | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Log to Weights & Biases on rank 0 when ``enabled``; a no-op otherwise."""
        self.active = bool(enabled) and rank == 0
        self.run: Any = None
        if not self.active:
            return
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a dependency
            print("wandb is not installed; W&B logging is off", file=sys.stderr)
            self.active = False
            return
        if wandb.run is None:
            self.run = wandb.init(
                project=project,
                group=group,
                entity=team,
                dir=os.environ.get("WANDB_DIR"),
                config=dict(run_config or {}),
            )
        else:  # DeepSpeed's monitor opened it
            self.run = wandb.run
            if run_config:
                self.run.config.update(dict(run_config), allow_val_change=True)

    @property
    def run_dir(self) -> str | None:
        """Directory of the run's files (e.g. ``.../wandb/offline-run-<time>-<id>/files``), or None."""
        return None if self.run is None else str(self.run.dir)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalars at ``step`` (DeepSpeed's ``global_samples``, shared with its monitor)."""
        if self.active and self.run is not None:
            self.run.log(dict(metrics), step=step)

    def finish(self) -> None:
        """Close the run (flushes offline files)."""
        if self.active and self.run is not None:
            self.run.finish()
            self.run = None
