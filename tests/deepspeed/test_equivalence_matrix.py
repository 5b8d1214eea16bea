"""The equivalence matrix (docs/design.md §8).

N gloo ranks under DeepSpeed give what one standalone SP-NGD process gives when fed the same
per-rank passes.

Axes: models {MLP, conv, conv + BatchNorm on split batches, tied weights, a 2-block BatchNorm
model that leaves the third of 3 ranks without any block} x ZeRO {0, 1, 2, 3} x {fp32, bf16} x
{constant lr, SPNGDPolyDecay (changes every step)} x weight_rescale {off, on} x
gradient_clipping {unset, 0, 0.5 (below the update norm)} x accumulation {1, 2} x zero.Init, at 2
and 3 ranks (3 ranks: unequal owners, and a rank that owns nothing). The loss is scaled so that raw
gradient norms exceed 1, where DeepSpeed's implicit clip of 1.0 would act.

Which cells run here: every path branch is covered by at least one cell that fails when it breaks
(fast fp32 / bf16 wrapper / ZeRO 1 / 2 / 3 / zero.Init; clipping set, 0 and unset on each stage;
the momentum correction and rule 8 on each path; tied weights on each path; the empty rank on
each stage and precision). Each launch runs a group of cells in one process group to pay
DeepSpeed's start-up once. ``SPNGD_FULL_MATRIX=1`` adds the rest of the product at 2 ranks (slow).

Tolerances, relative to each tensor's largest entry: fp32 2e-5 (measured: 0 at 2 ranks, where sums
of two numbers do not depend on order; <= 8e-6 at 3 ranks). A bf16 cell is compared with
``cells.reference_bf16``, which runs the same bf16 forwards and backwards with the same rounding
(bf16 model, fp32 masters and statistics, gradients averaged as DeepSpeed averages them), so it is
held to 1e-3. At 3 ranks the reference also adds the ranks' values in the order DeepSpeed's
reductions over gloo add them (``cells.deepspeed_average``: read off DeepSpeed's gradients), with
bf16 communication (DeepSpeed's default for a bf16 model) and with fp32 communication
(``communication_data_type: "fp32"``). Measured: 0 at 2 ranks at every stage; at 3 ranks <= 3e-7 at
ZeRO 0, 1 and 2 and with fp32 communication at ZeRO 3, and 5e-4 at ZeRO 3 with bf16 communication.
An lr 1% too large gives >= 7e-3 (``test_bf16_tolerance_sees_a_one_percent_update_error``), so such
a bug fails every bf16 cell. The checks that do not depend on rounding (steps counted, nothing
skipped) apply to every cell.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support import cells as C
from tests.support.distributed import torchrun

TOL = 2e-5
BF16_TOL = 1e-3
Cell = C.Cell

FP32_2 = [
    Cell("convbn", 0),  # the original defect: DeepSpeed's implicit clip at stage 0
    Cell("convbn", 0, clip=0.0),
    Cell("convbn", 0, schedule="poly", rescale=True, clip=0.5),
    Cell("convbn", 1, schedule="poly", rescale=True, clip=0.5),
    Cell("convbn", 2, schedule="poly", rescale=True, clip=0.5),
    Cell("convbn", 3, schedule="poly", rescale=True, clip=0.5),
    Cell("convbn", 3, schedule="poly", rescale=True, zero_init=True),
    Cell("convbn", 2, clip=0.0),
    Cell("mlp", 0, schedule="poly"),
    Cell("mlp", 2, schedule="poly", gas=2),
    Cell("mlp", 3),
    Cell("conv", 0, gas=2),
    Cell("conv", 1, clip=0.5),
    Cell("tied", 0, schedule="poly", clip=0.5),
    Cell("tied", 1),
    Cell("tied", 2, schedule="poly"),
    Cell("tied", 3, clip=0.5),
    # rule 13's step bound on (the other cells compare the paper's update), on both paths, with and
    # without clip_norm sharing its all-reduce
    Cell("convbn", 0, clip=0.5, step_bound=0.01),
    Cell("convbn", 2, schedule="poly", step_bound=0.01),
]
FP32_3 = [
    Cell("bnpool", 0, schedule="poly", rescale=True, clip=0.5),
    Cell("bnpool", 1, schedule="poly", rescale=True, clip=0.5),
    Cell("bnpool", 2, schedule="poly", rescale=True, clip=0.5),
    Cell("bnpool", 3, schedule="poly", rescale=True, clip=0.5),
    Cell("bnpool", 3, zero_init=True, rescale=True),
    Cell("convbn", 0, schedule="poly", rescale=True, clip=0.5, gas=2),
    Cell("convbn", 2, gas=2),
    Cell("mlp", 0, schedule="poly", clip=0.5),
    Cell("mlp", 1, schedule="poly", clip=0.5),
    Cell("mlp", 3, schedule="poly"),
    Cell("tied", 0),
    Cell("tied", 3, schedule="poly", rescale=True),
]
BF16_3 = [
    Cell("bnpool", 0, precision="bf16"),  # bf16 at stage 0 with a rank that owns nothing
    Cell("bnpool", 0, precision="bf16", schedule="poly", clip=0.5, rescale=True),
    Cell("bnpool", 1, precision="bf16"),
    Cell("bnpool", 2, precision="bf16", schedule="poly", clip=0.5, rescale=True),
    Cell("bnpool", 3, precision="bf16", schedule="poly", clip=0.5, rescale=True),
    # fp32 communication (communication_data_type): another averaging, another order
    Cell("bnpool", 1, precision="bf16", comm_fp32=True),
    Cell("bnpool", 2, precision="bf16", schedule="poly", clip=0.5, rescale=True, comm_fp32=True),
    Cell("bnpool", 3, precision="bf16", schedule="poly", clip=0.5, rescale=True, comm_fp32=True),
]
BF16_2 = [
    Cell("convbn", 0, precision="bf16", schedule="poly", clip=0.5),
    Cell("convbn", 2, precision="bf16", rescale=True),
    Cell("mlp", 1, precision="bf16", schedule="poly"),
    Cell("convbn", 3, precision="bf16", schedule="poly", clip=0.5),  # ZeRO-3 where sums are exact
]


def _full_product() -> list[Cell]:
    out = []
    for model, stage, schedule, rescale, clip in itertools.product(
        ["mlp", "conv", "convbn", "tied"], [0, 1, 2, 3], ["const", "poly"], [False, True], [None, 0.0, 0.5]
    ):
        cell = Cell(model, stage, schedule=schedule, rescale=rescale, clip=clip)
        if cell not in FP32_2:
            out.append(cell)
    return out


GROUPS: dict[str, tuple[int, list[Cell]]] = {
    "fp32-2ranks": (2, FP32_2),
    "fp32-3ranks": (3, FP32_3),
    "bf16-3ranks": (3, BF16_3),  # bf16 cells run in their own process groups
    "bf16-2ranks": (2, BF16_2),
}
if os.environ.get("SPNGD_FULL_MATRIX") == "1":
    GROUPS["full-2ranks"] = (2, _full_product())


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """Launch every group once; cells read their results from the group's directory."""
    return {}


