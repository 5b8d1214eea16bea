"""Test-process defaults.

The rank-agreement check on for every DeepSpeed run the tests launch (torchrun workers inherit the
environment), W&B offline, one intra-op thread (the CI box has 2 cores shared by the gloo ranks).
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("SPNGD_CHECK_AGREEMENT", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(1)
