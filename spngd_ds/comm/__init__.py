"""Moving curvature statistics, gradients and updates between data-parallel ranks (docs/design.md §3).

- :mod:`~spngd_ds.comm.layout`: the exchange layout, pure arithmetic (who owns what, offsets,
  equal shards, buckets, fragments, bytes sent).
- :mod:`~spngd_ds.comm.packing`: symmetric matrices as their packed upper triangle; items as one
  flat buffer and back.
- :mod:`~spngd_ds.comm.communicator`: the collectives (``torch.distributed``) over that layout.
"""

from spngd_ds.comm.communicator import (
    ALL_GATHER,
    DTYPES,
    REDUCE_SCATTER,
    Communicator,
    DistributedCommunicator,
    PendingToOwners,
    Work,
)
from spngd_ds.comm.layout import Bucket, FragmentPlan, OwnerLayout, ShardGeometry, layout_bytes
from spngd_ds.comm.packing import _TRIU_CACHE, pack_sym, triu_numel, unpack_sym

__all__ = [
    "ALL_GATHER",
    "DTYPES",
    "REDUCE_SCATTER",
    "Bucket",
    "Communicator",
    "DistributedCommunicator",
    "FragmentPlan",
    "OwnerLayout",
    "PendingToOwners",
    "ShardGeometry",
    "Work",
    "_TRIU_CACHE",
    "layout_bytes",
    "pack_sym",
    "triu_numel",
    "unpack_sym",
]
