"""Numerical faults injected for exactly one step, single process, float64 ("Numerical faults").

The run goes on, parameters stay finite, the bad statistic never enters the factors, the fallback is
counted in ``metrics()`` and logged, and training afterwards is bit-identical to a twin run in which
that step (or that statistic's refresh) was skipped.

Faults are injected by hooks the test registers for one step:
- a forward hook that writes NaN/Inf into a layer's activations (gradients become non-finite);
- a wrapper around a block's capture, so that NaN/Inf reach only the statistics (the output
  gradient that G sees, the input that A sees, F's captured sum) and not the gradients;
- a wrapper on one statistic's accumulation that multiplies it by 1e30 (an explosion that stays
  finite) or negates it (an indefinite factor).

Single-process faults already covered in tests/optimizer/test_faults.py (robust_inverse alone, an
indefinite Linear factor through ``normalise``, NaN in the captured local sum, NaN/Inf input
pixels, a BatchNorm channel) are not repeated; these tests add the twin-run equivalence, the outlier
rejection (``EXPLOSION_RATIO``/``MAX_REJECTIONS``), and the capture path of every statistic kind.

Would they fail without the protection? Without the non-finite-gradient skip the NaN step would
write NaN into every parameter (the finiteness check after each step fails); without the
non-finite-statistic check the NaN value would be stored and inverted (value/inverse equality and
the twin comparison fail); without the outlier rejection the 1e30 value would be accepted (the
``rejected_stats`` count and the kept-value assertions fail); without the identity fallback the
``inversion_failures`` count and the plain-gradient assertion fail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds
from spngd_ds.optimizer import EXPLOSION_RATIO, MAX_REJECTIONS

DT = torch.float64
KW: dict[str, Any] = dict(
    lr=0.05,
    momentum=0.9,
    damping=1e-2,
    weight_decay=1e-4,
    staleness={"threshold": 0.5, "max_interval": 3},
    step_bound=None,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),  # "0": Kronecker (conv), A and G
        nn.BatchNorm2d(3),  # "1": unit-wise, F
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 10),  # "4": Kronecker, A and G
        nn.Tanh(),  # "5": the activations fed to the head
        nn.Linear(10, 5),  # "6": Kronecker, A and G
    ).to(DT)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(700 + step)
    return torch.randn(16, 1, 4, 4, generator=g, dtype=DT), torch.randint(0, 5, (16,), generator=g)


class Run:
    """One model and its optimizer, stepped batch by batch; parameters checked after every step."""

    def __init__(self, **kw: Any) -> None:
        self.model = _model()
        self.opt = spngd_ds.SPNGD(self.model, **{**KW, **kw})

    def step(
        self, batch: int, inject: Callable[[], Any] | None = None, after_backward: Callable[[], None] | None = None
    ) -> None:
        x, y = _batch(batch)
        self.opt.zero_grad()
        with inject() if inject is not None else _nothing():
            F.cross_entropy(self.model(x), y).backward()
        if after_backward is not None:
            after_backward()
        self.opt.step()
        assert all(bool(torch.isfinite(p).all()) for p in self.model.parameters()), f"non-finite after batch {batch}"

    def stat(self, block: str, name: str) -> Any:
        return self.opt.blocks[block].stats[name]

    def due(self, block: str, name: str) -> bool:
        return self.stat(block, name).schedule.is_due(self.opt.step_count)

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def metric(self, key: str) -> float:
        return self.opt.metrics()[f"spngd/{key}"]


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def assert_same_state(a: Run, b: Run) -> None:
    """Bit-identical parameters, momentum, statistics, inverses and refresh schedules."""
    assert a.opt.step_count == b.opt.step_count
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), n
        assert torch.equal(a.opt.state[p]["momentum_buffer"], b.opt.state[q]["momentum_buffer"]), n
    for name, block in a.opt.blocks.items():
        for s, t in zip(block.stats.values(), b.opt.blocks[name].stats.values(), strict=True):
            assert torch.equal(s.value, t.value) and torch.equal(s.inverse, t.inverse), (name, s.name)
            assert s.schedule.state() == t.schedule.state(), (name, s.name)


# -- injectors ------------------------------------------------------------------------------------


def poison_activation(run: Run, module: str, value: float) -> Callable[[], Any]:
    """A forward hook writing ``value`` into one entry of ``module``'s output (the real forward)."""

    @contextmanager
    def ctx() -> Iterator[None]:
        def hook(mod: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            out = output.clone()
            out.view(-1)[3] = value
            return out

        handle = dict(run.model.named_modules())[module].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    return ctx


def poison_capture(run: Run, block: str, stat: str, value: float) -> Callable[[], Any]:
    """NaN/Inf seen by one statistic only.

    The output gradient handed to G's capture, the input handed to A's capture, or F's captured sum.
    The real forward and backward are untouched.
    """

    @contextmanager
    def ctx() -> Iterator[None]:
        b = run.opt.blocks[block]
        real_capture = b.capture_forward
        real_add = b.stats[stat].add

        def capture_forward(inputs: torch.Tensor, due: set[str]) -> Any:
            if stat == "A":
                inputs = inputs.clone()
                inputs.view(-1)[5] = value
            backward = real_capture(inputs, due)
            if stat != "G" or backward is None:
                return backward

            def poisoned_backward(grad: torch.Tensor, scale: float) -> None:
                grad = grad.clone()
                grad.view(-1)[2] = value
                backward(grad, scale)

            return poisoned_backward

        def add(total: torch.Tensor, count: int, fresh: bool = False) -> None:
            real_add(total * value, count, fresh=True)  # the product is a new tensor

        if stat == "F":
            b.stats[stat].add = add
        else:
            b.capture_forward = capture_forward
        try:
            yield
        finally:
            b.__dict__.pop("capture_forward", None)
            b.stats[stat].__dict__.pop("add", None)

    return ctx


def transform_stat(run: Run, block: str, stat: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], Any]:
    """Every micro-batch sum of one statistic goes through ``fn`` (x 1e30, negation, ...)."""

    @contextmanager
    def ctx() -> Iterator[None]:
        s = run.opt.blocks[block].stats[stat]
        real_add = s.add
        s.add = lambda total, count, fresh=False: real_add(fn(total), count)
        try:
            yield
        finally:
            s.__dict__.pop("add", None)

    return ctx


