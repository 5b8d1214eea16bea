"""Validated SP-NGD hyperparameters (docs/configuration.md).

One frozen pydantic model serves the standalone constructor and the DeepSpeed JSON block
``"optimizer": {"type": "SPNGD", "params": {...}}``; every error names the key, the value given
and what is allowed, so a bad config fails at construction time and never deep inside a step.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

FisherType = Literal["empirical", "mc"]
CommDtype = Literal["fp32", "bf16", "fp16"]


def _no_bool(value: object) -> object:
    """Numbers only: JSON ``true`` is not a learning rate."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


class StalenessConfig(BaseModel):
    """Rule 6: adaptive refresh intervals of each statistic.

    ``threshold``: relative change ||X_new - X_old||_F / ||X_old||_F below which the interval grows.
    ``max_interval``: the largest interval, in optimizer steps.
    ``noise_scale``: weight of the sampling-noise floor ν (spngd_ds/staleness.py): the interval grows
    when r² < threshold² + (noise_scale·ν)², ν² = ρ (1/n_new + 1/n_old) from the statistic's own
    Wishart variance ρ and the global sample counts of the two values; 0 gives the plain r < threshold.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    _numbers = field_validator("threshold", "max_interval", "noise_scale", mode="before")(_no_bool)

    threshold: float = Field(0.1, gt=0.0, description="a float > 0")
    max_interval: int = Field(20, ge=1, description="an integer >= 1 (steps)")
    noise_scale: float = Field(1.0, ge=0.0, description="a float >= 0 (0: no sampling-noise floor)")


DEFAULT_STALENESS: dict[str, Any] = {"threshold": 0.1, "max_interval": 20, "noise_scale": 1.0}


class SPNGDConfig(BaseModel):
    """Every keyword argument of :class:`spngd_ds.SPNGD`, with its type and allowed range."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    _numbers = field_validator(
        "lr",
        "momentum",
        "damping",
        "weight_decay",
        "bn_damping_scale",
        "stat_micro_batches",
        "clip_norm",
        "step_bound",
        "max_consecutive_skips",
        "max_factor_dim",
        mode="before",
    )(_no_bool)

    lr: float = Field(0.1, ge=0.0, description="a float >= 0")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="a float in [0, 1)")
    damping: float = Field(2.5e-4, gt=0.0, description="a float > 0")
    weight_decay: float = Field(0.0, ge=0.0, description="a float >= 0")
    fisher: FisherType = Field("empirical", description="one of 'empirical', 'mc'")
    bn_damping_scale: float = Field(64.0, gt=0.0, description="a float > 0")
    weight_rescale: StrictBool = Field(False, description="true or false")
    staleness: StalenessConfig | None = Field(
        default_factory=lambda: StalenessConfig(**DEFAULT_STALENESS),
        description="null or {'threshold': float > 0, 'max_interval': int >= 1, 'noise_scale': float >= 0}",
    )
    comm_dtype: CommDtype = Field("fp32", description="one of 'fp32', 'bf16', 'fp16'")
    stat_micro_batches: int | None = Field(
        1, ge=1, description="an integer >= 1 (default 1), or null (every micro-batch of a step)"
    )
    a_samples: int | None = Field(
        None,
        ge=1,
        description="null (default: every sample) or an integer >= 1: A of each Linear/Conv2d from "
        "at most this many samples of each capturing micro-batch per rank",
    )
    overlap_statistics: StrictBool | Literal["auto"] = Field(
        "auto",
        description="'auto' (on, except on CPU ranks without micro-batches after the last one that "
        "captures), true or false: send the A factors to their owners during the backward",
    )
    clip_norm: float | None = Field(
        None,
        gt=0.0,
        description="null (no clipping) or a float > 0: limit on the global L2 norm of the "
        "preconditioned gradient (DeepSpeed's gradient_clipping maps here)",
    )
    step_bound: float | None = Field(
        1.0,
        ge=0.0,
        description="null or 0 (no bound: the paper's update) or a float > 0 (default 1): the "
        "preconditioned gradient of every layer scaled by min(1, step_bound * loss / (lr * ||P(grad)|| * ||grad||)), "
        "so that a step is at most step_bound times the distance at which the loss's linear model reaches 0",
    )
    max_consecutive_skips: int | None = Field(
        50,
        ge=0,
        description="null or 0 (never stop) or an integer >= 1 (default 50): this many skipped steps "
        "in a row stop the run with an error",
    )
    positions_as_samples: StrictBool = Field(
        True,
        description="true (default) or false: every position of a Linear, HF Conv1D, Embedding, LayerNorm "
        "or RMSNorm applied over (N, T, ...) inputs is a sample (n = N*T, K-FAC-expand; for token-mean losses); "
        "false: the sequence is the sample (n = N; for per-sequence losses). Conv2d always counts images",
    )
    curvature_conv1d: StrictBool = Field(
        True,
        description="true (default) or false: HF transformers' Conv1D layers get a Kronecker block",
    )
    curvature_norm: StrictBool = Field(
        True,
        description="true (default) or false: LayerNorm and RMSNorm layers get a unit-wise block",
    )
    curvature_embedding: StrictBool = Field(
        True,
        description="true (default) or false: untied nn.Embedding layers get a Kronecker block with a "
        "diagonal token-count factor",
    )
    max_factor_dim: int | None = Field(
        16384,
        ge=1,
        description="an integer >= 1 (default 16384: a 1 GiB fp32 factor), or null (no limit): a "
        "Kronecker factor of a larger dimension is kept diagonal",
    )


def _field_info(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[type[BaseModel], str]:
    """The model that holds the last key of ``loc`` and that key's allowed values."""
    if loc[:1] == ("staleness",) and len(loc) > 1:
        model, loc = StalenessConfig, loc[1:]
    info = model.model_fields.get(str(loc[-1])) if loc else None
    return model, (info.description or "") if info else ""


def format_errors(exc: ValidationError, model: type[BaseModel], where: str) -> str:
    """One readable message for all problems in ``exc``: key, value given, allowed values."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not isinstance(p, int))
        # pydantic appends the union member to the location of a failed optional sub-model
        loc = tuple(p for p in loc if p not in ("StalenessConfig",))
        key = ".".join(str(p) for p in loc) or "<root>"
        value = err.get("input")
        parent, allowed = _field_info(model, loc)
        if err["type"] == "extra_forbidden":
            known = list(parent.model_fields)
            guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            lines.append(f"unknown key '{key}'{hint} (allowed keys: {', '.join(known)})")
            continue
        lines.append(f"'{key}' = {value!r} is invalid: {err['msg']}; allowed: {allowed}")
    return f"{where}: " + "; ".join(lines)


def validate_spngd_params(params: dict[str, Any], where: str = "SPNGD") -> SPNGDConfig:
    """Validate a dict of SP-NGD keyword arguments; raise ``ValueError`` naming every bad key."""
    if not isinstance(params, dict):
        raise ValueError(f"{where}: params must be a mapping of keyword arguments, got {type(params).__name__}")
    try:
        return SPNGDConfig.model_validate(params)
    except ValidationError as exc:
        raise ValueError(format_errors(exc, SPNGDConfig, where)) from None
