"""DeepSpeed integration beyond plain equivalence.

Memory and bytes per rank, mixed precision, fp16 overflow, checkpoints across world sizes, bad
configs (2 gloo ranks on the CPU).
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

import spngd_ds
from spngd_ds.comm import OwnerLayout, layout_bytes, triu_numel
from tests.support.distributed import REFUSAL_TIMEOUT_S, assert_refused_on_every_rank, max_rel_err, run_worker, torchrun
from tests.support.ds_reference import reference_params
from tests.support.ds_worker import build_model
from tests.support.rank_records import read_records

TOL = 2e-5


pytestmark = pytest.mark.dist


def test_curvature_memory_per_rank_and_fast_path_bytes(tmp_path: Path) -> None:
    """Curvature bytes per rank, and the exact bytes a fast-path step sends.

    Each of 2 ranks holds <= 60% of the 1-rank curvature bytes (8 blocks), and the bytes a fast-path
    step sends (every statistic due: staleness off) are exactly those of the exchange layout
    (docs/design.md §3), computed here from the assignment alone: gradients to owners and parameters back
    (reduce-scatter of equal shards + all-to-all, both ways), the packed due statistics to owners,
    the owners' refresh decisions back with the parameters (their (interval, next step) pairs as two
    more fp32 elements per statistic in the parameters' layout), and the one small all-reduce (the
    flags and the sample counts).
    """
    torchrun(2, ["--stage", "0", "--staleness", "off", "--out", str(tmp_path / "r{rank}")])
    infos = [torch.load(tmp_path / f"r{r}", weights_only=False)["info"] for r in range(2)]
    model = build_model("mlp")
    total = spngd_ds.SPNGD(model, staleness=None)
    x = torch.randn(8, 1, 4, 4)
    torch.nn.functional.cross_entropy(model(x), torch.randint(0, 5, (8,))).backward()
    total.step()
    one_rank = total.curvature_nbytes()
    assert len(total.blocks) >= 8
    for info in infos:
        assert 0 < info["curvature_nbytes"] <= 0.6 * one_rank
    assert sum(i["curvature_nbytes"] for i in infos) == one_rank  # nothing replicated, nothing lost

    owners = infos[0]["assignment"]
    assert owners == infos[1]["assignment"]
    world = 2
    blocks = list(total.blocks.values())
    grads = OwnerLayout.build([(tuple(p.shape), owners[b.name]) for b in blocks for p in b.params], world)
    due = [(b, s) for b in blocks for s in b.stats.values()]  # staleness off: every statistic, every step

    def packed(pairs: list[tuple[Any, Any]]) -> OwnerLayout:
        return OwnerLayout.build(
            [(triu_numel(s.shape[-1]) * math.prod(s.shape[:-2]), owners[b.name]) for b, s in pairs], world
        )

    # the A factors travel in a layout of their own, started behind the backward (spngd_ds/paths/overlap.py)
    early, late = [(b, s) for b, s in due if s.name == "A"], [(b, s) for b, s in due if s.name != "A"]
    param_items = [(tuple(p.shape), owners[b.name]) for b in blocks for p in b.params]
    back = OwnerLayout.build(param_items + [(2, owners[b.name]) for b, _ in due], world)
    nparams = sum(1 for p in model.parameters() if p.requires_grad)

    def all_reduce(nbytes: int) -> int:  # what the library counts for an all-reduce (ring)
        return int(2 * (world - 1) / world * nbytes)

    # gradients to owners; updated parameters and the refresh decisions back (fp32)
    sent_grads = [t + f for t, f in zip(layout_bytes(grads, 4, "to"), layout_bytes(back, 4, "from"), strict=True)]
    sent_stats = [
        a + g for a, g in zip(layout_bytes(packed(early), 4, "to"), layout_bytes(packed(late), 4, "to"), strict=True)
    ]  # packed statistics to owners (comm_dtype fp32)
    small = all_reduce(8 * (1 + nparams + len(due)))  # flags and sample counts, one float64 all-reduce
    small += all_reduce(8 * 4)  # the step bound's sums (rule 13): four float64 values
    for r, info in enumerate(infos):
        assert info["comm_nbytes"] == sent_grads[r] + sent_stats[r] + small, r
    # nothing padded to the most-loaded owner: the gradient exchange is a first-order all-reduce of
    # the same gradients (2 (N-1)/N * 4 bytes per element, up to the rounding of equal shards) plus
    # at most what the all-to-alls move (a shard to owners, the owned range back)
    # (the decisions ride back with the parameters: the bound is that of the larger layout)
    allreduce = 2 * (world - 1) / world * 4 * back.total
    for r in range(world):
        assert sent_grads[r] <= allreduce + 4 * 2 * (world - 1) + 4 * (back.shard + back.geometry.counts[r])
        assert sent_stats[r] <= 4 * world * (packed(early).shard + packed(late).shard)


@pytest.mark.parametrize(
    ("args", "tol"),
    [
        (["--stage", "0", "--precision", "bf16"], 0.15),
        (["--stage", "1", "--precision", "bf16"], 0.15),
        (["--stage", "2", "--precision", "bf16", "--grad_accum_fp32"], 0.15),
        (["--stage", "3", "--precision", "bf16"], 0.15),
        (["--stage", "1", "--precision", "fp16", "--patch_fp16"], 0.05),
        (["--stage", "2", "--precision", "fp16", "--patch_fp16"], 0.05),
        (["--stage", "3", "--precision", "fp16", "--patch_fp16"], 0.05),
    ],
)
def test_mixed_precision_follows_fp32(tmp_path: Path, args: list[str], tol: float) -> None:
    """bf16/fp16 runs stay finite and within ``tol`` of the fp32 trajectory.

    Measured as max|θ_lowp - θ_fp32| / max|θ_fp32 - θ_0| per tensor (bf16 measured ~0.07, fp16
    ~0.01).
    """
    out = run_worker(2, tmp_path / "out.pt", *args)
    ref = reference_params("mlp", steps=5)
    start = reference_params("mlp", steps=0)
    for name, value in out["params"].items():
        assert torch.isfinite(value).all()
        err = float((value - ref[name]).abs().max() / (ref[name] - start[name]).abs().max())
        assert err < tol, (name, err)
    assert out["info"]["metrics"]["spngd/skipped_steps"] == 0


def test_fp16_overflow_skips_step_and_statistics(tmp_path: Path) -> None:
    """An inf loss at step 2 (fp16, ZeRO 1).

    DeepSpeed skips the step, SP-NGD discards that step's statistics, and the run equals one that
    never saw batch 2.
    """
    out = run_worker(
        2,
        tmp_path / "out.pt",
        "--stage",
        "1",
        "--precision",
        "fp16",
        "--patch_fp16",
        "--inject_overflow_step",
        "2",
        "--staleness",
        "off",
    )
    assert out["info"]["metrics"]["spngd/skipped_steps"] == 1
    ref = reference_params("mlp", steps=5, staleness="off", skip=(2,))
    start = reference_params("mlp", steps=0)
    for name, value in out["params"].items():
        err = float((value - ref[name]).abs().max() / (ref[name] - start[name]).abs().max())
        assert err < 0.05, (name, err)


@pytest.mark.parametrize(("stage", "save_ranks", "load_ranks"), [(0, 2, 1), (0, 1, 2), (2, 2, 1), (2, 1, 2), (2, 2, 2)])
def test_checkpoint_resumes_at_another_world_size(tmp_path: Path, stage: int, save_ranks: int, load_ranks: int) -> None:
    """3 steps on N ranks, save, resume on M ranks for 2 more: equals 5 uninterrupted steps."""
    ck = tmp_path / "ck"
    torchrun(save_ranks, ["--stage", str(stage), "--steps", "3", "--save_dir", str(ck), "--out", str(tmp_path / "a")])
    assert (ck / "latest").read_text().strip() == "global_step3"
    files = sorted(p.name for p in (ck / "global_step3").glob("spngd_rank*"))
    assert len(files) == save_ranks
    out = run_worker(
        load_ranks, tmp_path / "b", "--stage", str(stage), "--steps", "2", "--start_step", "3", "--load_dir", str(ck)
    )
    assert max_rel_err(out["params"], reference_params("mlp", steps=5)) < TOL


def test_bad_config_fails_on_every_rank_without_hanging(tmp_path: Path) -> None:
    """Raised on both ranks before any collective (each rank's own record, tests/support/rank_records.py)."""
    proc = torchrun(
        2,
        [
            "--config_override",
            '{"optimizer": {"type": "SPNGD", "params": {"fisher": "kfac"}}}',
            "--out",
            str(tmp_path / "x"),
        ],
        timeout=REFUSAL_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode != 0
    assert_refused_on_every_rank(
        read_records(tmp_path / "x", 2), "ValueError: optimizer.params (SPNGD): 'fisher' = 'kfac' is invalid", proc
    )


def test_fp16_at_stage_0_is_refused_with_the_alternative(tmp_path: Path) -> None:
    proc = torchrun(
        2,
        ["--stage", "0", "--precision", "fp16", "--patch_fp16", "--out", str(tmp_path / "x")],
        timeout=REFUSAL_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode != 0
    assert_refused_on_every_rank(
        read_records(tmp_path / "x", 2), "use fp16 with stage 1, 2 or 3, or bf16 with stage 0", proc
    )


def test_timeout_is_enforced() -> None:
    """The harness itself cannot hang forever (guards the no-hang tests above)."""
    with pytest.raises(subprocess.TimeoutExpired):
        torchrun(1, ["--steps", "100000", "--out", "/dev/null"], timeout=5, check=False)
