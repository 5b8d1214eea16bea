"""Rule 6 (stale statistics): the refresh-interval state machine alone, then through the optimizer.

Through the optimizer, ``threshold=1e9`` makes every finite relative change "small", so each
statistic's interval follows 1, 2, 3, 3, ... (``max_interval=3``) and it is refreshed at steps
0, 1, 3, 6, 9, ... (step 0's change is ``inf``: no old value, so its interval stays 1). Between
refreshes a statistic must be neither captured (the hooks do no work) nor re-inverted (the old
inverse is reused for preconditioning).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds
import spngd_ds.blocks.base as base_mod
import spngd_ds.blocks.unitwise as unitwise_mod
from spngd_ds.staleness import RefreshSchedule, relative_change

# --------------------------------------------------------------------------------------------------
# RefreshSchedule alone
# --------------------------------------------------------------------------------------------------


def test_schedule_starts_due_with_interval_one() -> None:
    s = RefreshSchedule(threshold=0.1, max_interval=5)
    assert s.state() == (1, 0)
    assert s.is_due(0)


def test_schedule_scripted_sequence() -> None:
    """Grow by one below the threshold up to max_interval, reset to 1 at or above it."""
    s = RefreshSchedule(threshold=0.1, max_interval=3)
    # (step of the refresh, relative change, expected interval after it)
    script = [
        (0, math.inf, 1),  # first refresh: no old value
        (1, 0.05, 2),
        (3, 0.01, 3),
        (6, 0.0, 3),  # capped at max_interval
        (9, 0.1, 1),  # exactly at the threshold: reset
        (10, 0.5, 1),  # above: stays 1
        (11, 0.0999, 2),
        (13, 0.02, 3),
        (16, 7.0, 1),  # a big change after the cap resets straight to 1
    ]
    for step, ratio, interval in script:
        assert s.is_due(step), f"step {step} should be due, state {s.state()}"
        s.observe(step, ratio)
        assert s.state() == (interval, step + interval), (step, ratio)
        # not due strictly between this refresh and the next one
        for k in range(step + 1, step + interval):
            assert not s.is_due(k), (k, s.state())
        assert s.is_due(step + interval)


def test_schedule_max_interval_one_never_grows() -> None:
    s = RefreshSchedule(threshold=1e9, max_interval=1)
    for step in range(5):
        assert s.is_due(step)
        s.observe(step, 0.0)
        assert s.state() == (1, step + 1)


def test_schedule_threshold_none_is_due_every_step() -> None:
    s = RefreshSchedule(threshold=None, max_interval=20)
    for step, ratio in enumerate([math.inf, 0.0, 1e-9, 0.0, 0.5, 0.0]):
        assert s.is_due(step)
        s.observe(step, ratio)
        assert s.state() == (1, step + 1)


def test_schedule_postpone_and_state_roundtrip() -> None:
    s = RefreshSchedule(threshold=0.1, max_interval=10)
    s.observe(0, 0.0)
    s.observe(2, 0.0)
    assert s.state() == (3, 5)
    s.postpone(5)  # a refresh at step 5 was lost: due again at 6, interval kept
    assert s.state() == (3, 6)
    assert not s.is_due(5) and s.is_due(6)
    t = RefreshSchedule(threshold=0.1, max_interval=10)
    t.load(s.state())
    assert t.state() == (3, 6) and t == s


def test_relative_change_values() -> None:
    eye = torch.eye(3)
    assert relative_change(None, eye) == math.inf
    assert relative_change(torch.zeros(3, 3), eye) == math.inf
    assert relative_change(torch.full((2, 2), float("nan")), eye[:2, :2]) == math.inf
    assert relative_change(eye, eye.clone()) == 0.0
    assert relative_change(eye, 2 * eye) == pytest.approx(1.0, rel=1e-12)
    old = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    new = torch.tensor([[3.0, 1.0], [1.0, 4.0]])
    # ||new-old||_F = sqrt(2), ||old||_F = 5; norms in the inputs' dtype (float32: rounding 6e-8)
    assert relative_change(old, new) == pytest.approx(math.sqrt(2) / 5, rel=1e-7)
    assert relative_change(old.double(), new.double()) == pytest.approx(math.sqrt(2) / 5, rel=1e-15)
    # not symmetric in its arguments: normalised by the *old* value
    assert relative_change(new, old) == pytest.approx(math.sqrt(2) / math.sqrt(27), rel=1e-7)
    # a small change of float32 inputs is measured to float32's relative precision, not lost
    a = torch.tensor([[1.0]], dtype=torch.float32)
    b = torch.tensor([[1.0 + 2**-20]], dtype=torch.float32)
    assert relative_change(a, b) == pytest.approx(2**-20, rel=1e-6)
    # entries whose squares overflow float32: the norms are redone in float64, not taken as infinite
    big = torch.full((2, 2), 1e30)
    assert relative_change(big, 2 * big) == pytest.approx(1.0, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Through the optimizer
# --------------------------------------------------------------------------------------------------

REFRESH_STEPS = [0, 1, 3, 6, 9]  # threshold 1e9, max_interval 3
N_STEPS = 11


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 4))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(24, 6, generator=g), torch.randint(0, 4, (24,), generator=g)


def _counting(obj: object, attr: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace ``obj.attr`` by a wrapper that counts its calls; returns the one-element counter."""
    original = getattr(obj, attr)
    calls = [0]

    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, attr, wrapper)
    return calls


