"""2 gloo ranks under DeepSpeed give what one standalone process gives on one global batch (docs/design.md §8).

Every ZeRO stage, staleness on and off, micro-batches vs one batch.

Tolerance: fp32 parameters after 5 steps agree to 2e-5 relative to each tensor's largest entry
(measured: 3e-7 to 5e-7; the difference is only the summation order of the reductions).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.distributed import max_rel_err, run_worker
from tests.support.ds_reference import reference_params

TOL = 2e-5


pytestmark = pytest.mark.dist


@pytest.mark.parametrize("staleness", ["on", "off"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_equal_one_process(tmp_path: Path, stage: int, staleness: str) -> None:
    out = run_worker(2, tmp_path / "out.pt", "--stage", str(stage), "--staleness", staleness)
    ref = reference_params("mlp", steps=5, staleness=staleness)
    assert max_rel_err(out["params"], ref) < TOL
    # the run really moved the parameters (a test that cannot fail is no test)
    start = reference_params("mlp", steps=0)
    assert max_rel_err(ref, start) > 1e-3


@pytest.mark.parametrize("stage", [0, 2])
def test_micro_batches_equal_one_batch(tmp_path: Path, stage: int) -> None:
    """4 micro-batches of 4 per rank (2 ranks) == one batch of 32 in one process."""
    out = run_worker(2, tmp_path / "out.pt", "--stage", str(stage), "--gas", "4")
    assert max_rel_err(out["params"], reference_params("mlp", steps=5)) < TOL


def test_conv_model_stage0_and_batchnorm_split(tmp_path: Path) -> None:
    """Conv2d blocks through the fast path.

    BatchNorm with per-rank batch statistics equals the standalone run fed the same halves
    (BatchNorm normalises per forward pass).
    """
    out = run_worker(2, tmp_path / "conv.pt", "--model", "conv", "--stage", "0")
    assert max_rel_err(out["params"], reference_params("conv", steps=5)) < TOL
    out = run_worker(2, tmp_path / "bn.pt", "--model", "convbn", "--stage", "1")
    assert max_rel_err(out["params"], reference_params("convbn", steps=5, splits=2)) < TOL


def test_stat_micro_batches_captures_only_the_first_k(tmp_path: Path) -> None:
    """Gradient accumulation 4 with ``stat_micro_batches`` 2.

    Statistics from micro-batches 0 and 1 of each rank only, normalised by their sample count;
    gradients from all four.
    """
    out = run_worker(2, tmp_path / "out.pt", "--stage", "0", "--gas", "4", "--stat_micro_batches", "2")
    ref = reference_params("mlp", steps=5, splits=8, ranks=2, stat_micro_batches=4)
    assert max_rel_err(out["params"], ref) < TOL
    assert max_rel_err(ref, reference_params("mlp", steps=5)) > 100 * TOL  # the option changes the run


@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_offload_equals_one_process(tmp_path: Path, stage: int) -> None:
    out = run_worker(2, tmp_path / "out.pt", "--stage", str(stage), "--offload")
    assert max_rel_err(out["params"], reference_params("mlp", steps=5)) < TOL
