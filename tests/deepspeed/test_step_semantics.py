"""Step semantics that need DeepSpeed on gloo ranks.

A resume at another world size on the compatible path keeps the schedule and the engine's counters;
a step SP-NGD skips is a skipped step for DeepSpeed too (counted, scheduler not advanced) on every
path; clipping unset is logged; combinations SP-NGD cannot do right are refused on every rank before
any collective.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.distributed import REFUSAL_TIMEOUT_S, assert_refused_on_every_rank, max_rel_err, run_worker, torchrun
from tests.support.rank_records import read_records

TOL = 2e-5


pytestmark = pytest.mark.dist


@pytest.mark.parametrize(("stage", "save_ranks", "load_ranks"), [(2, 2, 1), (1, 1, 2)])
def test_resume_at_another_world_size_keeps_schedule_and_counters(
    tmp_path: Path, stage: int, save_ranks: int, load_ranks: int
) -> None:
    """ZeRO 1/2 at another world size loads the module only (DeepSpeed cannot re-partition its optimizer state).

    The learning-rate schedule, global steps and samples must still continue.
    """
    common = ["--stage", str(stage), "--poly", "--global_batch", "16"]
    straight = run_worker(load_ranks, tmp_path / "straight.pt", *common, "--steps", "5")
    ck = tmp_path / "ck"
    torchrun(save_ranks, [*common, "--steps", "3", "--save_dir", str(ck), "--out", str(tmp_path / "a")])
    resumed = run_worker(
        load_ranks, tmp_path / "b.pt", *common, "--steps", "2", "--start_step", "3", "--load_dir", str(ck)
    )
    for key in ("global_steps", "global_samples", "lr", "step_count"):
        assert resumed["info"][key] == straight["info"][key], key
    assert resumed["info"]["global_steps"] == 5
    assert max_rel_err(resumed["params"], straight["params"]) < TOL


@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (0, "bf16"), (2, "fp32"), (2, "bf16"), (3, "fp32")])
def test_a_step_spngd_skips_is_skipped_for_deepspeed(tmp_path: Path, stage: int, precision: str) -> None:
    """A NaN on one rank at step 2.

    SP-NGD skips the step on every rank, DeepSpeed counts it in ``skipped_steps`` and does not
    advance the scheduler, so the learning rates that follow are those of a run with one step fewer.
    """
    args = ["--stage", str(stage), "--precision", precision, "--poly", "--steps", "5"]
    skipped = run_worker(2, tmp_path / "skip.pt", *args, "--nan_grad_step", "2")
    clean = run_worker(
        2, tmp_path / "clean.pt", "--stage", str(stage), "--precision", precision, "--poly", "--steps", "4"
    )
    info = skipped["info"]
    assert info["skipped_steps"] == 1
    assert info["metrics"]["spngd/skipped_steps"] == 1
    assert info["step_count"] == 4 == clean["info"]["step_count"]
    assert info["lr"] == clean["info"]["lr"]  # the schedule did not advance on the skipped step
    for value in skipped["params"].values():
        assert torch.isfinite(value).all()


def test_unset_gradient_clipping_is_logged_once(tmp_path: Path) -> None:
    proc = torchrun(2, ["--stage", "0", "--steps", "1", "--out", str(tmp_path / "x")])
    # both ranks finished (their records say so), so the output holds all either of them printed
    records = read_records(tmp_path / "x", 2)
    assert [r is not None and r["ok"] for r in records] == [True, True], records
    # control for the refusal test below: the worker's collective counter sees a run's collectives
    assert all(r is not None and r["collectives"] > 0 for r in records), records
    text = proc.stdout + proc.stderr
    assert text.count("SPNGD: gradient_clipping is not set: no clipping") == 1  # rank 0 only


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"torch_autocast": {"enabled": True, "dtype": "float16"}}, "torch_autocast.enabled = true is refused"),
        ({"managed_gradient_accumulation": False}, "managed_gradient_accumulation = false is refused"),
        (
            {"optimizer": {"type": "SPNGD", "params": {"fisher": "mc"}}, "zero_optimization": {"stage": 3}},
            "fisher = 'mc' is refused with zero_optimization.stage 3",
        ),
        ({"gradient_clipping": -1}, "gradient_clipping = -1 is invalid; allowed: a number >= 0"),
    ],
)
def test_unsupported_combination_is_refused_on_every_rank(
    tmp_path: Path, override: dict[str, Any], message: str
) -> None:
    """Each rank records its own refusal, before any collective or process group.

    The records (tests/support/rank_records.py) keep a rank that torchrun stops once the other has failed
    from hiding it; they also show that no collective had been called and no process group existed
    when the error was raised.
    """
    proc = torchrun(
        2,
        ["--config_override", json.dumps(override), "--out", str(tmp_path / "x")],
        timeout=REFUSAL_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode != 0
    assert_refused_on_every_rank(read_records(tmp_path / "x", 2), message, proc)