def _counting_inversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the matrices the step's batched inversion factors.

    Kronecker factors only: BatchNorm's 2x2 blocks are inverted in closed form. Returns the
    one-element counter.
    """
    original = base_mod.invert_spd_many
    calls = [0]

    def wrapper(matrices):  # type: ignore[no-untyped-def]
        calls[0] += len(matrices)
        return original(matrices)

    monkeypatch.setattr(base_mod, "invert_spd_many", wrapper)
    return calls


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = _batch(step)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def test_optimizer_refreshes_only_when_due(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    opt = spngd_ds.SPNGD(model, lr=0.05, momentum=0.0, damping=1e-2, staleness={"threshold": 1e9, "max_interval": 3})
    assert set(opt.blocks) == {"0", "1", "3"}
    kron = [opt.blocks["0"], opt.blocks["3"]]
    bn = opt.blocks["1"]
    assert [b.kind for b in kron] == ["kron", "kron"] and bn.kind == "unitwise"

    act_calls = {b.name: _counting(b, "activation_gram", monkeypatch) for b in kron}
    out_calls = {b.name: _counting(b, "output_gram", monkeypatch) for b in kron}
    xhat_calls = _counting(unitwise_mod, "channel_moments", monkeypatch)
    inv_calls = _counting_inversions(monkeypatch)

    expected_interval = {0: 1, 1: 2, 3: 3, 6: 3, 9: 3}
    n_refreshed = 0
    for step in range(N_STEPS):
        due = step in REFRESH_STEPS
        before = {
            (b.name, k): (s.captures, s.refreshes, s.inversions, s.value, s.inverse)
            for b in opt.blocks.values()
            for k, s in b.stats.items()
        }
        inv_before = inv_calls[0]
        x, y = _batch(step)
        loss = F.cross_entropy(model(x), y)
        # the forward hook ran (or not) already: A and BN's x-hat are captured in the forward
        assert act_calls["0"][0] == n_refreshed + int(due)
        assert xhat_calls[0] == n_refreshed + int(due)
        loss.backward()
        assert out_calls["3"][0] == n_refreshed + int(due)
        opt.step()
        opt.zero_grad()
        n_refreshed += int(due)
        assert inv_calls[0] - inv_before == (4 if due else 0), step  # A and G of two Kron blocks
        for b in opt.blocks.values():
            for k, s in b.stats.items():
                c0, r0, i0, v0, inv0 = before[(b.name, k)]
                assert s.captures == c0 + int(due), (step, b.name, k)
                assert s.refreshes == r0 + int(due), (step, b.name, k)
                assert s.inversions == i0 + int(due), (step, b.name, k)
                assert s.local_sum is None and s.local_count == 0.0
                if due:
                    interval = expected_interval[step]
                    assert s.schedule.state() == (interval, step + interval), (step, b.name, k)
                    assert s.value is not v0
                else:
                    # neither refreshed nor re-inverted: the very same tensors
                    assert s.value is v0 and s.inverse is inv0, (step, b.name, k)
        for name in act_calls:
            assert act_calls[name][0] == n_refreshed and out_calls[name][0] == n_refreshed
    assert n_refreshed == len(REFRESH_STEPS)
    assert opt.metrics()["spngd/mean_interval"] == 3.0


def test_stale_step_preconditions_with_the_old_inverses() -> None:
    """At a step where nothing is due the update uses the inverses of the last refresh.

    The update is -lr Ĝ⁻¹ M Â⁻¹ (momentum 0), i.e. stale is not the same as the plain gradient.
    """
    model = _mlp()
    opt = spngd_ds.SPNGD(
        model, lr=0.05, momentum=0.0, damping=1e-2, staleness={"threshold": 1e9, "max_interval": 3}, step_bound=None
    )
    for step in range(2):
        _train_step(model, opt, step)
    assert opt.step_count == 2 and not any(s.schedule.is_due(2) for b in opt.blocks.values() for s in b.stats.values())
    head = opt.blocks["3"]
    a_inv, g_inv = head.stats["A"].inverse.clone(), head.stats["G"].inverse.clone()
    x, y = _batch(2)
    F.cross_entropy(model(x), y).backward()
    w, b = model[3].weight, model[3].bias  # type: ignore[index]
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt.step()
    m = torch.cat([gw, gb[:, None]], dim=1)
    p = g_inv @ m @ a_inv
    torch.testing.assert_close(w.detach() - w0, -0.05 * p[:, :-1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.detach() - b0, -0.05 * p[:, -1], rtol=1e-5, atol=1e-7)
    # and this differs from a plain-gradient step
    assert not torch.allclose(w.detach() - w0, -0.05 * gw, rtol=1e-2, atol=1e-6)


def test_each_statistic_has_its_own_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """G of the head refreshed every step while its A goes stale.

    A's activations are not computed at the steps where only G is due, and only G is re-inverted.
    """
    model = _mlp()
    opt = spngd_ds.SPNGD(model, lr=0.05, momentum=0.0, damping=1e-2, staleness={"threshold": 1e9, "max_interval": 3})
    head = opt.blocks["3"]
    head.stats["G"].schedule.threshold = 1e-30  # every change counts as big: interval stays 1
    head.stats["G"].schedule.noise_scale = 0.0  # ... including the part that is sampling noise
    opt.capture.start_step(opt._due(0))
    act = _counting(head, "activation_gram", monkeypatch)
    for step in range(N_STEPS):
        _train_step(model, opt, step)
    a, g = head.stats["A"], head.stats["G"]
    assert (a.captures, a.refreshes, a.inversions) == (5, 5, 5)
    assert (g.captures, g.refreshes, g.inversions) == (N_STEPS, N_STEPS, N_STEPS)
    assert act[0] == 5
    assert a.schedule.state() == (3, 12) and g.schedule.state() == (1, N_STEPS)


def _captures_of_two_forward_steps(model: torch.nn.Module, opt: spngd_ds.SPNGD) -> list[int]:
    """Four steps of two forwards each; A's capture count of the first layer after each step."""
    captures = []
    for step in range(4):
        for half in range(2):
            x, y = _batch(10 * step + half)
            (0.5 * F.cross_entropy(model(x), y)).backward()
        opt.step()
        opt.zero_grad()
        captures.append(opt.blocks["0"].stats["A"].captures)
    return captures


