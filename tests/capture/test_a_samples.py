"""``a_samples``: A from the first k samples of each capturing micro-batch.

A of a Linear/Conv2d from the first k samples of each capturing micro-batch per rank; G and
BatchNorm's F from all of them. Float64. On one process: the captured sums equal those of the first
k samples, unbatched inputs and micro-batches of at most k samples are untouched. On 3 forked gloo
ranks (a BatchNorm CNN of two blocks, so one rank owns nothing): the owners' A after a step equals
one process's A over the concatenated first k samples of every rank, G and F equal one process's
over all samples, and a run with a changing learning rate agrees across ranks and differs from the
uncapped one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spngd_ds
from tests.support.distributed import fork_ranks

WORLD, PER_RANK, K, STEPS = 3, 6, 2, 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 4),
    ).double()


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)  # two blocks (conv, BatchNorm) for three ranks: one rank owns nothing
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).double()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return (
        torch.randn(WORLD * PER_RANK, 2, 5, 5, generator=g, dtype=torch.float64) * 2.0,
        torch.randint(0, 4, (WORLD * PER_RANK,), generator=g),
    )


def _sums(opt: spngd_ds.SPNGD) -> dict[str, tuple[torch.Tensor, float]]:
    out = {}
    for b in opt.blocks.values():
        for s in b.stats.values():
            total, count = s.take_local()
            assert total is not None
            out[f"{b.name}:{s.name}"] = (total.clone(), count)
    return out


def _capture(a_samples: int | None, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, float]]:
    model = _model()
    opt = spngd_ds.SPNGD(model, staleness=None, a_samples=a_samples)
    F.cross_entropy(model(x), y).backward()
    return _sums(opt)


def test_a_from_the_first_k_samples_and_g_f_from_all() -> None:
    x, y = _data(0)
    capped, full = _capture(K, x, y), _capture(None, x, y)
    for key, (total, count) in capped.items():
        if key.endswith(":A"):  # checked below
            continue
        ref, ref_count = full[key]
        assert count == ref_count
        torch.testing.assert_close(total, ref, rtol=1e-13, atol=1e-13)
    # the conv's input is x itself: its A is exactly the uncapped A of a run on the first K samples
    conv_ref, conv_count = _capture(None, x[:K], y[:K])["0:A"]
    assert capped["0:A"][1] == conv_count == K
    torch.testing.assert_close(capped["0:A"][0], conv_ref, rtol=1e-13, atol=1e-13)
    assert capped["5:A"][1] == K and full["5:A"][1] == len(x)
    assert not torch.allclose(capped["0:A"][0], full["0:A"][0])


def test_small_and_unbatched_inputs_are_untouched() -> None:
    x, y = _data(1)
    small = x[:K]
    assert torch.equal(_capture(K, small, y[:K])["0:A"][0], _capture(None, small, y[:K])["0:A"][0])
    lin = nn.Linear(3, 2).double()
    opt = spngd_ds.SPNGD(lin, staleness=None, a_samples=1)
    lin(torch.randn(3, dtype=torch.float64)).sum().backward()  # one unbatched sample
    total, count = opt.blocks[next(iter(opt.blocks))].stats["A"].take_local()
    assert count == 1 and total is not None and total.shape == (4, 4)


def test_bad_a_samples_is_refused() -> None:
    with pytest.raises(ValueError, match="a_samples"):
        spngd_ds.SPNGD(_model(), a_samples=0)


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from spngd_ds.comm import DistributedCommunicator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    res = {}
    for a_samples in (K, None):
        model = _bn_cnn()
        opt = spngd_ds.SPNGD(
            model, lr=0.2, damping=1e-2, staleness=None, a_samples=a_samples, communicator=DistributedCommunicator()
        )
        values = {}
        for step in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = 0.2 / (1 + step)
            x, y = _data(step)
            lo = rank * PER_RANK
            F.cross_entropy(model(x[lo : lo + PER_RANK]), y[lo : lo + PER_RANK]).backward()
            opt.step()
            opt.zero_grad()
            if step == 0:
                for b in opt.owned():
                    for name in b.stats:
                        values[f"{b.name}:{name}"] = getattr(b, name).clone()
        res[a_samples] = ({n: p.detach().clone() for n, p in model.named_parameters()}, values)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.dist
def test_three_ranks_a_from_each_ranks_first_k_samples(tmp_path: Path) -> None:
    results = fork_ranks(_rank, WORLD, tmp_path)
    assert sorted(len(r[K][1]) > 0 for r in results) == [False, True, True]  # one rank owns nothing
    owned = {k: v for r in results for k, v in r[K][1].items()}
    assert set(owned) == {"0:A", "0:G", "1:F"}
    # step 0's statistics, from one process at the same (initial) weights: the conv's A over the first
    # K samples of every rank; G and F (and every uncapped statistic) over all samples
    x, y = _data(0)
    first_k = torch.cat([x[r * PER_RANK : r * PER_RANK + K] for r in range(WORLD)])
    one = _bn_cnn()
    opt_k = spngd_ds.SPNGD(one, staleness=None)
    F.cross_entropy(one(first_k), y[: len(first_k)]).backward()
    opt_k.step()
    torch.testing.assert_close(owned["0:A"], opt_k.blocks["0"].A, rtol=1e-12, atol=1e-12)
    full = {k: v for r in results for k, v in r[None][1].items()}
    for key in ("0:G", "1:F"):
        torch.testing.assert_close(owned[key], full[key], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(owned["0:A"], full["0:A"])
    first = results[0][K][0]
    for r in results:
        assert all(torch.equal(first[n], r[K][0][n]) for n in first)  # ranks agree
        assert all(torch.isfinite(v).all() for v in r[K][0].values())
    assert any(not torch.allclose(first[n], results[0][None][0][n]) for n in first)  # the option does something
