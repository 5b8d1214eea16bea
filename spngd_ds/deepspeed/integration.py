"""``spngd_ds.initialize``: ``deepspeed.initialize`` that understands ``"type": "SPNGD"``.

DeepSpeed has no registry for outside optimizers, so the SP-NGD block is taken out of the config,
validated (before any collective, so a bad config fails on every rank and nothing hangs), built
here and handed to DeepSpeed as a client optimizer, with the config keys that needs. Any other
optimizer type passes straight through, so one script runs first-order baselines too.

Paths (docs/design.md §3):
- ZeRO stage 0 (fp32, or bf16 with bf16 gradient accumulation): the *fast path*. The engine's
  all-reduce is switched off; SP-NGD reduce-scatters gradients and statistics to owners, owners
  update their layers and the parameters are all-gathered.
- ZeRO 1, 2, 3 (fp32, bf16, fp16; optimizer offload): the *compatible path*, see spngd_ds.deepspeed.engine.
Refused, with the combination that works instead: fp16 at stage 0 (broken inside DeepSpeed
0.19.8) and bf16 with fp32 gradient accumulation at stage 0 (DeepSpeed itself does not support it).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from spngd_ds.config import SPNGDConfig, validate_spngd_params
from spngd_ds.distenv import ensure_single_process_env

if TYPE_CHECKING:
    from spngd_ds.optimizer import SPNGD

logger = logging.getLogger("spngd_ds")

SPNGD_TYPE = "spngd"
SCHEDULER_TYPE = "spngdpolydecay"


def load_ds_config(config: str | os.PathLike[str] | Mapping[str, Any] | None, args: object = None) -> dict[str, Any]:
    """Deep-copy a DeepSpeed config given as a JSON file path, a mapping, or ``args.deepspeed_config``.

    Args:
        config: The config, or None to read it from ``args``.
        args: Command-line arguments (``argparse.Namespace``) with ``deepspeed_config``, or None.

    Returns:
        The config as a new dict (JSON values).

    Raises:
        ValueError: no config, a missing file, invalid JSON or not a JSON object (naming the path).
    """
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        raise ValueError("spngd_ds.initialize: no DeepSpeed config given (config=... or --deepspeed_config)")
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise ValueError(f"DeepSpeed config {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"DeepSpeed config {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"DeepSpeed config {path!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _enabled(cfg: dict[str, Any], key: str) -> bool:
    block = cfg.get(key) or {}
    return bool(block.get("enabled", False)) if isinstance(block, dict) else False


def zero_stage(cfg: dict[str, Any]) -> int:
    """ZeRO stage of a DeepSpeed config (0 when absent); a clear error for anything but 0-3."""
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage = {stage!r} is invalid; allowed: 0, 1, 2, 3")
    return stage


def precision(cfg: dict[str, Any]) -> str:
    """The config's precision: "fp16", "bf16" or "fp32"."""
    if _enabled(cfg, "fp16"):
        return "fp16"
    if _enabled(cfg, "bf16") or _enabled(cfg, "bfloat16"):
        return "bf16"
    return "fp32"


