"""Count what a GPU would pay for a piece of host code, on any device.

Counting what a GPU would pay for a piece of host code, on any device: aten ops dispatched (each one
kernel launch or more on an accelerator) and host-device synchronisations.

Counted outside the optimizer's own bookkeeping, by a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
that sees every aten op below autograd, plus wrappers for what dispatches nothing:

- **ops**: every aten op the mode sees (views included; a ``torch._foreach_*`` op counts once, as
  on a GPU where it is one or a few fused launches).
- **syncs**: ops whose result the host must wait for: ``aten._local_scalar_dense`` (``.item()``,
  ``float()``, ``int()``, ``bool()`` of a tensor), ops with a data-dependent output shape
  (:data:`SYNC_OPS`: ``nonzero``, ``masked_select``, boolean indexing, ``unique``, ...),
  ``Tensor.tolist()`` (it dispatches nothing), and ``torch.tensor(list)`` uploads: each one a
  copy from pageable host memory, a stream synchronisation on an accelerator. An upload to the
  CPU is counted too when ``cpu_uploads`` is true (the default), so that a CPU run catches the
  uploads a GPU run would pay for.

Imported by ``bench/step_counts.py`` and ``tests/optimizer/test_step_syncs.py``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops (overload packet names) whose host result or output shape depends on device data
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
        "equal",
        "repeat_interleave",
        "_assert_async",
    }
)


@dataclass
class DispatchCounts:
    """What one counted region dispatched.

    ``ops`` aten ops, ``syncs`` host synchronisations, and per-name tallies of both (``op_names``,
    ``sync_names``).
    """

    ops: int = 0
    syncs: int = 0
    op_names: Counter[str] = field(default_factory=Counter)
    sync_names: Counter[str] = field(default_factory=Counter)

    def sync(self, name: str) -> None:
        self.syncs += 1
        self.sync_names[name] += 1


class _Mode(TorchDispatchMode):
    def __init__(self, counts: DispatchCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        self.counts.ops += 1
        self.counts.op_names[name] += 1
        if name in SYNC_OPS and not (name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None):
            self.counts.sync(f"aten.{name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_dispatch(cpu_uploads: bool = True) -> Iterator[DispatchCounts]:
    """Count the aten ops and host synchronisations of the ``with`` body (module docstring)."""
    counts = DispatchCounts()
    tolist, tensor_fn = torch.Tensor.tolist, torch.tensor

    def counted_tolist(self: torch.Tensor) -> Any:
        counts.sync("Tensor.tolist")
        return tolist(self)

    def counted_tensor(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.get("device")
        target = torch.device(device) if device is not None else torch.get_default_device()
        if target.type != "cpu" or cpu_uploads:
            counts.sync(f"torch.tensor(list) -> {target.type}")
        return tensor_fn(data, *args, **kwargs)

    torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign,assignment]
    torch.tensor = counted_tensor
    try:
        with _Mode(counts):
            yield counts
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        torch.tensor = tensor_fn
