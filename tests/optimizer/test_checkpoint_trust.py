"""SP-NGD's own checkpoint files are read with ``torch.load(weights_only=True)``.

A real state round-trips through that loader, and a file that carries a pickled callable is refused
with an error that names the file instead of being executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds
from spngd_ds.deepspeed.checkpoint import read_states


def _trained_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    opt = spngd_ds.SPNGD(model, lr=0.1, damping=1e-2)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    state["world_size"] = 1
    return state


def test_real_state_loads_with_weights_only(tmp_path: Path) -> None:
    state = _trained_state()
    assert state["curvature"], "the state must carry curvature for this test to mean anything"
    torch.save(state, tmp_path / "spngd_rank00000-of-00001.pt")
    (loaded,), world = read_states(str(tmp_path))
    assert world == 1
    assert loaded["step"] == state["step"] == 2
    for block, stats in state["curvature"].items():
        for name, entry in stats.items():
            if isinstance(entry, dict):
                assert torch.equal(loaded["curvature"][block][name]["inverse"], entry["inverse"])


def test_file_with_a_pickled_callable_is_refused(tmp_path: Path) -> None:
    state = _trained_state()
    state["payload"] = os.system  # unpickling this by reference is how a checkpoint runs code
    path = tmp_path / "spngd_rank00000-of-00001.pt"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="refusing SP-NGD checkpoint file .*spngd_rank00000-of-00001.pt"):
        read_states(str(tmp_path))