def _to_due_step(runs: list[Run], block: str, stat: str, batch: int) -> int:
    """Step every run with clean batches until ``stat`` is due (identical runs stay identical)."""
    while not runs[0].due(block, stat):
        for r in runs:
            r.step(batch)
        batch += 1
    assert all(r.due(block, stat) for r in runs)
    return batch


# -- (1) NaN / Inf in a layer's activations: the step is skipped ------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_activation_skips_the_step_like_a_skipped_batch(value: float, caplog: Any) -> None:
    faulty, twin = Run(), Run()
    for batch in range(3):
        faulty.step(batch)
        twin.step(batch)
    before = faulty.params()
    with caplog.at_level(logging.WARNING, logger="spngd_ds"):
        faulty.step(3, inject=poison_activation(faulty, "5", value))  # twin never sees batch 3
    assert any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in faulty.model.parameters())
    assert faulty.metric("skipped_steps") == 1.0 and faulty.opt.step_count == 3
    assert "step 3 skipped (non-finite gradient)" in caplog.text
    for n, p in faulty.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    for batch in range(4, 10):
        faulty.step(batch)
        twin.step(batch)
    assert_same_state(faulty, twin)
    assert faulty.metric("skipped_steps") == 1.0 and twin.metric("skipped_steps") == 0.0
    for key in ("nonfinite_stats", "rejected_stats", "inversion_failures"):
        assert faulty.metric(key) == 0.0, key


