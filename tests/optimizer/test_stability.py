"""Rule 13 under stress (docs/design.md §2, §7): a run never blows up and never stalls in silence.

Each case runs to its end and must finish with finite parameters and a loss that never climbs back
above where it started, or with the clear stop (:class:`spngd_ds.safety.TrainingStalledError`):

- one repeated batch trained to zero loss for 100 steps (a BatchNorm CNN, a plain MLP, a tiny
  transformer), with the step bound on (the default) and off (the paper's update);
- the learning rate 10x too high; damping 1e-8 (the transformer there is held to a weaker
  promise: bounded and ending below its start);
- a statistic that jumps by 1e6 once (a real outlier: it must still be rejected), a statistic
  that collapses and comes back (it must be accepted: the collapsed inverse may not stay in
  charge), a change of scale that persists (accepted after ``MAX_REJECTIONS``);
- a forward that turns NaN at every step: the clear stop, naming the step and the last loss;
- the same on 2 ranks under DeepSpeed at ZeRO 0 (fast path) and 2 (ZeRO-compatible path).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds
from spngd_ds.safety import EXPLOSION_RATIO, MAX_REJECTIONS, TrainingStalledError
from tests.support.distributed import torchrun

STEPS = 100
SETTINGS = dict(lr=0.05, momentum=0.9, damping=1e-3)  # a new user's "can it overfit one batch" check


class TinyTransformer(nn.Module):
    """Input projection, one nn.TransformerEncoderLayer (pre-norm, no dropout), mean pool, head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.proj(x)).mean(1))


