"""Training recipes around the SP-NGD optimizer: data, models, augmentation, the loop.

Everything a user launches through ``launch/train.py`` lives here, one idea per module:

- :mod:`spngd_ds.recipes.data` -- datasets (scikit-learn digits, ImageNet-layout folders).
- :mod:`spngd_ds.recipes.loaders` -- resumable, rank-aware data loaders.
- :mod:`spngd_ds.recipes.models` -- the compact ResNet and torchvision models, BN gamma init.
- :mod:`spngd_ds.recipes.augment` -- mixup and per-sample random erasing on batches.
- :mod:`spngd_ds.recipes.client_optimizers` -- baselines DeepSpeed lacks on the CPU (pytorch-optimizer's LAMB).
- :mod:`spngd_ds.recipes.dsconfig` -- reading a DeepSpeed JSON and filling ``"auto"`` values.
- :mod:`spngd_ds.recipes.distenv` -- re-exports :mod:`spngd_ds.distenv` (process-group environment).
- :mod:`spngd_ds.recipes.checkpoint` -- the client state saved next to DeepSpeed's checkpoint.
- :mod:`spngd_ds.recipes.monitor` -- the rank-0 Weights & Biases logger.
- :mod:`spngd_ds.recipes.trainer` -- evaluation and the training loop.

Submodules are imported on demand so that ``import spngd_ds.recipes`` stays cheap.
"""

from __future__ import annotations

__all__ = [
    "augment",
    "checkpoint",
    "client_optimizers",
    "data",
    "distenv",
    "dsconfig",
    "loaders",
    "models",
    "monitor",
    "trainer",
]
