"""MC Fisher (contract rule 1, ``fisher="mc"``) against the exact Fisher, statistically.

Setup: tiny float64 classifiers with n = 3-4 samples and C = 3-4 classes, so that every joint
label vector ŷ ∈ [C]^n can be enumerated. For each ŷ the dense reference gives the statistics
G(ŷ), F(ŷ) the contract prescribes when the loss uses the labels ŷ; with weights
Π_j p(ŷ_j | x_j) this yields the exact expectation E[G] (the exact Fisher factor) and the exact
per-entry variance Var[G] of the one-sample estimator.

The optimizer is stepped K times with ``lr=0`` (parameters frozen, ``staleness=None`` so G/F are
recomputed every step); the K reported G, F are averaged.

Tolerance (per entry): |mean_K − E[G]| ≤ 5 · sqrt(Var[G] / K) + 1e-12 · max|E[G]|. The mean of K
independent draws has standard error sqrt(Var/K) (exact variance, not estimated), so a correct
sampler fails an entry with probability ≈ 6e-7 (two-sided 5σ, CLT; K ≥ 2000 draws of a bounded
variable); over ≤ 60 entries the false-failure rate is < 4e-5, and the seeds are fixed anyway.
``test_selfcheck_setup_discriminates`` proves the test would fail for the wrong labels: the
empirical Fisher (true labels) and the argmax-label statistics are ≥ 20 standard errors away from
E[G] in some entry, four times the pass threshold.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

from tests.support import reference as R

Z_PASS = 5.0
Z_DISCRIMINATE = 20.0


@dataclass
class Candidate:
    """Statistics of the contract for one joint label vector ŷ."""

    labels: tuple[int, ...]
    weight: float
    stats: dict[str, Tensor]
    """``"G:<layer>"`` and ``"F:<layer>"`` → tensor."""


@dataclass
class McSetup:
    """A tiny classifier, its batch, and the exact distribution of the MC statistics."""

    name: str
    model: nn.Module
    x: Tensor
    labels: Tensor
    probs: Tensor
    K: int
    candidates: list[Candidate]
    mean: dict[str, Tensor] = field(default_factory=dict)
    var: dict[str, Tensor] = field(default_factory=dict)

    def se(self, key: str) -> Tensor:
        """Exact standard error of the K-sample average, per entry."""
        return torch.sqrt(self.var[key].clamp_min(0.0) / self.K)


def _stats_of(ref: R.Reference) -> dict[str, Tensor]:
    out = {f"G:{k}": ks.G for k, ks in ref.kron.items()}
    out.update({f"F:{k}": bs.F for k, bs in ref.bn.items()})
    return out


def build_setup(name: str, build: Callable[[], nn.Module], n: int, d_in: int, K: int, seed: int) -> McSetup:
    """Model, batch, and the exact mean and variance of every statistic under ŷ ~ p."""
    torch.manual_seed(seed)
    model = build().double().train()
    x = torch.randn(n, d_in, dtype=torch.float64)
    probs = R.softmax_probs(model, x)
    n_cls = probs.shape[1]
    labels = torch.randint(0, n_cls, (n,))
    cands = []
    for lab in itertools.product(range(n_cls), repeat=n):
        y = torch.tensor(lab)
        w = float(torch.prod(probs[torch.arange(n), y]))
        cands.append(Candidate(lab, w, _stats_of(R.compute_reference(model, x, y, R.ce_per_sample))))
    setup = McSetup(name, model, x, labels, probs, K, cands)
    for key in cands[0].stats:
        m1 = sum(c.weight * c.stats[key] for c in cands)
        m2 = sum(c.weight * c.stats[key] ** 2 for c in cands)
        assert isinstance(m1, Tensor) and isinstance(m2, Tensor)
        setup.mean[key] = m1
        setup.var[key] = m2 - m1**2
    return setup


def stats_for_labels(setup: McSetup, y: Tensor) -> dict[str, Tensor]:
    """Contract statistics when the loss uses the labels ``y`` (deterministic)."""
    return _stats_of(R.compute_reference(setup.model, setup.x, y, R.ce_per_sample))


def max_z(setup: McSetup, key: str, value: Tensor) -> float:
    """Largest |value − E| / SE over the entries of statistic ``key``."""
    return float(((value - setup.mean[key]).abs() / setup.se(key).clamp_min(1e-300)).max())


def max_abs_dist(a: Tensor, b: Tensor, chunk: int = 256) -> Tensor:
    """Pairwise max-abs distance between the rows of ``a`` (P, D) and ``b`` (Q, D), exactly.

    (``torch.cdist``'s default matmul form |a|² + |b|² − 2ab loses ~8 digits, and its exact mode
    is very slow.)
    """
    return torch.cat([(a[i : i + chunk, None, :] - b[None]).abs().amax(dim=2) for i in range(0, a.shape[0], chunk)])


def _last_layer_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4))


def _hidden_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))


SETUP_SPECS: dict[str, tuple[Callable[[], nn.Module], int, int, int, int]] = {
    # name: (build, n, d_in, K, seed)
    "last_layer": (_last_layer_model, 3, 3, 4000, 0),
    "hidden": (_hidden_model, 3, 3, 3000, 1),
    "bn": (_bn_model, 4, 3, 3000, 2),
}


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Thousands of tiny steps: intra-op threads only spin (4x slower on a busy 2-core box)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture(scope="module", params=list(SETUP_SPECS))
def setup(request: pytest.FixtureRequest) -> McSetup:
    build, n, d_in, K, seed = SETUP_SPECS[request.param]
    return build_setup(request.param, build, n, d_in, K, seed)


# --------------------------------------------------------------------------------------------
# Self-checks of the exact side (no spngd_ds)
# --------------------------------------------------------------------------------------------


def test_selfcheck_exact_fisher_forms(setup: McSetup) -> None:
    """Joint enumeration equals the closed form and the per-class enumeration.

    Joint enumeration == closed form (diag p − p pᵀ) for the logits layer, and == per-class
    enumeration with one backward per (sample, class) for the hidden layers without BN.
    """
    assert abs(sum(c.weight for c in setup.candidates) - 1.0) < 1e-12
    logits_layer = [k for k in setup.mean if k.startswith("G:")][-1]
    with torch.no_grad():
        logits, _ = R.reference_forward(setup.model, setup.x)
    torch.testing.assert_close(setup.mean[logits_layer], R.exact_last_layer_fisher(logits), rtol=1e-12, atol=1e-14)
    if setup.name == "hidden":
        per_class = R.exact_fisher_per_class(setup.model, setup.x, "0")
        torch.testing.assert_close(setup.mean["G:0"], per_class, rtol=1e-12, atol=1e-14)
    g_all, f_all = R.exact_fisher_by_label_enumeration(setup.model, setup.x, setup.probs)
    for k, v in g_all.items():
        torch.testing.assert_close(setup.mean[f"G:{k}"], v, rtol=1e-12, atol=1e-14)
    for k, v in f_all.items():
        torch.testing.assert_close(setup.mean[f"F:{k}"], v, rtol=1e-12, atol=1e-14)


def test_selfcheck_setup_discriminates(setup: McSetup) -> None:
    """True labels and argmax labels are far (≥ 20 SE) from E[G] in every statistic tested.

    True labels (empirical Fisher) and argmax labels are far (≥ 20 SE) from E[G] in every statistic
    tested, so an implementation using them fails the 5-SE test.
    """
    emp = stats_for_labels(setup, setup.labels)
    amax = stats_for_labels(setup, setup.probs.argmax(dim=1))
    for key in setup.mean:
        assert max_z(setup, key, emp[key]) > Z_DISCRIMINATE, f"{key}: true labels not discriminated"
        assert max_z(setup, key, amax[key]) > Z_DISCRIMINATE, f"{key}: argmax not discriminated"


def test_selfcheck_candidates_distinct(setup: McSetup) -> None:
    """Every label vector gives distinct statistics, so each MC step's ŷ can be identified."""
    vecs = torch.stack([torch.cat([c.stats[k].flatten() for k in sorted(c.stats)]) for c in setup.candidates])
    d = max_abs_dist(vecs, vecs) + torch.eye(len(vecs), dtype=vecs.dtype)
    assert float(d.min()) > 1e-6 * float(vecs.abs().max())