def test_skipped_step_leaves_batchnorm_running_statistics_as_if_skipped() -> None:
    faulty, twin = Run(), Run()
    for batch in range(3):
        faulty.step(batch)
        twin.step(batch)
    faulty.step(3, inject=poison_activation(faulty, "0", float("nan")))  # NaN before the BatchNorm
    assert faulty.metric("skipped_steps") == 1.0
    for batch in range(4, 6):
        faulty.step(batch)
        twin.step(batch)
    bn, bn_twin = dict(faulty.model.named_modules())["1"], dict(twin.model.named_modules())["1"]
    assert bool(torch.isfinite(bn.running_mean).all()) and bool(torch.isfinite(bn.running_var).all())
    assert torch.equal(bn.running_mean, bn_twin.running_mean) and torch.equal(bn.running_var, bn_twin.running_var)
    assert int(bn.num_batches_tracked) == int(bn_twin.num_batches_tracked)


# -- (2) NaN / Inf that reaches only a statistic: the update goes on with the old inverse ----------


@pytest.mark.parametrize(
    ("block", "stat", "value"),
    [
        ("6", "G", float("nan")),
        ("0", "G", float("inf")),
        ("4", "A", float("inf")),
        ("0", "A", float("nan")),
        ("1", "F", float("nan")),
    ],
    ids=["head-G-nan", "conv-G-inf", "linear-A-inf", "conv-A-nan", "bn-F-nan"],
)
def test_nonfinite_statistic_is_ignored_like_a_skipped_refresh(
    block: str, stat: str, value: float, caplog: Any
) -> None:
    faulty, twin = Run(), Run()
    for batch in range(2):
        faulty.step(batch)
        twin.step(batch)
    batch = _to_due_step([faulty, twin], block, stat, 2)
    s = faulty.stat(block, stat)
    old_value, old_inverse, step = s.value.clone(), s.inverse.clone(), faulty.opt.step_count
    before = faulty.params()
    with caplog.at_level(logging.WARNING, logger="spngd_ds"):
        faulty.step(batch, inject=poison_capture(faulty, block, stat, value))
    # twin: the same batch, that statistic's refresh skipped (nothing captured for it this step)
    twin.step(batch, after_backward=lambda: twin.stat(block, stat).take_local())
    assert faulty.metric("nonfinite_stats") == 1.0 and twin.metric("nonfinite_stats") == 0.0
    assert faulty.metric("skipped_steps") == 0.0 and faulty.opt.step_count == step + 1  # the step happened
    assert any(not torch.equal(p.detach(), before[n]) for n, p in faulty.model.named_parameters())
    assert f"non-finite {stat} of {block} at step {step} ignored" in caplog.text
    assert torch.equal(s.value, old_value) and torch.equal(s.inverse, old_inverse)  # old value and inverse kept
    assert s.schedule.is_due(step + 1)  # retried at the next step
    assert_same_state(faulty, twin)
    for b in range(batch + 1, batch + 6):
        faulty.step(b)
        twin.step(b)
    assert_same_state(faulty, twin)
    assert faulty.metric("nonfinite_stats") == 1.0


# -- (3) a statistic that explodes by 1e30: rejected as an outlier, old value kept -----------------


@pytest.mark.parametrize(("block", "stat"), [("4", "G"), ("0", "A"), ("1", "F")])
def test_exploding_statistic_is_rejected_like_a_skipped_refresh(block: str, stat: str, caplog: Any) -> None:
    faulty, twin = Run(), Run()
    for batch in range(2):
        faulty.step(batch)
        twin.step(batch)
    batch = _to_due_step([faulty, twin], block, stat, 2)
    s = faulty.stat(block, stat)
    old_value, old_inverse, step = s.value.clone(), s.inverse.clone(), faulty.opt.step_count
    with caplog.at_level(logging.WARNING, logger="spngd_ds"):
        faulty.step(batch, inject=transform_stat(faulty, block, stat, lambda t: t * 1e30))
    twin.step(batch, after_backward=lambda: twin.stat(block, stat).take_local())
    assert faulty.metric("rejected_stats") == 1.0 and faulty.metric("nonfinite_stats") == 0.0
    assert f"{stat} of {block} changed by a factor" in caplog.text and "rejected as an outlier" in caplog.text
    assert torch.equal(s.value, old_value) and torch.equal(s.inverse, old_inverse)
    assert s.rejections == 1 and s.schedule.is_due(step + 1)
    for b in range(batch + 1, batch + 6):
        faulty.step(b)
        twin.step(b)
    assert_same_state(faulty, twin)
    assert s.rejections == 0 and faulty.metric("rejected_stats") == 1.0


