"""A parameter's real shape, also when DeepSpeed's ``zero.Init`` has partitioned it away.

Under ``deepspeed.zero.Init`` (ZeRO-3 with parameters partitioned at construction, what HF's
``from_pretrained`` does by itself) a parameter's ``.shape`` is ``(0,)`` outside the forward and
its real shape is in ``ds_shape``. Curvature blocks are sized from these, never from ``.shape``.
"""

from __future__ import annotations

import torch


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's shape in the model (``ds_shape`` under ZeRO-3, else ``shape``)."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def full_numel(param: torch.Tensor) -> int:
    """Number of elements of :func:`full_shape`."""
    return int(full_shape(param).numel())
