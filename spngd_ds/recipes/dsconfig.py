"""Reading a DeepSpeed JSON config for the training script.

Two conveniences on top of DeepSpeed's own format:

- ``"auto"`` in the scheduler's ``steps_per_epoch`` and ``total_num_steps`` is replaced by the
  numbers the script computes from the data loader (:func:`fill_auto`). DeepSpeed itself knows no
  ``"auto"``, so such a config runs through ``launch/train.py``, not through a bare
  ``deepspeed.initialize``.
- Half-precision models with BatchNorm get ``"data_types": {"buffer_dtype": ...}`` when the config
  does not say (:func:`ensure_buffer_dtype`): DeepSpeed 0.19.8 casts parameters but keeps buffers
  fp32, and BatchNorm then fails on the mix ("expected scalar type BFloat16 but found Float").
- An optional top-level ``"spngd_recipe"`` block holds training-job settings (epochs, mixup, ...)
  whose names are ``launch/train.py`` flags (:func:`pop_recipe`). DeepSpeed 0.19.8 ignores unknown
  top-level keys without a word, but the script removes the block before initialisation anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from spngd_ds.deepspeed.integration import load_ds_config  # one loader for the library and the job

__all__ = [
    "AUTO",
    "RECIPE_KEY",
    "BatchLayout",
    "batch_layout",
    "ensure_buffer_dtype",
    "fill_auto",
    "load_ds_config",
    "pop_recipe",
]

AUTO = "auto"
RECIPE_KEY = "spngd_recipe"
_AUTO_SCHEDULER_KEYS = ("steps_per_epoch", "total_num_steps")


def pop_recipe(config: dict[str, Any], allowed: Iterable[str]) -> dict[str, Any]:
    """Remove and return the ``"spngd_recipe"`` block (``{}`` when absent).

    Raises:
        ValueError: the block is not an object, or has a key outside ``allowed`` (named, with the
            allowed keys).
    """
    recipe = config.pop(RECIPE_KEY, None)
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ValueError(f'"{RECIPE_KEY}" must be a JSON object, got {type(recipe).__name__}')
    allowed_set = set(allowed)
    unknown = sorted(set(recipe) - allowed_set)
    if unknown:
        raise ValueError(
            f'"{RECIPE_KEY}" has unknown key(s) {", ".join(unknown)}; allowed: {", ".join(sorted(allowed_set))}'
        )
    return dict(recipe)


class BatchLayout(NamedTuple):
    """How DeepSpeed splits the global batch: ``global_batch = micro * accumulation * world``."""

    micro_batch: int
    accumulation: int
    global_batch: int


def batch_layout(config: Mapping[str, Any], world_size: int) -> BatchLayout:
    """Resolve the three batch keys the way DeepSpeed does, for ``world_size`` data-parallel ranks.

    Any two of ``train_batch_size``, ``train_micro_batch_size_per_gpu`` and
    ``gradient_accumulation_steps`` determine the third; a lone ``train_batch_size`` means no
    accumulation; a lone micro batch means accumulation 1.

    Raises:
        ValueError: none given, a value is not a positive integer, or they are inconsistent
            (e.g. a config written for 128 GPUs launched on 2).
    """
    tbs = config.get("train_batch_size")
    mbs = config.get("train_micro_batch_size_per_gpu")
    gas = config.get("gradient_accumulation_steps")
    for key, value in (
        ("train_batch_size", tbs),
        ("train_micro_batch_size_per_gpu", mbs),
        ("gradient_accumulation_steps", gas),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if tbs is None and mbs is None:
        raise ValueError("the DeepSpeed config needs train_batch_size or train_micro_batch_size_per_gpu")
    if tbs is not None and mbs is not None and gas is not None:
        pass
    elif tbs is not None and mbs is not None:
        gas = tbs // (mbs * world_size)
    elif tbs is not None and gas is not None:
        mbs = tbs // (gas * world_size)
    elif mbs is not None:
        gas = gas or 1
        tbs = mbs * gas * world_size
    else:
        assert tbs is not None
        gas = 1
        mbs = tbs // world_size
    assert tbs is not None and mbs is not None and gas is not None
    if mbs < 1 or gas < 1 or tbs != mbs * gas * world_size:
        raise ValueError(
            f"batch keys do not fit {world_size} rank(s): train_batch_size={config.get('train_batch_size')}, "
            f"train_micro_batch_size_per_gpu={config.get('train_micro_batch_size_per_gpu')}, "
            f"gradient_accumulation_steps={config.get('gradient_accumulation_steps')}; DeepSpeed needs "
            "train_batch_size = micro batch x accumulation steps x number of ranks"
        )
    return BatchLayout(mbs, gas, tbs)


def fill_auto(config: dict[str, Any], steps_per_epoch: int, total_steps: int) -> list[str]:
    """Replace ``"auto"`` in the scheduler parameters, in place.

    ``steps_per_epoch`` (optimizer steps in one epoch) and ``total_num_steps`` (optimizer steps in
    the whole run) are the keys that may be ``"auto"``.

    Returns:
        The dotted names of the keys filled, e.g. ``["scheduler.params.steps_per_epoch"]``.

    Raises:
        ValueError: ``"auto"`` anywhere else in the optimizer or scheduler parameters.
    """
    filled: list[str] = []
    values = {"steps_per_epoch": steps_per_epoch, "total_num_steps": total_steps}
    for block in ("optimizer", "scheduler"):
        params = (config.get(block) or {}).get("params") or {}
        for key, value in list(params.items()):
            if value != AUTO:
                continue
            if block == "scheduler" and key in _AUTO_SCHEDULER_KEYS:
                params[key] = values[key]
                filled.append(f"{block}.params.{key}")
            else:
                raise ValueError(
                    f'{block}.params.{key} is "auto", which only scheduler.params.'
                    f"{' and scheduler.params.'.join(_AUTO_SCHEDULER_KEYS)} may be"
                )
    return filled


def ensure_buffer_dtype(config: dict[str, Any], has_batchnorm: bool) -> str | None:
    """Make DeepSpeed cast BatchNorm buffers along with the parameters under bf16/fp16, in place.

    DeepSpeed 0.19.8 casts only parameters to the half dtype and keeps buffers (BatchNorm's
    ``running_mean``/``running_var``) in fp32 unless ``data_types.buffer_dtype`` is set; BatchNorm
    then refuses bf16 weights with fp32 running statistics. When half precision is on, the model
    has BatchNorm and the config sets no ``buffer_dtype``, this sets it to the half dtype.

    Returns:
        The dtype name set (``"bf16"`` or ``"fp16"``), or ``None`` when nothing was changed.
    """
    if not has_batchnorm:
        return None
    if (config.get("bf16") or {}).get("enabled"):
        half = "bf16"
    elif (config.get("fp16") or {}).get("enabled"):
        half = "fp16"
    else:
        return None
    data_types = config.setdefault("data_types", {})
    if not isinstance(data_types, dict) or data_types.get("buffer_dtype") is not None:
        return None
    data_types["buffer_dtype"] = half
    return half