def check_combination(cfg: dict[str, Any], params: SPNGDConfig | None = None) -> None:
    """Refuse what SP-NGD cannot do right inside DeepSpeed, naming the key and what works instead."""
    stage, prec = zero_stage(cfg), precision(cfg)
    accum = (cfg.get("data_types") or {}).get("grad_accum_dtype")
    if stage == 0 and prec == "fp16":
        raise ValueError(
            "SPNGD: fp16 with zero_optimization.stage 0 is refused (DeepSpeed 0.19.8 does not scale the loss "
            "there but unscales in the step); use fp16 with stage 1, 2 or 3, or bf16 with stage 0"
        )
    if stage == 0 and prec == "bf16" and accum in ("fp32", "float32", "float"):
        raise ValueError(
            "SPNGD: bf16 with data_types.grad_accum_dtype 'fp32' needs zero_optimization.stage >= 1 "
            "(DeepSpeed does not support it at stage 0); drop grad_accum_dtype or use stage 1, 2 or 3"
        )
    if _enabled(cfg, "torch_autocast"):
        raise ValueError(
            "SPNGD: torch_autocast.enabled = true is refused (its GradScaler scales the output gradients "
            'SP-NGD captures and may skip a step on one rank only); use "bf16": {"enabled": true} or '
            '"fp16": {"enabled": true} with zero_optimization.stage 1-3 instead'
        )
    if cfg.get("managed_gradient_accumulation", True) is not True:
        raise ValueError(
            "SPNGD: managed_gradient_accumulation = false is refused (DeepSpeed would step SP-NGD without the "
            "boundary SP-NGD preconditions at); remove the key (default true)"
        )
    if params is not None and params.fisher == "mc" and stage == 3:
        raise ValueError(
            "SPNGD: optimizer.params.fisher = 'mc' is refused with zero_optimization.stage 3 (its extra "
            "backward pass would run ZeRO-3's parameter hooks); use fisher 'empirical' or stage 0, 1 or 2"
        )
    clip = cfg.get("gradient_clipping")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or not clip >= 0):
        raise ValueError(f"gradient_clipping = {clip!r} is invalid; allowed: a number >= 0 (0: no clipping)")
    if params is not None and params.clip_norm is not None and clip not in (None, 0, params.clip_norm):
        raise ValueError(
            f"SPNGD: gradient_clipping = {clip!r} and optimizer.params.clip_norm = {params.clip_norm!r} disagree; "
            "set one of them"
        )


def clip_norm_from_config(cfg: dict[str, Any], params: SPNGDConfig) -> float | None:
    """SP-NGD's ``clip_norm`` for this config, and DeepSpeed's own clipping switched off.

    DeepSpeed 0.19.8 clips at 1.0 when ``gradient_clipping`` is not set, and clips the raw (and at
    stage 0 un-averaged) gradients behind the optimizer's back. Under SP-NGD ``gradient_clipping``
    means one thing on every path: the preconditioned gradient's global L2 norm over all ranks is
    clipped to it (0 or unset: no clipping). DeepSpeed itself is told 0.
    """
    clip = cfg.get("gradient_clipping")
    cfg["gradient_clipping"] = 0.0
    if clip is None and os.environ.get("RANK", "0") == "0":
        logger.warning(
            "SPNGD: gradient_clipping is not set: no clipping (DeepSpeed's implicit 1.0 is switched off; set "
            "gradient_clipping to clip the preconditioned gradient's global norm)"
        )
    if clip is None:
        return params.clip_norm
    return float(clip) if clip > 0 else params.clip_norm


def spngd_params_from_config(cfg: dict[str, Any]) -> SPNGDConfig | None:
    """The validated SP-NGD parameters, or ``None`` when the config names another optimizer."""
    block = cfg.get("optimizer")
    if not isinstance(block, dict) or str(block.get("type", "")).lower() != SPNGD_TYPE:
        return None
    _check_block_keys(block, "optimizer (SPNGD)")
    params = block.get("params")
    return validate_spngd_params({} if params is None else params, where="optimizer.params (SPNGD)")