# --------------------------------------------------------------------------------------------
# spngd_ds
# --------------------------------------------------------------------------------------------


@dataclass
class McRun:
    """K reported statistics per key, stacked: (K, *shape)."""

    draws: dict[str, Tensor]


@pytest.fixture(scope="module")
def mc_run(setup: McSetup) -> McRun:
    """K optimizer steps at lr=0 under fisher="mc"; records every block's G and F each step."""
    torch.manual_seed(1234)
    model = copy.deepcopy(setup.model)  # the pristine model never carries an optimizer's hooks
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = R.make_spngd(model, lr=0.0, damping=1e-3, fisher="mc")
    keys = list(setup.mean)
    draws: dict[str, list[Tensor]] = {k: [] for k in keys}
    for _ in range(setup.K):
        opt.zero_grad()
        loss = R.ce_per_sample(model(setup.x), setup.labels).mean()
        loss.backward()
        opt.step()
        blocks = opt.blocks
        for k in keys:
            kind, layer = k.split(":")
            draws[k].append(getattr(blocks[layer], kind).detach().to(torch.float64).clone())
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), before[k]), f"{k} moved with lr=0"
    return McRun({k: torch.stack(v) for k, v in draws.items()})


@pytest.mark.slow
def test_mc_average_approaches_exact_fisher(setup: McSetup, mc_run: McRun) -> None:
    """Average of K MC statistics within 5 exact standard errors of E[G] (E[F]) in every entry.

    Covers the logits layer G (closed form (1/n) Σ diag p − p pᵀ), the hidden layer's G (exact
    E_y[g gᵀ] by enumeration), and under BN both F and the pre-BN layer's G (samples coupled).
    """
    for key, exact in setup.mean.items():
        avg = mc_run.draws[key].mean(dim=0)
        tol = Z_PASS * setup.se(key) + 1e-12 * float(exact.abs().max())
        bad = (avg - exact).abs() > tol
        assert not bool(bad.any()), (
            f"{setup.name} {key}: max z = {max_z(setup, key, avg):.1f} (> {Z_PASS}); avg=\n{avg}\nexact=\n{exact}"
        )


