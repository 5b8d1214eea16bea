"""BatchNorm running statistics over data-parallel ranks.

Each rank normalises its own batches, so its BatchNorm running mean and variance drift apart from
the other ranks'; DeepSpeed saves rank 0's and every rank evaluates with its own. Averaging them
over ranks before evaluation and before a save (as timm's ``distribute_bn`` does) makes every rank
evaluate the same model and makes a resumed run evaluate like the uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from spngd_ds.comm import Communicator, DistributedCommunicator
from spngd_ds.reductions import all_reduce_sum


@torch.no_grad()
def average_batchnorm_buffers(model: nn.Module, comm: Communicator | None = None) -> int:
    """Average every BatchNorm's running statistics over ranks.

    Replace every BatchNorm's ``running_mean`` and ``running_var`` by their mean over ranks (one
    all-reduce on every rank, in place; ``comm`` defaults to torch.distributed's default group on
    the buffers' device). Returns the number of BatchNorm layers averaged.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]
    if comm is None:
        if not layers or not dist.is_initialized() or dist.get_world_size() == 1:
            return len(layers)
        assert isinstance(layers[0].running_mean, torch.Tensor)
        comm = DistributedCommunicator(device=layers[0].running_mean.device)
    if comm.world_size == 1 or not layers:
        return len(layers)
    buffers: list[torch.Tensor] = []
    for m in layers:
        assert isinstance(m.running_mean, torch.Tensor) and isinstance(m.running_var, torch.Tensor)
        buffers += [m.running_mean, m.running_var]
    flat = torch.cat([b.detach().reshape(-1).to(comm.device, torch.float64) for b in buffers])
    all_reduce_sum(comm, flat).div_(comm.world_size)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
    return len(layers)
