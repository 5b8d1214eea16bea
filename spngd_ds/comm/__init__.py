"""Moving curvature statistics, gradients and updates between data-parallel ranks (DESIGN.md §3)."""

from spngd_ds.comm.communicator import (
    _TRIU_CACHE,
    DTYPES,
    Communicator,
    DistributedCommunicator,
    FragmentPlan,
    OwnerLayout,
    PendingToOwners,
    ShardGeometry,
    layout_bytes,
    pack_sym,
    triu_numel,
    unpack_sym,
)

__all__ = [
    "DTYPES",
    "Communicator",
    "DistributedCommunicator",
    "FragmentPlan",
    "OwnerLayout",
    "PendingToOwners",
    "ShardGeometry",
    "_TRIU_CACHE",
    "layout_bytes",
    "pack_sym",
    "triu_numel",
    "unpack_sym",
]
