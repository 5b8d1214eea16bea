"""Step semantics on one process.

Parameters without gradient, frozen layers, tied weights, the first-order fallback said out loud, a
module called twice in one forward (rule 3), clip_norm, and device discipline of every collective
helper.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds
from spngd_ds.comm import Communicator
from spngd_ds.reductions import all_reduce_sum, any_rank_each, any_rank_each_and_sum

ROOT = Path(__file__).resolve().parents[2]


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 3)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.body(x))))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        x = x.to(next(model.parameters()).dtype)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_a_parameter_without_gradient_is_left_alone() -> None:
    """As torch's optimizers do: no weight decay, no momentum for a parameter that got no gradient."""
    model = Branchy()
    before = {n: p.detach().clone() for n, p in model.unused.named_parameters()}
    opt = spngd_ds.SPNGD(model, lr=0.1, weight_decay=0.1, staleness=None)
    _train(model, opt, 4)
    for n, p in model.unused.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not any(opt.state.get(p) for p in model.unused.parameters())
    assert not torch.equal(model.head.weight, Branchy().head.weight)  # the rest trained


def test_freezing_a_layer_during_training() -> None:
    """requires_grad_(False) after 2 steps (progressive fine-tuning).

    The next steps run, the layer is no longer captured and no longer moves.
    """
    model = Branchy()
    opt = spngd_ds.SPNGD(model, lr=0.1, staleness=None)
    _train(model, opt, 2)
    model.body.requires_grad_(False)
    frozen = model.body.weight.detach().clone()
    captures = opt.blocks["body"].stats["A"].captures
    _train(model, opt, 3, seed=1)
    assert torch.equal(model.body.weight, frozen)
    assert opt.blocks["body"].stats["A"].captures == captures
    assert opt.step_count == 5


def test_tied_weights_are_one_parameter_updated_once() -> None:
    """Two Linear layers sharing a weight.

    The weight is in exactly one (first-order) block, and one step moves it by exactly -lr times its
    (summed) gradient.
    """
    from tests.support.cells import Tied

    model = Tied()
    opt = spngd_ds.SPNGD(model, lr=0.1, momentum=0.0, staleness=None, step_bound=None)
    owners = [b.name for b in opt.blocks.values() if any(p is model.a.weight for p in b.params)]
    assert owners == ["a.weight"]
    assert "a" not in opt.blocks and "b" not in opt.blocks and "head" in opt.blocks
    w0 = model.a.weight.detach().clone()
    x, y = torch.randn(8, 16), torch.randint(0, 5, (8,))
    F.cross_entropy(model(x), y).backward()
    grad = model.a.weight.grad.detach().clone()  # type: ignore[union-attr]
    opt.step()
    torch.testing.assert_close(model.a.weight.detach(), w0 - 0.1 * grad, rtol=0, atol=1e-7)


def test_first_order_layers_are_named_at_warning_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.grouped = nn.Conv2d(4, 4, 3, groups=2, padding=1)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)  # out_proj's forward never runs
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.grouped(x).flatten(2).transpose(1, 2)  # (N, HW, 4)
            h, _ = self.attn(h, h, h)
            return self.head(h.mean(1))

    model = Mixed()
    with caplog.at_level(logging.WARNING, logger="spngd_ds"):
        opt = spngd_ds.SPNGD(model, staleness=None)
        text = caplog.text
        assert "first-order update (no curvature)" in text and "grouped (Conv2d)" in text
        F.cross_entropy(model(torch.randn(2, 4, 3, 3)), torch.tensor([0, 1])).backward()
        opt.step()
    assert "no statistics of attn.out_proj were captured" in caplog.text
    assert opt.metrics()["spngd/first_order_layers"] >= 3  # grouped conv, attention's packed proj, out_proj