def test_an_outlier_that_persists_is_accepted_after_max_rejections(caplog: Any) -> None:
    """A real change of scale is not rejected forever.

    MAX_REJECTIONS refreshes in a row are rejected, the next one is accepted, and the statistic
    follows the data again afterwards.
    """
    assert MAX_REJECTIONS == 3
    run = Run()
    for batch in range(2):
        run.step(batch)
    batch = _to_due_step([run], "6", "A", 2)
    s = run.stat("6", "A")
    old = s.value.clone()
    explode = transform_stat(run, "6", "A", lambda t: t * 1e30)
    with caplog.at_level(logging.WARNING, logger="spngd_ds"):
        for k in range(MAX_REJECTIONS):
            assert run.due("6", "A")  # a rejected refresh is retried at the very next step
            run.step(batch + k, inject=explode)
            assert run.metric("rejected_stats") == k + 1 and s.rejections == k + 1
            assert torch.equal(s.value, old)
        run.step(batch + MAX_REJECTIONS, inject=explode)  # the 4th outlier in a row: accepted
    assert run.metric("rejected_stats") == MAX_REJECTIONS and s.rejections == 0
    assert float(s.value.norm() / old.norm()) > EXPLOSION_RATIO
    assert s.inverse is not None and bool(torch.isfinite(s.inverse).all())
    assert caplog.text.count("rejected as an outlier") == MAX_REJECTIONS
    # back to normal data: a relative change of ~1 against the huge value, accepted at once
    for b in range(batch + MAX_REJECTIONS + 1, batch + MAX_REJECTIONS + 8):
        run.step(b)
    assert run.metric("rejected_stats") == MAX_REJECTIONS
    assert float(s.value.norm() / old.norm()) < 10.0


# -- (4) an indefinite factor: identity fallback for that layer, counted, retried ------------------


def test_indefinite_conv_factor_falls_back_to_the_plain_gradient(caplog: Any) -> None:
    run = Run(momentum=0.0, weight_decay=0.0)
    for batch in range(2):
        run.step(batch)
    batch = _to_due_step([run], "0", "A", 2)
    step = run.opt.step_count
    before = run.params()
    grads: dict[str, torch.Tensor] = {}

    def keep_grads() -> None:
        grads.update({n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})

    with caplog.at_level(logging.WARNING, logger="spngd_ds"):
        # -A: the relative change is 2 (no outlier), A + pi sqrt(lambda) I is negative definite
        run.step(batch, inject=transform_stat(run, "0", "A", lambda t: -t), after_backward=keep_grads)
    conv = run.opt.blocks["0"]
    assert run.metric("inversion_failures") == 1.0 and run.metric("nonfinite_stats") == 0.0
    assert "inversion of 0.A failed; plain gradient this step" in caplog.text
    assert conv.stats["A"].inverse is None and not conv.ready()
    after = run.params()
    for name in ("0.weight", "0.bias"):  # the failing layer took the plain gradient (momentum 0)
        torch.testing.assert_close(after[name] - before[name], -0.05 * grads[name], rtol=1e-12, atol=1e-15)
    head = after["6.weight"] - before["6.weight"]  # other layers stayed preconditioned
    assert not torch.allclose(head, -0.05 * grads["6.weight"])
    assert conv.stats["A"].schedule.is_due(step + 1)
    for b in range(batch + 1, batch + 4):
        run.step(b)
    assert conv.ready() and run.metric("inversion_failures") == 1.0