def test_micro_batches_are_captured_only_when_due() -> None:
    """Two forwards per step, every one captured (stat_micro_batches null).

    Two captures at a due step, none at a stale one.
    """
    model = _mlp()
    opt = spngd_ds.SPNGD(
        model,
        lr=0.05,
        momentum=0.0,
        damping=1e-2,
        staleness={"threshold": 1e9, "max_interval": 3},
        stat_micro_batches=None,
    )
    captures = _captures_of_two_forward_steps(model, opt)
    assert captures == [2, 4, 4, 6]  # refreshed at 0, 1, 3


def test_staleness_none_refreshes_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    opt = spngd_ds.SPNGD(model, lr=0.05, momentum=0.0, damping=1e-2, staleness=None)
    assert opt.config.staleness is None
    inv_calls = _counting_inversions(monkeypatch)
    for step in range(6):
        _train_step(model, opt, step)
        for b in opt.blocks.values():
            for s in b.stats.values():
                assert s.schedule.threshold is None
                assert (s.captures, s.refreshes, s.inversions) == (step + 1,) * 3
                assert s.schedule.state() == (1, step + 1)
        assert opt.metrics()["spngd/refresh_fraction"] == 1.0
    assert inv_calls[0] == 6 * 4


def test_default_staleness_is_on() -> None:
    """Section 4: stale statistics are on by default (threshold 0.1, max_interval 20)."""
    model = _mlp()
    opt = spngd_ds.SPNGD(model)
    assert opt.config.staleness is not None
    assert (opt.config.staleness.threshold, opt.config.staleness.max_interval) == (0.1, 20)
    s = opt.blocks["0"].stats["A"].schedule
    assert (s.threshold, s.max_interval) == (0.1, 20)


