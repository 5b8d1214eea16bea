"""Standalone (one process, no DeepSpeed) SP-NGD runs that the distributed tests compare against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import spngd_ds
from tests.support.ds_worker import build_model, global_batch


def reference_params(
    model_kind: str = "mlp",
    steps: int = 5,
    global_batch_size: int = 32,
    staleness: str = "on",
    lr: float = 0.05,
    splits: int = 1,
    skip: tuple[int, ...] = (),
    ranks: int = 1,
    stat_micro_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Parameters after ``steps`` standalone SP-NGD steps on the workers' global batches.

    ``splits`` > 1 feeds each global batch as that many forward/backward passes of equal size with
    the loss divided by ``splits`` (what DeepSpeed does over ranks x micro-batches), which matters
    only for BatchNorm models (batch statistics are per pass). Batches whose index is in ``skip``
    are not used (a step the distributed run skipped). With ``ranks`` > 1 the ``splits`` passes are
    ordered as ``ranks`` ranks run them side by side (micro-batch 0 of every rank first), so that
    ``stat_micro_batches`` = k x ranks captures what k micro-batches per rank capture.
    """
    model = build_model(model_kind)
    stal = None if staleness == "off" else {"threshold": 0.5, "max_interval": 3}
    opt = spngd_ds.SPNGD(model, lr=lr, momentum=0.9, damping=1e-2, weight_decay=1e-4, staleness=stal)
    opt.capture.grad_scale = lambda: float(splits)
    opt.capture.stat_micro_batches = stat_micro_batches
    per_rank = splits // ranks
    order = [r * per_rank + k for k in range(per_rank) for r in range(ranks)]
    for step in range(steps):
        if step in skip:
            continue
        x, y = global_batch(step, global_batch_size)
        opt.zero_grad()
        xs, ys = x.chunk(splits), y.chunk(splits)
        for i in order:
            loss = F.cross_entropy(model(xs[i]), ys[i])
            opt.observe_loss(loss)  # what engine.backward hands over on each rank (rule 13's L)
            (loss / splits).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}