def _run_group(name: str, cache: dict[str, tuple[Path, int]], base: Path) -> tuple[Path, int]:
    if name not in cache:
        world, todo = GROUPS[name]
        out = base / name
        out.mkdir(parents=True, exist_ok=True)
        spec = out / "cells.json"
        spec.write_text(json.dumps([c.to_json() for c in todo]))
        torchrun(world, ["--cells", str(spec), "--out", str(out)], timeout=900)
        cache[name] = (out, world)
    return cache[name]


CASES = [(g, c) for g, (_, cells) in GROUPS.items() for c in cells]


@pytest.mark.dist
@pytest.mark.parametrize(("group", "cell"), CASES, ids=[f"{g}:{c.name}" for g, c in CASES])
def test_cell_equals_standalone(
    group: str, cell: Cell, results: dict[str, tuple[Path, int]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    out_dir, world = _run_group(group, results, tmp_path_factory.getbasetemp() / "matrix")
    got: dict[str, Any] = torch.load(out_dir / f"{cell.name}.pt", weights_only=False)
    info = got["info"]
    ref = C.reference(cell, world)
    assert info["step_count"] == cell.steps  # SP-NGD stepped once per DeepSpeed step, never at construction
    assert info["skipped_steps"] == 0 and info["metrics"]["spngd/skipped_steps"] == 0
    if cell.clip and not cell.step_bound:  # (the step bound shortens the update below the limit)
        assert info["metrics"]["spngd/clip_factor"] < 1.0  # the limit is below the update norm: it acts
    elif not cell.clip:
        assert info["metrics"]["spngd/clip_factor"] == 1.0
    if cell.step_bound:
        assert info["metrics"]["spngd/step_bound_factor"] < 1.0  # the bound acts on the last step
    else:
        assert info["metrics"]["spngd/step_bound_factor"] == 1.0
    if world == 3 and cell.model == "bnpool":
        assert sorted(info["owned_counts"]) == [0, 1, 1]  # one rank owns nothing
    assert info["metrics"]["spngd/factors_sent_early"] > 0  # A went to its owners behind the backward
    sent = info["fragment_elements_sent"]
    if cell.stage in (1, 2):  # owners follow DeepSpeed's partitions: fewer elements cross the wire
        chosen, lpt = [c for c, _ in sent], [lp for _, lp in sent]
        assert max(chosen) <= max(lpt) and (sum(chosen) < sum(lpt) or sum(lpt) == 0), sent
    for value in got["params"].values():
        assert torch.isfinite(value).all()
    err = C.rel_err(got["params"], ref)
    assert err < tolerance(cell, world), err


def tolerance(cell: Cell, world: int) -> float:
    """How far a cell may be from its reference (module docstring)."""
    return BF16_TOL if cell.precision == "bf16" else TOL


def test_the_matrix_axes_change_the_run() -> None:
    """Each axis the cells vary changes the standalone result by far more than the tolerance.

    So a path that ignored an axis would fail its cell (a test that cannot fail is no test).
    """
    base = Cell("convbn", 0)
    ref = C.reference(base, 2)
    for changed in (base.but(clip=0.5), base.but(schedule="poly"), base.but(rescale=True), base.but(step_bound=0.01)):
        assert C.rel_err(C.reference(changed, 2), ref) > 100 * TOL, changed
    assert C.rel_err(ref, C.reference(base, 2, steps=0)) > 1e-2  # and the run moves
    pool = Cell("bnpool", 0)  # rule 8 binds on the 3-rank model too
    assert C.rel_err(C.reference(pool.but(rescale=True), 3), C.reference(pool, 3)) > 100 * TOL


@pytest.mark.parametrize(("stage", "comm_fp32"), [(1, False), (2, False), (3, False), (3, True)])
def test_bf16_tolerance_sees_a_one_percent_update_error(
    stage: int, comm_fp32: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 3-rank bf16 cells' tolerance is far below what a 1% larger step does."""
    cell = Cell("bnpool", stage, precision="bf16", comm_fp32=comm_fp32)
    assert tolerance(cell, 3) == BF16_TOL
    ref = C.reference(cell, 3)
    params = C.spngd_params

    def one_percent_larger(c: Cell) -> dict[str, Any]:
        out = params(c)
        out["lr"] *= 1.01
        return out

    monkeypatch.setattr(C, "spngd_params", one_percent_larger)
    assert C.rel_err(C.reference(cell, 3), ref) > 5 * BF16_TOL


@pytest.mark.parametrize("model", ["mlp", "conv", "convbn", "tied", "bnpool"])
def test_raw_gradient_norm_exceeds_deepspeeds_default_clip(model: str) -> None:
    """DeepSpeed's implicit gradient_clipping of 1.0 would act on every model of the matrix."""
    net = C.build_model(model)
    x, y = C.global_batch(0)
    C.loss_of(net(x), y).backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in net.parameters() if p.grad is not None))  # type: ignore[arg-type]
    assert float(norm) > 1.0, float(norm)