def test_tiny_threshold_keeps_intervals_at_one() -> None:
    """The plain rule (no noise floor): any change resets the interval."""
    model = _mlp()
    opt = spngd_ds.SPNGD(model, lr=0.05, momentum=0.0, damping=1e-2, staleness={"threshold": 1e-12, "max_interval": 5})
    for b in opt.blocks.values():
        for s in b.stats.values():
            s.schedule.noise_scale = 0.0
    for step in range(6):
        _train_step(model, opt, step)
        for b in opt.blocks.values():
            for s in b.stats.values():
                assert s.schedule.state() == (1, step + 1), (step, b.name, s.name)
                assert s.refreshes == step + 1
        assert opt.metrics()["spngd/mean_interval"] == 1.0


def test_metrics_refresh_fraction_follows_schedule() -> None:
    model = _mlp()
    opt = spngd_ds.SPNGD(model, lr=0.05, momentum=0.0, damping=1e-2, staleness={"threshold": 1e9, "max_interval": 3})
    fractions = []
    for step in range(7):
        _train_step(model, opt, step)
        fractions.append(opt.metrics()["spngd/refresh_fraction"])
    assert fractions == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_by_default_only_the_first_forward_of_a_step_is_captured() -> None:
    """stat_micro_batches defaults to 1: of two forwards per step, the first is captured."""
    model = _mlp()
    opt = spngd_ds.SPNGD(model, lr=0.05, momentum=0.0, damping=1e-2, staleness={"threshold": 1e9, "max_interval": 3})
    assert opt.config.stat_micro_batches == 1
    captures = _captures_of_two_forward_steps(model, opt)
    assert captures == [1, 2, 2, 3]  # refreshed at 0, 1, 3, one micro-batch each


def test_block_hooks_are_installed_only_for_forwards_that_capture() -> None:
    """Forward hooks are registered only on the blocks due to capture.

    A forward that captures nothing runs without the blocks' forward hooks (they cost the slow
    module call), a capturing forward has them exactly on the blocks that are due, and captures
    still happen where they did (the counts of the test above).
    """
    model = _mlp()
    opt = spngd_ds.SPNGD(model, lr=0.05, momentum=0.0, damping=1e-2, staleness={"threshold": 1e9, "max_interval": 3})
    modules = dict(model.named_modules())
    seen: list[list[str]] = []

    def record(module: nn.Module, inputs: object) -> None:  # runs after SPNGD's root pre-hook
        seen.append([name for name in opt.blocks if modules[name]._forward_hooks])

    model.register_forward_pre_hook(record)
    captures = _captures_of_two_forward_steps(model, opt)
    assert captures == [1, 2, 2, 3]
    every = sorted(opt.blocks)
    # steps 0, 1 and 3 are due: hooks on the first forward only; step 2 is stale: none at all
    assert [sorted(s) for s in seen] == [every, [], every, [], [], [], every, []]
    with torch.no_grad():
        model.eval()
        model(_batch(0)[0])
    assert seen[-1] == []