def test_a_module_called_twice_adds_locations_not_samples() -> None:
    """Rule 3: a Linear applied at two places of one forward gets the statistics of one call.

    Both places are stacked as locations (A sums over locations per sample, G averages over them),
    the sequence being the sample (``positions_as_samples=False``; rule 10).
    """
    torch.manual_seed(0)
    lin_a, head_a = nn.Linear(5, 4), nn.Linear(4, 3)
    lin_b, head_b = nn.Linear(5, 4), nn.Linear(4, 3)
    lin_b.load_state_dict(lin_a.state_dict())
    head_b.load_state_dict(head_a.state_dict())

    class Twice(nn.Module):
        def __init__(self, lin: nn.Linear, head: nn.Linear) -> None:
            super().__init__()
            self.lin, self.head = lin, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.lin(x[:, 0])) + torch.tanh(self.lin(x[:, 1])))

    class Stacked(Twice):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.lin(x)).sum(1))

    x, y = torch.randn(8, 2, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    stats = []
    for model in (Twice(lin_a, head_a).double(), Stacked(lin_b, head_b).double()):
        opt = spngd_ds.SPNGD(model, staleness=None, positions_as_samples=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        stats.append((opt.blocks["lin"].A, opt.blocks["lin"].G))
    torch.testing.assert_close(stats[0][0], stats[1][0])
    torch.testing.assert_close(stats[0][1], stats[1][1])


def test_clip_norm_scales_the_preconditioned_update() -> None:
    """With momentum 0 the first update is -lr * min(1, c/||P||) * P, P the unclipped direction."""
    moves = []
    for clip in (None, 1e-3):
        model = Branchy().double()  # float64: the clipped move is 1e-5 of the weights
        opt = spngd_ds.SPNGD(model, lr=0.1, momentum=0.0, staleness=None, clip_norm=clip)
        w0 = [p.detach().clone() for p in model.parameters()]
        _train(model, opt, 1)
        moves.append(torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), w0, strict=True)]))
    unclipped, clipped = moves
    torch.testing.assert_close(clipped.norm(), torch.tensor(0.1 * 1e-3, dtype=torch.float64), rtol=1e-8, atol=0)
    torch.testing.assert_close(clipped / clipped.norm(), unclipped / unclipped.norm(), rtol=1e-6, atol=1e-9)


# -- device discipline ------------------------------------------------------------------------------------------
class MetaComm(Communicator):
    """A 2-rank communicator whose device is 'meta'.

    Any CPU tensor handed to a collective is a violation that NCCL would also refuse.
    """

    world_size = 2

    def __init__(self) -> None:
        super().__init__(device="meta")


def test_collective_helpers_refuse_a_tensor_on_another_device() -> None:
    comm = MetaComm()
    with pytest.raises(RuntimeError, match="all_reduce_sum: tensor on cpu, but the communicator's device is meta"):
        all_reduce_sum(comm, torch.zeros(3))


def test_helpers_build_their_buffers_on_the_communicator_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """gather_full and the flag reduction hand the collective a tensor on the comm's device.

    gather_full (checkpoints; fragments may sit on the CPU under offload) and the flag reduction
    hand the collective a tensor on the communicator's device.
    """
    import torch.distributed as dist

    from spngd_ds.deepspeed.partitions import Fragment, gather_full

    seen: list[torch.device] = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: seen.append(t.device))
    comm = MetaComm()
    flat = torch.arange(10.0)  # an offloaded partition, on the CPU
    gather_full(comm, Fragment(flat, 2, 0, 4), flat, torch.Size([2, 3]))
    gather_full(comm, None, None, torch.Size([2, 3]))  # a rank that holds no fragment
    with pytest.raises(NotImplementedError, match="meta"):  # the flags reached the collective on 'meta'
        any_rank_each(comm, [True, False])
    with pytest.raises(NotImplementedError, match="meta"):  # flags and sample counts in one buffer, on 'meta'
        any_rank_each_and_sum(comm, [True, False], torch.zeros(2, dtype=torch.float64, device="meta"))
    assert len(seen) == 4 and all(d.type == "meta" for d in seen), seen


def test_library_creates_no_tensor_on_a_hard_coded_cpu_device() -> None:
    """Collectives take tensors on ``comm.device``.

    A literal "cpu" device in the library is allowed only where a tensor is saved to or loaded from
    disk.
    """
    allowed = {("checkpoint.py", "map_location")}
    bad = []
    for path in (ROOT / "spngd_ds").rglob("*.py"):
        if "recipes" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and isinstance(node.value, ast.Constant) and node.value.value == "cpu":
                if (path.name, node.arg) not in allowed and node.arg == "device":
                    bad.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
    assert not bad, bad


def test_decisions_travel_with_values_only_where_their_dtype_holds_the_step_numbers() -> None:
    """The fast path sends the refresh decisions only in a dtype that holds them exactly.

    The decisions (interval, next step) travel with the gathered parameters: float32 below 2**24
    steps, float64, never bf16/fp16.
    """
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = spngd_ds.SPNGD(model, staleness={"threshold": 0.1, "max_interval": 20})
    assert opt.decisions_exact_in(torch.float32) and opt.decisions_exact_in(torch.float64)
    assert not opt.decisions_exact_in(torch.bfloat16) and not opt.decisions_exact_in(torch.float16)
    opt.step_count = 2**24 - 20  # the next step may be step + 20 = 2**24: still exact, 2**24 + 1 is not
    assert opt.decisions_exact_in(torch.float32)
    opt.step_count += 1
    assert not opt.decisions_exact_in(torch.float32) and opt.decisions_exact_in(torch.float64)