def _check_block_keys(block: dict[str, Any], where: str) -> None:
    """An optimizer/scheduler block holds "type" and "params" only (a typo would silently drop params)."""
    for key in block:
        if key not in ("type", "params"):
            guess = difflib.get_close_matches(str(key), ["type", "params"], n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            raise ValueError(f"{where}: unknown key '{key}'{hint} (allowed keys: type, params)")


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """Same arguments and returns as ``deepspeed.initialize``.

    With ``"optimizer": {"type": "SPNGD", "params": {...}}`` the returned optimizer is the
    :class:`~spngd_ds.SPNGD` object under every ZeRO stage (DeepSpeed's wrapper is
    ``engine.optimizer``). ``"scheduler": {"type": "SPNGDPolyDecay", "params": {...}}`` builds
    :class:`~spngd_ds.SPNGDPolyDecay` (``steps_per_epoch`` must be a number by then).
    """
    import deepspeed

    cfg = load_ds_config(config, args)
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)
        args.deepspeed_config = None  # we pass the (edited) dict instead; DeepSpeed refuses both
    params = spngd_params_from_config(cfg)
    sched_block = cfg.get("scheduler")
    wants_poly = isinstance(sched_block, dict) and str(sched_block.get("type", "")).lower() == SCHEDULER_TYPE

    def deepspeed_initialize() -> tuple[Any, Any, Any, Any]:  # with the arguments as they stand when called
        return deepspeed.initialize(
            args=args,
            model=model,
            optimizer=optimizer,
            model_parameters=model_parameters,
            training_data=training_data,
            lr_scheduler=lr_scheduler,
            config=cfg,
            **kwargs,
        )

    if params is None and not wants_poly:
        return deepspeed_initialize()
    if model is None:
        raise ValueError("spngd_ds.initialize: SPNGD needs model=...")
    if optimizer is not None and params is not None:
        raise ValueError("spngd_ds.initialize: give either optimizer=... or an SPNGD optimizer block, not both")
    poly_params = _poly_params(sched_block) if wants_poly and isinstance(sched_block, dict) else None
    if params is not None:
        check_combination(cfg, params)
        params = params.model_copy(update={"clip_norm": clip_norm_from_config(cfg, params)})
    # -- from here on, collectives: every rank has passed the same validation above ----------------
    ensure_single_process_env()  # a plain `python train.py` is a world of one rank
    deepspeed.init_distributed(dist_backend=kwargs.pop("dist_backend", None))
    spngd: SPNGD | None = None
    if params is not None:
        spngd = _build_spngd(model, params, cfg)
        optimizer = spngd
        model_parameters = None
        del cfg["optimizer"]
        if zero_stage(cfg) > 0:
            cfg["zero_allow_untested_optimizer"] = True
            zero = cfg["zero_optimization"]
            if (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None):
                cfg["zero_force_ds_cpu_optimizer"] = False
    if wants_poly:
        del cfg["scheduler"]
    if wants_poly and optimizer is None:
        raise ValueError("scheduler SPNGDPolyDecay with a DeepSpeed-built optimizer: pass an SPNGD optimizer block")
    if wants_poly:
        from spngd_ds.schedules import SPNGDPolyDecay

        assert poly_params is not None
        lr_scheduler = SPNGDPolyDecay(optimizer, **poly_params)
    with spngd.hold_steps() if spngd is not None else contextlib.nullcontext():
        engine, ds_opt, loader, sched = deepspeed_initialize()
    if spngd is None:
        return engine, ds_opt, loader, sched
    from spngd_ds.deepspeed.engine import attach

    attach(engine, spngd)
    return engine, spngd, loader, sched


def _poly_params(block: dict[str, Any]) -> dict[str, Any]:
    """The validated ``SPNGDPolyDecay`` parameters of a scheduler block (before any collective)."""
    from spngd_ds.schedules import validate_poly_params

    _check_block_keys(block, "scheduler (SPNGDPolyDecay)")
    params = dict(block.get("params") or {})
    if isinstance(params.get("steps_per_epoch"), str):
        raise ValueError(
            f"scheduler.params.steps_per_epoch = {params['steps_per_epoch']!r}: must be a number by initialize "
            'time (launch/train.py fills "auto" from the data loader)'
        )
    return validate_poly_params(params, where="scheduler.params (SPNGDPolyDecay)")


def _build_spngd(model: nn.Module, params: SPNGDConfig, cfg: dict[str, Any]) -> SPNGD:
    """Build SP-NGD on ``model`` with a communicator over every data-parallel rank (size 1 without one)."""
    import deepspeed.comm as ds_dist
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from spngd_ds.comm import Communicator, DistributedCommunicator
    from spngd_ds.optimizer import SPNGD

    device = get_accelerator().current_device_name() if get_accelerator().device_name() != "cpu" else "cpu"
    world = ds_dist.get_world_size() if ds_dist.is_initialized() else 1
    comm: Communicator = (
        DistributedCommunicator(device=device) if world > 1 and dist.is_initialized() else (Communicator(device=device))
    )
    kwargs = params.model_dump()
    staleness = kwargs.pop("staleness")
    opt = SPNGD(model, staleness=staleness, communicator=comm, **kwargs)
    return opt
