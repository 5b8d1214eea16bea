"""What a step costs a GPU, counted on the CPU: host synchronisations, aten ops, devices.

- Every tensor SP-NGD keeps lives on its parameters' device, and the standalone optimizer moves
  nothing through its communicator: steps run with ``torch.set_default_device("meta")`` (a tensor
  created without an explicit device lands on ``meta``, and mixing it with the model's fails) and
  with a communicator whose exchange raises.
- Host synchronisations do not grow with the model: at most 3 in a step that refreshes nothing,
  at most 12 in a step that refreshes everything, none in the forward and backward (capture
  hooks), for torchvision ResNet-18 and ResNet-50; a step that refreshes nothing dispatches no
  more aten ops than ``torch.optim.SGD(momentum=0.9, foreach=False)``. Counted by
  ``bench/dispatch_counts.py`` (a dispatch mode), on the steps ``bench/step_counts.py`` measures.
- The same for the transformer block kinds (Embedding, LayerNorm and RMSNorm, a Linear with a
  diagonal factor): a stack of 3 layers synchronises as often as a stack of 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds
from bench.dispatch_counts import count_dispatch
from bench.step_counts import force, sgd_counts, spngd_counts
from spngd_ds.comm import Communicator, OwnerLayout

QUIET_SYNCS, REFRESH_SYNCS = 3, 12


class _NoExchange(Communicator):
    """A world of one rank whose exchange must not be used."""

    def to_owners(self, layout: OwnerLayout, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> Any:
        raise AssertionError("world size 1: nothing goes through the communicator")

    def from_owners(self, layout: OwnerLayout, mine: Sequence[torch.Tensor], dtype: torch.dtype) -> Any:
        raise AssertionError("world size 1: nothing goes through the communicator")


def _convbn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )


def _state_tensors(opt: spngd_ds.SPNGD) -> list[tuple[str, torch.Tensor]]:
    out = [(f"momentum {i}", st["momentum_buffer"]) for i, st in enumerate(opt.state.values())]
    for b in opt.blocks.values():
        for s in b.stats.values():
            out += [
                (f"{b.name}.{s.name}.{k}", t)
                for k, t in (("value", s.value), ("inverse", s.inverse), ("local_sum", s.local_sum))
                if t is not None
            ]
    out += [("bn snapshot", t) for t in opt.capture._bn_saved]
    return out


@pytest.mark.parametrize("extra", [{}, {"clip_norm": 0.5, "weight_rescale": True, "weight_decay": 1e-4}])
def test_state_on_the_parameters_device_and_no_exchange(extra: dict[str, Any]) -> None:
    model = _convbn()
    opt = spngd_ds.SPNGD(model, lr=0.05, damping=1e-2, communicator=_NoExchange(), **extra)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(5)]
    for step, (x, y) in enumerate(batches):
        if step >= 2:
            force(opt, due=step % 2 == 0)
        torch.set_default_device("meta")
        try:
            F.cross_entropy(model(x), y).backward()
            opt.step()
        finally:
            torch.set_default_device(None)
        opt.zero_grad()
    assert all(b.ready() for b in opt.blocks.values() if b.stats)
    assert opt.stats_log.skipped_steps == 0
    tensors = _state_tensors(opt)
    assert len(tensors) > 20
    wrong = [name for name, t in tensors if t.device != torch.device("cpu")]
    assert not wrong, wrong
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_default_communicator_lives_on_the_parameters_device() -> None:
    model = _convbn().to(torch.float64)
    assert spngd_ds.SPNGD(model).comm.device == next(model.parameters()).device
    meta = _convbn().to("meta")
    assert spngd_ds.SPNGD(meta).comm.device == torch.device("meta")


def test_capture_hooks_do_not_synchronise() -> None:
    model = _convbn()
    opt = spngd_ds.SPNGD(model, lr=0.05, damping=1e-2)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 5, (4,), generator=g)
        force(opt, due=True)
        with count_dispatch() as counts:
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step:  # the first capture builds its cached index tensors
            assert counts.syncs == 0, counts.sync_names


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet18", "resnet50"])
def test_syncs_and_ops_do_not_grow_with_the_model(kind: str) -> None:
    counts = spngd_counts(kind)
    quiet, refresh = counts["refresh_none"], counts["refresh_all"]
    assert refresh["refreshed"] == 1.0 and quiet["refreshed"] == 0.0
    assert quiet["step_syncs"] <= QUIET_SYNCS, quiet["step_sync_names"]
    assert refresh["step_syncs"] <= REFRESH_SYNCS, refresh["step_sync_names"]
    assert refresh["forward_backward_syncs"] == 0, refresh["forward_backward_sync_names"]
    assert quiet["step_ops"] <= sgd_counts(kind, foreach=False)["step_ops"]


@pytest.mark.slow
def test_syncs_with_clipping_and_rescaling() -> None:
    counts = spngd_counts("resnet18", clip_norm=1.0, weight_rescale=True, weight_decay=5e-5)
    assert counts["refresh_none"]["step_syncs"] <= QUIET_SYNCS, counts["refresh_none"]["step_sync_names"]
    assert counts["refresh_all"]["step_syncs"] <= REFRESH_SYNCS, counts["refresh_all"]["step_sync_names"]


VOCAB, WIDTH = 40, 16


class _TokenStack(nn.Module):
    """Embedding, then ``depth`` x (LayerNorm, Linear, RMSNorm), then a head whose G is kept diagonal."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.RMSNorm(WIDTH))
            for _ in range(depth)
        )
        self.head = nn.Linear(WIDTH, VOCAB)  # G is VOCAB x VOCAB: above max_factor_dim

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def _token_step_syncs(depth: int) -> tuple[dict[str, int], dict[str, Any]]:
    model = _TokenStack(depth)
    opt = spngd_ds.SPNGD(model, lr=0.05, damping=1e-2, max_factor_dim=VOCAB - 1)
    g = torch.Generator().manual_seed(0)

    def loss() -> torch.Tensor:
        idx = torch.randint(0, VOCAB, (4, 6), generator=g)
        return F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())

    for _ in range(2):  # the first refresh, momentum buffers
        loss().backward()
        opt.step()
        opt.zero_grad()
    syncs: dict[str, int] = {}
    names: dict[str, Any] = {}
    for label, due in (("refresh_all", True), ("refresh_none", False)):
        force(opt, due)
        loss().backward()
        with count_dispatch() as counts:
            opt.step()
        opt.zero_grad()
        syncs[label], names[label] = counts.syncs, dict(counts.sync_names)
    kinds = {b.kind for b in opt.blocks.values()}
    assert {"embedding", "norm", "kron", "kron_diag"} <= kinds, kinds
    assert all(b.ready() for b in opt.blocks.values() if b.stats)
    assert opt.stats_log.skipped_steps == 0
    return syncs, names