@pytest.mark.slow
def test_mc_each_step_is_one_joint_label_draw(setup: McSetup, mc_run: McRun) -> None:
    """One MC label vector ŷ per step, shared by all layers, each ŷ_i distributed as p(·|x_i).

    Each step's statistics (all layers together) equal those of one label vector ŷ, so one label per
    input is shared by all layers; and each ŷ_i is distributed as p(·|x_i): per-(sample, class)
    counts within 5σ of the binomial K·p.
    """
    keys = sorted(setup.mean)
    cand = torch.stack([torch.cat([c.stats[k].flatten() for k in keys]) for c in setup.candidates])
    got = torch.cat([mc_run.draws[k].reshape(setup.K, -1) for k in keys], dim=1)
    dist = max_abs_dist(got, cand)
    best = dist.argmin(dim=1)
    scale = float(cand.abs().max())
    worst = float(dist[torch.arange(setup.K), best].max())
    assert worst <= 1e-9 * scale, f"a step's statistics match no single label vector (dist {worst:.2e})"
    n, c = setup.probs.shape
    counts = torch.zeros(n, c, dtype=torch.float64)
    for b in best.tolist():
        for i, y in enumerate(setup.candidates[b].labels):
            counts[i, y] += 1
    p = setup.probs
    z = (counts - setup.K * p) / torch.sqrt(setup.K * p * (1 - p))
    assert float(z.abs().max()) < Z_PASS, f"label frequencies off: z=\n{z}\ncounts=\n{counts}\np=\n{p}"


def test_mc_update_uses_true_loss_gradient(setup: McSetup) -> None:
    """Under MC the parameter gradients and A are the true-label ones; G/F are the MC ones.

    The extra backward adds nothing to .grad, A is unchanged, and the update is −lr P(∇_true) with
    the step's own MC G/F.
    """
    lr, damping, bn_scale = 0.5, 1e-3, 4.0
    model = copy.deepcopy(setup.model)
    saved = {k: p.detach().clone() for k, p in model.named_parameters()}
    ref = R.compute_reference(model, setup.x, setup.labels, R.ce_per_sample)
    torch.manual_seed(99)
    opt = R.make_spngd(model, lr=lr, damping=damping, fisher="mc", bn_damping_scale=bn_scale)
    res = R.spngd_step(opt, model, setup.x, setup.labels, R.ce_per_sample)
    for k, g in res.grads.items():
        torch.testing.assert_close(g, ref.plain_grads[k], rtol=1e-11, atol=1e-14)
    after = {k: p.detach().clone() for k, p in model.named_parameters()}
    blocks = opt.blocks
    modules = dict(model.named_modules())
    for name, ks in ref.kron.items():
        b = blocks[name]
        torch.testing.assert_close(b.A.to(torch.float64), ks.A, rtol=1e-10, atol=1e-14)
        pmat = R.precondition_kron(ks.A, b.G.to(torch.float64), ks.grad_mat, damping)
        for local, t in R.split_kron_update(modules[name], pmat).items():
            k = f"{name}.{local}"
            torch.testing.assert_close(after[k] - saved[k], -lr * t, rtol=1e-10, atol=1e-12 * float(t.abs().max()))
    for name, bs in ref.bn.items():
        pv = R.precondition_bn(blocks[name].F.to(torch.float64), bs.grad, bn_scale * damping)
        for j, local in enumerate(("weight", "bias")):
            k = f"{name}.{local}"
            torch.testing.assert_close(after[k] - saved[k], -lr * pv[:, j], rtol=1e-10, atol=1e-14)
