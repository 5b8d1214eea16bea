"""Convergence on scikit-learn's digits (8x8 images flattened to 64 features, bundled: no download).

Fixed stratified 80/20 split (random_state=0), standardised with the training mean and std;
MLP 64-128-BatchNorm1d-ReLU-10; full-batch steps (1437 samples). SP-NGD (lr 0.3, momentum 0.9,
damping 1e-2, default stale statistics) against momentum SGD (momentum 0.9) with the best lr of
[0.03, 0.1, 0.3, 1.0]; the figure is the number of steps until validation accuracy first reaches 95%.

Measured (CPU, torch 2.14; steps to 95%, cap 300):

    seed | SGD 0.03 | SGD 0.1 | SGD 0.3 | SGD 1.0 | SP-NGD
       0 |       39 |      21 |      12 |       7 |      3
       1 |       40 |      20 |      11 |       9 |      3
       2 |       47 |      22 |      11 |       9 |      3
       3 |       41 |      24 |      14 |       8 |      4
       4 |       47 |      23 |      12 |       7 |      3

(outside the grid, SGD with lr 2.0 took 5, 8, 8 steps for seeds 0-2, lr 3.0 took 8, 24, 16 and
lr 10 never got there; with 4 batches per epoch instead of full batch SP-NGD took 3-5 steps and
the best SGD 6-9.)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

TARGET = 0.95
CAP = 300
SGD_LRS = [0.03, 0.1, 0.3, 1.0]


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6

    def prep(a):  # type: ignore[no-untyped-def]
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return prep(xtr), torch.tensor(ytr), prep(xva), torch.tensor(yva)


DATA = _data()


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))


def _accuracy(model: nn.Module) -> float:
    _, _, xva, yva = DATA
    model.eval()
    with torch.no_grad():
        acc = float((model(xva).argmax(1) == yva).float().mean())
    model.train()
    return acc


def _steps_to_target(
    seed: int, make_opt: Callable[[nn.Module], torch.optim.Optimizer], cap: int = CAP, extra: int = 0
) -> tuple[int | None, float, nn.Module]:
    """Full-batch steps until the validation accuracy first reaches TARGET, then ``extra`` more.

    Steps is None if TARGET is not reached within ``cap``; returns (steps, final accuracy, model).
    """
    xtr, ytr, _, _ = DATA
    model = _model(seed)
    opt = make_opt(model)
    reached: int | None = None
    for step in range(1, cap + 1):
        F.cross_entropy(model(xtr), ytr).backward()
        opt.step()
        opt.zero_grad()
        acc = _accuracy(model)
        if reached is None and acc >= TARGET:
            reached = step
        if reached is not None and step >= reached + extra:
            break
    return reached, _accuracy(model), model


@pytest.mark.parametrize("seed", [0, 1])
def test_spngd_reaches_95_percent_before_tuned_sgd(seed: int) -> None:
    ngd_steps, final_acc, model = _steps_to_target(
        seed, lambda m: spngd_ds.SPNGD(m, lr=0.3, momentum=0.9, damping=1e-2), extra=20
    )
    sgd_steps = {
        lr: _steps_to_target(seed, lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9))[0]  # type: ignore[misc]
        for lr in SGD_LRS
    }
    print(f"seed {seed}: steps to {TARGET:.0%}: SP-NGD {ngd_steps}, SGD {sgd_steps}")
    assert ngd_steps is not None, "SP-NGD never reached 95% validation accuracy"
    # it stays there: 20 steps later the accuracy is still >= 95%, parameters finite
    assert final_acc >= TARGET, final_acc
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    best_sgd = min(s for s in sgd_steps.values() if s is not None)
    assert ngd_steps < best_sgd, (ngd_steps, sgd_steps)


def test_spngd_curvature_is_what_makes_it_fast() -> None:
    """Guard: the same optimizer with curvature disabled is no faster than SGD at lr 0.3.

    Every layer is forced to the plain gradient by an enormous damping, with lr rescaled to match.
    """
    steps, _, _ = _steps_to_target(0, lambda m: spngd_ds.SPNGD(m, lr=0.3, momentum=0.9, damping=1e-2))
    assert steps is not None and steps <= 5
    # with λ huge, Â⁻¹ ≈ I/(π√λ) and Ĝ⁻¹ ≈ π I/√λ, so P(∇) ≈ ∇/λ (BN: ∇/(64λ)): lr·λ is plain SGD's lr
    lam = 1e6
    plain, _, _ = _steps_to_target(
        0, lambda m: spngd_ds.SPNGD(m, lr=0.3 * lam, momentum=0.9, damping=lam, bn_damping_scale=1.0), cap=60
    )
    sgd, _, _ = _steps_to_target(0, lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9), cap=60)
    assert plain is not None and sgd is not None
    assert abs(plain - sgd) <= 2, (plain, sgd)
    assert steps < plain