def build(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model and its one batch of 64 samples, 10 classes (deterministic)."""
    torch.manual_seed(0)
    if kind == "bn_cnn":
        model: nn.Module = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)
        )
        x = torch.randn(64, 1, 8, 8)
    elif kind == "mlp":
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
        x = torch.randn(64, 32)
    elif kind == "transformer":
        model = TinyTransformer()
        x = torch.randn(64, 8, 16)
    else:
        raise ValueError(kind)
    return model, x, torch.randint(0, 10, (64,))


@dataclass
class Outcome:
    losses: list[float] = field(default_factory=list)
    stalled: TrainingStalledError | None = None
    opt: Any = None
    model: nn.Module | None = None

    def params_finite(self) -> bool:
        assert self.model is not None
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())


Hook = Callable[[Any, int], None]


def train(kind: str, steps: int = STEPS, before_step: Hook | None = None, nan_from: int = -1, **kw: Any) -> Outcome:
    """``steps`` steps on the one batch through ``step(closure)``; a stall ends the run."""
    model, x, y = build(kind)
    if kind == "transformer":  # a pooled classifier: its loss is per sequence, the sequence the sample (rule 10)
        kw = {"positions_as_samples": False, **kw}
    opt = spngd_ds.SPNGD(model, **{**SETTINGS, **kw})
    out = Outcome(opt=opt, model=model)
    for step in range(steps):
        if before_step is not None:
            before_step(opt, step)

        def closure(step: int = step) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if 0 <= nan_from <= step:
                loss = loss * float("nan")
            loss.backward()
            return loss

        try:
            loss = opt.step(closure)
        except TrainingStalledError as exc:
            out.stalled = exc
            break
        out.losses.append(float(loss))
    return out


def assert_safe(out: Outcome) -> None:
    """Finite parameters and a loss that never climbs back above where it started (or the stop)."""
    assert out.params_finite()
    if out.stalled is not None:
        return
    finite = [v for v in out.losses if math.isfinite(v)]
    assert len(finite) == len(out.losses), out.losses
    assert max(out.losses[1:]) <= out.losses[0], (out.losses[0], max(out.losses[1:]), out.losses)


STRESS: dict[str, dict[str, Any]] = {
    "bn_cnn": {},
    "bn_cnn-paper": {"step_bound": None},  # the paper's update: pi common to both damped factors suffices
    "mlp": {},
    "mlp-paper": {"step_bound": None},
    "transformer": {},
    "bn_cnn-lr10x": {"lr": 0.5},
    "mlp-lr10x": {"lr": 0.5},
    "transformer-lr10x": {"lr": 0.5},
    "bn_cnn-damping1e-8": {"damping": 1e-8},
    "mlp-damping1e-8": {"damping": 1e-8},
}
# climbs above its start (to ~6x) before it settles; held to: finite, bounded, ends below the start
BOUNDED_ONLY: dict[str, dict[str, Any]] = {"transformer-damping1e-8": {"damping": 1e-8}}


@pytest.mark.parametrize("case", list(STRESS))
def test_one_repeated_batch_never_blows_up(case: str) -> None:
    out = train(case.split("-")[0], **STRESS[case])
    assert_safe(out)
    assert out.stalled is None and len(out.losses) == STEPS
    assert out.losses[-1] < 0.5 * out.losses[0]  # and it trains


@pytest.mark.parametrize("case", list(BOUNDED_ONLY))
def test_tiny_damping_on_the_transformer_stays_bounded(case: str) -> None:
    out = train(case.split("-")[0], **BOUNDED_ONLY[case])
    assert out.params_finite() and out.stalled is None and len(out.losses) == STEPS
    assert all(math.isfinite(v) for v in out.losses) and max(out.losses) < 10 * out.losses[0]
    assert out.losses[-1] < out.losses[0]
    paper = train(case.split("-")[0], step_bound=None, **BOUNDED_ONLY[case])  # what the bound prevents
    assert paper.stalled is not None or max(paper.losses) > 100 * paper.losses[0]


def test_the_bound_needs_the_loss_and_acts_on_a_too_large_step() -> None:
    """ν = min(1, c L / (lr ||P(∇)|| ||∇||)) against a float64 recomputation from the same step."""
    model, x, y = build("mlp")
    model = model.double()
    x = x.double()
    opt = spngd_ds.SPNGD(model, lr=0.05, momentum=0.0, damping=1e-8, step_bound=0.5, staleness=None)
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
        before = [p.detach().clone() for p in model.parameters()]
        opt.observe_loss(loss)
        opt.step()
        nu = opt.metrics()["spngd/step_bound_factor"]
        deltas = [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]
        step_norm = math.sqrt(sum(float((d**2).sum()) for d in deltas))  # = lr ν ||P(∇)||
        gnorm = math.sqrt(sum(float((g**2).sum()) for g in grads))
        if nu < 1.0:  # bound active: the step is exactly c L / ||∇||
            assert step_norm == pytest.approx(0.5 * float(loss) / gnorm, rel=1e-9)
        else:
            assert step_norm <= 0.5 * float(loss) / gnorm * (1 + 1e-9)
    assert nu < 1.0  # damping 1e-8 makes the step far too long: the bound acts
    m, x1, y1 = build("mlp")
    unbounded = spngd_ds.SPNGD(m, damping=1e-8, step_bound=0.5)
    F.cross_entropy(m(x1), y1).backward()
    unbounded.step()  # no loss observed: no bound
    assert unbounded.metrics()["spngd/step_bound_factor"] == 1.0


def _scale_stat(opt: Any, block: str, stat: str, factor: float) -> None:
    """This step's local sum of ``block``'s ``stat`` is multiplied by ``factor`` when it is taken."""
    s = opt.blocks[block].stats[stat]
    take = s.take_local

    def scaled() -> tuple[torch.Tensor | None, float]:
        total, count = take()
        s.take_local = take  # once
        return (total * factor if total is not None else None), count

    s.take_local = scaled


def test_a_one_off_jump_of_1e6_is_still_rejected() -> None:
    seen: dict[str, Any] = {}

    def jump(opt: Any, step: int) -> None:
        s = opt.blocks["4"].stats["G"]
        if step >= 3 and "step" not in seen and s.schedule.is_due(step):
            seen["step"], seen["value"] = step, s.value.clone()
            _scale_stat(opt, "4", "G", 1e7)  # G of the head: a relative change of ~1e7 > EXPLOSION_RATIO
        elif "step" in seen and "after" not in seen:
            seen["after"] = s.value.clone()

    out = train("bn_cnn", before_step=jump)
    assert_safe(out)
    m = out.opt.metrics()
    assert m["spngd/rejected_stats"] == 1.0
    assert m["spngd/accepted_after_collapse"] == 0.0 and m["spngd/accepted_after_rejections"] == 0.0
    torch.testing.assert_close(seen["after"], seen["value"])  # the old value was kept


def test_a_collapsed_statistic_that_comes_back_is_accepted() -> None:
    """G collapses by 1e-9 for three refreshes, then returns to its scale (a jump of ~1e9).

    Accepted at once and counted, not rejected while the collapsed inverse preconditions growing
    gradients.
    """
    refreshes: list[int] = []

    def collapse(opt: Any, step: int) -> None:
        s = opt.blocks["4"].stats["G"]
        if step >= 3 and len(refreshes) < 3 and s.schedule.is_due(step):
            refreshes.append(step)
            _scale_stat(opt, "4", "G", 1e-9)

    out = train("mlp", before_step=collapse)
    assert_safe(out)
    m = out.opt.metrics()
    assert m["spngd/accepted_after_collapse"] >= 1.0 and m["spngd/rejected_stats"] == 0.0


def test_a_change_of_scale_that_persists_is_accepted_after_max_rejections() -> None:
    jumps: list[int] = []

    def persist(opt: Any, step: int) -> None:
        s = opt.blocks["4"].stats["G"]
        if step >= 3 and len(jumps) <= MAX_REJECTIONS and s.schedule.is_due(step):
            jumps.append(step)
            _scale_stat(opt, "4", "G", 1e9)  # far above EXPLOSION_RATIO while G shrinks at zero loss

    out = train("mlp", steps=12, before_step=persist)
    m = out.opt.metrics()
    assert m["spngd/rejected_stats"] == MAX_REJECTIONS and m["spngd/accepted_after_rejections"] == 1.0
    s = out.opt.blocks["4"].stats["G"]
    assert s.rejections == 0 and float(s.value.norm()) > 0
    assert out.params_finite()
    assert EXPLOSION_RATIO == 1e6


def test_a_forward_that_turns_nan_ends_in_the_clear_stop() -> None:
    out = train("bn_cnn", nan_from=10, max_consecutive_skips=20)
    assert out.stalled is not None and out.params_finite()
    msg = str(out.stalled)
    assert len(out.losses) == 29  # steps 10..29 skipped: the 20th in a row (step 29) raises
    assert "20 consecutive steps skipped since step 10" in msg and "non-finite gradient" in msg
    assert f"last applied step (9) was {out.losses[9]:.6g}" in msg
    assert "Lower lr (now 0.05)" in msg and "raise damping (now 0.001)" in msg
    assert out.opt.metrics()["spngd/skipped_steps"] == 20.0


def test_the_stop_is_off_with_null_and_counts_only_consecutive_skips() -> None:
    out = train("mlp", steps=40, nan_from=5, max_consecutive_skips=None)
    assert out.stalled is None and out.opt.metrics()["spngd/skipped_steps"] == 35.0
    model, x, y = build("mlp")
    opt = spngd_ds.SPNGD(model, **SETTINGS, max_consecutive_skips=2)
    for step in range(20):  # a NaN every other step never stops the run
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * (float("nan") if step % 2 else 1.0)
        loss.backward()
        opt.step()
    assert opt.metrics()["spngd/skipped_steps"] == 10.0
    with pytest.raises(TrainingStalledError, match="no loss was observed"):
        for _ in range(2):
            opt.zero_grad()
            (F.cross_entropy(model(x), y) * float("nan")).backward()
            opt.step()


@pytest.mark.parametrize(
    "bad", [{"step_bound": -1.0}, {"step_bound": True}, {"max_consecutive_skips": -1}, {"max_consecutive_skips": 2.5}]
)
def test_bad_values_name_the_key(bad: dict[str, Any]) -> None:
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        spngd_ds.SPNGD(build("mlp")[0], **bad)


# -- 2 ranks under DeepSpeed ---------------------------------------------------------------------------
def _ds(tmp_path: Path, stage: int, name: str, extra: list[str], params: dict[str, Any]) -> list[dict[str, Any]]:
    base = {"lr": 0.05, "momentum": 0.9, "damping": 1e-3, "staleness": {"threshold": 0.1, "max_interval": 20}}
    override = {"optimizer": {"type": "SPNGD", "params": {**base, **params}}}
    out = tmp_path / f"{name}-z{stage}-rank{{rank}}"  # every rank writes its own file
    torchrun(
        2,
        [
            "--model",
            "convbn",
            "--stage",
            str(stage),
            "--global_batch",
            "64",
            "--repeat_batch",
            "--config_override",
            json.dumps(override),
            "--out",
            str(out),
            *extra,
        ],
        timeout=600,
    )
    return [torch.load(str(out).replace("{rank}", str(r)), weights_only=False) for r in range(2)]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("case", ["repeat", "lr10x", "damping1e-8"])
def test_deepspeed_repeated_batch_never_blows_up(tmp_path: Path, stage: int, case: str) -> None:
    params = {"lr10x": {"lr": 0.5}, "damping1e-8": {"damping": 1e-8}}.get(case, {})
    runs = _ds(tmp_path, stage, case, ["--steps", str(STEPS)], params)
    for got in runs:
        losses = got["info"]["losses"]
        assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
        if case == "damping1e-8":  # climbs ~15% above its start before it settles: bounded only
            assert max(losses) < 10 * losses[0] and losses[-1] < losses[0], losses
        else:
            assert max(losses[1:]) <= losses[0] and losses[-1] < 0.5 * losses[0], losses
        assert all(bool(torch.isfinite(p).all()) for p in got["params"].values())
        assert got["info"]["skipped_steps"] == 0


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_nan_forward_ends_in_the_clear_stop_on_every_rank(tmp_path: Path, stage: int) -> None:
    runs = _ds(
        tmp_path, stage, "nan", ["--steps", "30", "--nan_forward_from", "3", "--stall_ok"], {"max_consecutive_skips": 5}
    )
    for got in runs:
        stalled = got["info"]["stalled"]
        assert stalled is not None and stalled["step"] == 7, stalled  # steps 3..7 skipped: the 5th raises
        assert "5 consecutive steps skipped since step 3" in stalled["message"]
        assert "the loss of the last applied step (2) was" in stalled["message"]
        assert got["info"]["step_count"] == 3
        assert all(bool(torch.isfinite(p).all()) for p in got["params"].values())