def test_transformer_block_kinds_synchronise_as_often_at_any_depth() -> None:
    one, one_names = _token_step_syncs(1)
    three, three_names = _token_step_syncs(3)
    assert three == one, (one_names, three_names)
    assert one["refresh_none"] <= QUIET_SYNCS, one_names
    assert one["refresh_all"] <= REFRESH_SYNCS, one_names


@pytest.mark.parametrize("solve", [False, True])
def test_batched_inversion_matches_dense_inverses_and_flags_failures(
    monkeypatch: pytest.MonkeyPatch, solve: bool
) -> None:
    """Both inversion branches against float64 dense inverses, with failures flagged.

    CPU: cholesky_inverse; accelerators: cholesky_solve against I. Failures (indefinite, NaN) are
    flagged and not fatal.
    """
    import spngd_ds.blocks.base as base

    monkeypatch.setattr(base, "CPU_CHOLESKY_INVERSE", not solve)
    g = torch.Generator().manual_seed(3)
    spd = []
    for d in (3, 5, 3, 5, 7):
        x = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
        spd.append(x @ x.t() / d + 0.1 * torch.eye(d, dtype=torch.float64))
    bad = [-torch.eye(5, dtype=torch.float64), torch.full((3, 3), float("nan"), dtype=torch.float64)]
    matrices = [spd[0], bad[0], spd[1], spd[2], bad[1], spd[3], spd[4]]
    inverses, ok, order = base.invert_spd_many(matrices)
    flags = [False] * len(matrices)
    for j, i in enumerate(order):
        flags[i] = bool(ok[j])
    assert sorted(order) == list(range(len(matrices)))
    assert flags == [True, False, True, True, False, True, True]
    for m, inv, f in zip(matrices, inverses, flags, strict=True):
        if f:
            torch.testing.assert_close(inv, torch.linalg.inv(m), rtol=1e-10, atol=1e-12)
    reports = base.run_inversions(
        [
            base.InversionJob([("X", m)], [], lambda got, _s, m=m: got)  # type: ignore[misc]
            for m in matrices
        ]
    )
    assert [r["X"] is not None for r in reports] == flags  # type: ignore[index]
