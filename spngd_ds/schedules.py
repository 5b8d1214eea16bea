"""Rule 9: learning rate (and optionally damping) schedule of the SP-NGD recipe.

With e = step / steps_per_epoch (fractional epochs):
    factor(e) = e / warmup_epochs                      for e < warmup_epochs
              = 1                                      for e < start_epoch
              = (1 - (e - start_epoch)/(end_epoch - start_epoch))^power until end_epoch, then 0.
lr = base_lr · factor; with ``decay_damping`` the group's ``damping`` follows the same factor
(without the warm-up part), never below ``min_damping``.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def poly_factor(epoch: float, warmup_epochs: float, start_epoch: float, end_epoch: float, power: float) -> float:
    """The multiplier of rule 9 at fractional ``epoch``."""
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return max(epoch, 0.0) / warmup_epochs
    return decay_factor(epoch, start_epoch, end_epoch, power)


def decay_factor(epoch: float, start_epoch: float, end_epoch: float, power: float) -> float:
    """The polynomial part of rule 9 alone (1 before ``start_epoch``)."""
    if epoch < start_epoch:
        return 1.0
    if epoch >= end_epoch:
        return 0.0
    frac = min(max((epoch - start_epoch) / (end_epoch - start_epoch), 0.0), 1.0)
    return (1.0 - frac) ** power


_REQUIRED = ("steps_per_epoch", "start_epoch", "end_epoch", "power")
_OPTIONAL = {"warmup_epochs": 0.0, "decay_damping": False, "min_damping": 0.0}


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_poly_params(params: dict[str, Any], where: str = "SPNGDPolyDecay") -> dict[str, Any]:
    """Check the keyword arguments of :class:`SPNGDPolyDecay` (types, ranges, unknown keys with a did-you-mean).

    Return them with defaults filled. Raises ``ValueError`` naming key, value and what is allowed.
    """
    allowed = (*_REQUIRED, *_OPTIONAL)
    for key in params:
        if key not in allowed:
            guess = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            raise ValueError(f"{where}: unknown key(s) ['{key}']{hint} (allowed: {sorted(allowed)})")
    for key in _REQUIRED:
        if key not in params:
            raise ValueError(f"{where}: '{key}' is required")
    out = {**_OPTIONAL, **params}
    start = out["start_epoch"]
    checks = {
        "steps_per_epoch": (
            _is_number(out["steps_per_epoch"])
            and out["steps_per_epoch"] > 0
            and float(out["steps_per_epoch"]).is_integer(),
            "an integer > 0",
        ),
        "start_epoch": (_is_number(start), "a number"),
        "end_epoch": (
            _is_number(out["end_epoch"]) and _is_number(start) and out["end_epoch"] > start,
            f"a number > start_epoch ({start!r})",
        ),
        "power": (_is_number(out["power"]) and out["power"] >= 0, "a number >= 0"),
        "warmup_epochs": (_is_number(out["warmup_epochs"]) and out["warmup_epochs"] >= 0, "a number >= 0"),
        "decay_damping": (isinstance(out["decay_damping"], bool), "true or false"),
        "min_damping": (_is_number(out["min_damping"]) and out["min_damping"] >= 0, "a number >= 0"),
    }
    for key, (ok, what) in checks.items():
        if not ok:
            raise ValueError(f"{where}: '{key}' = {out[key]!r} is invalid; allowed: {what}")
    out["steps_per_epoch"] = int(out["steps_per_epoch"])
    return out


class SPNGDPolyDecay(LRScheduler):
    """Polynomial decay of rule 9 as an ordinary ``torch.optim.lr_scheduler``; call ``step()`` once per optimizer step.

    Args:
        optimizer: any optimizer (SP-NGD's ``damping`` group key is used only with ``decay_damping``).
        steps_per_epoch: optimizer steps per epoch (> 0).
        start_epoch, end_epoch: e_start < e_end of the recipe.
        power: p >= 0.
        warmup_epochs: linear warm-up from 0 (0 disables it).
        decay_damping: let damping follow the same decay.
        min_damping: damping never decays below this.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        steps_per_epoch: int,
        start_epoch: float,
        end_epoch: float,
        power: float,
        warmup_epochs: float = 0.0,
        decay_damping: bool = False,
        min_damping: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        """Polynomial decay of every group's lr (and damping) per step; epochs may be fractional."""
        validate_poly_params(
            dict(
                steps_per_epoch=steps_per_epoch,
                start_epoch=start_epoch,
                end_epoch=end_epoch,
                power=power,
                warmup_epochs=warmup_epochs,
                decay_damping=decay_damping,
                min_damping=min_damping,
            )
        )
        self.steps_per_epoch = steps_per_epoch
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.power = power
        self.warmup_epochs = warmup_epochs
        self.decay_damping = decay_damping
        self.min_damping = min_damping
        self.base_dampings = [g.get("damping") for g in optimizer.param_groups]
        super().__init__(optimizer, last_epoch)

    def _epoch(self) -> float:
        return self.last_epoch / self.steps_per_epoch

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """Every group's learning rate at the current step."""
        f = poly_factor(self._epoch(), self.warmup_epochs, self.start_epoch, self.end_epoch, self.power)
        return [float(base) * f for base in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        """Advance one step; decays the damping too when ``decay_damping``."""
        super().step()
        if self.decay_damping:
            f = decay_factor(self._epoch(), self.start_epoch, self.end_epoch, self.power)
            for group, base in zip(self.optimizer.param_groups, self.base_dampings, strict=True):
                if base is not None:
                    group["damping"] = max(base * f, self.min_damping)
