"""spngd_ds: SP-NGD (Osawa et al., TPAMI 2020) for PyTorch and DeepSpeed.

Public surface (see docs/configuration.md and docs/design.md section 5):

- :class:`SPNGD` -- the optimizer (standalone ``torch.optim.Optimizer``).
- :func:`initialize` -- ``deepspeed.initialize`` that understands ``"type": "SPNGD"``.
- :class:`SPNGDPolyDecay` -- the learning-rate (and damping) schedule of rule 9.
- :func:`patch_deepspeed` -- make ``deepspeed.initialize`` itself understand ``"type": "SPNGD"``
  (HF Trainer, Accelerate, Lightning).
"""

from __future__ import annotations

from typing import Any

__all__ = ["SPNGD", "SPNGDPolyDecay", "SPNGDConfig", "initialize", "patch_deepspeed"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy so that `import spngd_ds` stays cheap and does not import DeepSpeed.
    if name == "SPNGD":
        from spngd_ds.optimizer import SPNGD

        return SPNGD
    if name == "SPNGDPolyDecay":
        from spngd_ds.schedules import SPNGDPolyDecay

        return SPNGDPolyDecay
    if name == "SPNGDConfig":
        from spngd_ds.config import SPNGDConfig

        return SPNGDConfig
    if name == "initialize":
        from spngd_ds.deepspeed.integration import initialize

        return initialize
    if name == "patch_deepspeed":
        from spngd_ds.deepspeed.patch import patch_deepspeed

        return patch_deepspeed
    raise AttributeError(f"module 'spngd_ds' has no attribute {name!r}")
