"""Bad DeepSpeed configs, as a user writes them in JSON, fail before any collective.

Through the functions that ``spngd_ds.initialize`` runs before any collective.

Each row: the function, its input, and three fragments the one error message must contain: the
key, the value given, and what is allowed. The constructor path (``spngd_ds.SPNGD(model, ...)``)
is covered in tests/optimizer/test_config_errors.py; here every error goes through the DeepSpeed layer:
``spngd_params_from_config`` (the ``"optimizer"`` block), ``check_combination`` (ZeRO stage x
precision), ``_poly_params`` (the ``"scheduler"`` block) and ``load_ds_config`` (the file).
That every rank raises it without hanging is tests/deepspeed/test_engine.py
(test_bad_config_fails_on_every_rank_without_hanging).

Would the test fail without the protection? Each row asserts that a ``ValueError`` is raised *and*
that its message names key, value and allowed values: a removed check either raises nothing (the
row fails on ``pytest.raises``) or fails later with a bare Python error (wrong type, no key: the
fragment asserts fail). Rows marked xfail are protections that are missing today (see the reason).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spngd_ds.deepspeed.integration import _poly_params, check_combination, load_ds_config, spngd_params_from_config

WHERE = "optimizer.params (SPNGD)"


def _opt(**params: Any) -> dict[str, Any]:
    """A DeepSpeed config whose optimizer block is SP-NGD with ``params``."""
    return {"train_batch_size": 32, "optimizer": {"type": "SPNGD", "params": params}}


def _stage(stage: Any, **extra: Any) -> dict[str, Any]:
    return {**_opt(lr=0.1), "zero_optimization": {"stage": stage}, **extra}


def _poly(**params: Any) -> dict[str, Any]:
    base = {"steps_per_epoch": 10, "start_epoch": 1.0, "end_epoch": 5.0, "power": 2.0}
    base.update(params)
    return {"type": "SPNGDPolyDecay", "params": {k: v for k, v in base.items() if v is not _DROP}}


_DROP = object()


def _missing_file(tmp: Path) -> Any:
    return load_ds_config(str(tmp / "no_such_config.json"))


def _bad_json(tmp: Path) -> Any:
    path = tmp / "broken.json"
    path.write_text('{"optimizer": {"type": "SPNGD", "params": {"lr": 0.1,}}}')
    return load_ds_config(str(path))


def _json_list(tmp: Path) -> Any:
    path = tmp / "list.json"
    path.write_text(json.dumps([{"optimizer": {"type": "SPNGD"}}]))
    return load_ds_config(str(path))


SPNGD_PARAMS = "spngd_params_from_config"
COMBINATION = "check_combination"
POLY = "_poly_params"
FILE = "load_ds_config"

RUN: dict[str, Callable[[Any, Path], Any]] = {
    SPNGD_PARAMS: lambda cfg, tmp: spngd_params_from_config(cfg),
    COMBINATION: lambda cfg, tmp: check_combination(cfg),
    POLY: lambda block, tmp: _poly_params(block),
    FILE: lambda make, tmp: make(tmp),
}

MISSING = "protection missing in spngd_ds"

# (id, function, input, key fragment, value fragment, allowed fragment); a tuple fragment: any of its wordings
ROWS: list[Any] = [
    # -- the optimizer block: unknown keys, with did-you-mean ------------------------------------
    (
        "unknown-key-typo",
        SPNGD_PARAMS,
        _opt(lr=0.1, dampnig=1e-3),
        "'dampnig'",
        "did you mean 'damping'?",
        "allowed keys: lr, momentum, damping",
    ),
    (
        "unknown-nested-key",
        SPNGD_PARAMS,
        _opt(staleness={"threshold": 0.1, "max_intervall": 5}),
        "'staleness.max_intervall'",
        "did you mean 'max_interval'?",
        "allowed keys: threshold, max_interval",
    ),
    (
        "adam-leftover-key",
        SPNGD_PARAMS,
        _opt(lr=0.1, betas=[0.9, 0.999]),
        "'betas'",
        "unknown key",
        "allowed keys: lr, momentum, damping, weight_decay, fisher",
    ),
    # -- wrong types --------------------------------------------------------------------------------
    ("lr-string", SPNGD_PARAMS, _opt(lr="fast"), "'lr'", "'fast'", "a float >= 0"),
    ("momentum-list", SPNGD_PARAMS, _opt(momentum=[0.9]), "'momentum'", "[0.9]", "a float in [0, 1)"),
    ("damping-bool", SPNGD_PARAMS, _opt(damping=True), "'damping'", "True", "a float > 0"),
    ("weight-rescale-string", SPNGD_PARAMS, _opt(weight_rescale="true"), "'weight_rescale'", "'true'", "true or false"),
    ("staleness-string", SPNGD_PARAMS, _opt(staleness="on"), "'staleness'", "'on'", "null or {'threshold'"),
    (
        "max-interval-bool",
        SPNGD_PARAMS,
        _opt(staleness={"max_interval": True}),
        "'staleness.max_interval'",
        "True",
        "an integer >= 1",
    ),
    (
        "stat-micro-batches-fraction",
        SPNGD_PARAMS,
        _opt(stat_micro_batches=1.5),
        "'stat_micro_batches'",
        "1.5",
        "an integer >= 1",
    ),
    # -- ranges ---------------------------------------------------------------------------------------
    ("damping-zero", SPNGD_PARAMS, _opt(damping=0), "'damping'", "= 0 ", "a float > 0"),
    ("damping-negative", SPNGD_PARAMS, _opt(damping=-2.5e-4), "'damping'", "-0.00025", "a float > 0"),
    ("damping-nan", SPNGD_PARAMS, _opt(damping=float("nan")), "'damping'", "nan", "a float > 0"),
    ("momentum-one", SPNGD_PARAMS, _opt(momentum=1.0), "'momentum'", "1.0", "a float in [0, 1)"),
    ("momentum-negative", SPNGD_PARAMS, _opt(momentum=-0.1), "'momentum'", "-0.1", "a float in [0, 1)"),
    ("threshold-zero", SPNGD_PARAMS, _opt(staleness={"threshold": 0.0}), "'staleness.threshold'", "0.0", "a float > 0"),
    (
        "threshold-negative",
        SPNGD_PARAMS,
        _opt(staleness={"threshold": -0.1, "max_interval": 5}),
        "'staleness.threshold'",
        "-0.1",
        "a float > 0",
    ),
    ("weight-decay-negative", SPNGD_PARAMS, _opt(weight_decay=-1e-4), "'weight_decay'", "-0.0001", "a float >= 0"),
    ("bn-damping-scale-zero", SPNGD_PARAMS, _opt(bn_damping_scale=0), "'bn_damping_scale'", "= 0 ", "a float > 0"),
    # -- values outside a set -------------------------------------------------------------------------
    ("comm-dtype", SPNGD_PARAMS, _opt(comm_dtype="fp8"), "'comm_dtype'", "'fp8'", "'fp32', 'bf16', 'fp16'"),
    (
        "comm-dtype-torch-name",
        SPNGD_PARAMS,
        _opt(comm_dtype="float16"),
        "'comm_dtype'",
        "'float16'",
        "'fp32', 'bf16', 'fp16'",
    ),
    ("fisher", SPNGD_PARAMS, _opt(fisher="kfac"), "'fisher'", "'kfac'", "'empirical', 'mc'"),
    # -- the block around the params --------------------------------------------------------------------
    pytest.param(
        "params-not-a-mapping",
        SPNGD_PARAMS,
        {"optimizer": {"type": "SPNGD", "params": ["lr", 0.1]}},
        "optimizer.params",
        "list",
        "mapping",
        id="params-not-a-mapping",
    ),
    pytest.param(
        "params-key-misspelled",
        SPNGD_PARAMS,
        {"optimizer": {"type": "SPNGD", "parms": {"lr": 0.3}}},
        "'parms'",
        "did you mean 'params'?",
        "type, params",
        id="params-key-misspelled",
    ),
    # -- stage x precision ---------------------------------------------------------------------------------
    (
        "fp16-stage0",
        COMBINATION,
        _stage(0, fp16={"enabled": True}),
        "zero_optimization.stage 0",
        "fp16",
        "use fp16 with stage 1, 2 or 3, or bf16 with stage 0",
    ),
    (
        "bf16-fp32-accum-stage0",
        COMBINATION,
        _stage(0, bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"}),
        "data_types.grad_accum_dtype",
        "'fp32'",
        "use stage 1, 2 or 3",
    ),
    ("stage-5", COMBINATION, _stage(5), "zero_optimization.stage", "5", "allowed: 0, 1, 2, 3"),
    ("stage-negative", COMBINATION, _stage(-1), "zero_optimization.stage", "-1", "allowed: 0, 1, 2, 3"),
    pytest.param(
        "stage-string",
        COMBINATION,
        _stage("two"),
        "zero_optimization.stage",
        "'two'",
        "allowed: 0, 1, 2, 3",
        id="stage-string",
    ),
    pytest.param(
        "stage-fraction",
        COMBINATION,
        _stage(2.5),
        "zero_optimization.stage",
        "2.5",
        "allowed: 0, 1, 2, 3",
        id="stage-fraction",
    ),
    # -- the SPNGDPolyDecay scheduler block -----------------------------------------------------------------
    ("poly-unknown-key", POLY, _poly(powr=2.0), "['powr']", "unknown key", "allowed: ['decay_damping'"),
    pytest.param(
        "poly-typo-did-you-mean",
        POLY,
        _poly(powr=2.0),
        "'powr'",
        "did you mean 'power'?",
        "allowed",
        id="poly-typo-did-you-mean",
    ),
    ("poly-missing-key", POLY, _poly(end_epoch=_DROP), "'end_epoch'", "is required", "is required"),
    ("poly-steps-auto", POLY, _poly(steps_per_epoch="auto"), "steps_per_epoch", "'auto'", "must be a number"),
    pytest.param(
        "poly-steps-zero",
        POLY,
        _poly(steps_per_epoch=0),
        "'steps_per_epoch'",
        "0",
        "an integer > 0",
        id="poly-steps-zero",
    ),
    pytest.param(
        "poly-end-before-start",
        POLY,
        _poly(start_epoch=5.0, end_epoch=2.0),
        "'end_epoch'",
        "2.0",
        "> start_epoch",
        id="poly-end-before-start",
    ),
    pytest.param(
        "poly-power-string",
        POLY,
        _poly(power="2"),
        "'power'",
        "'2'",
        "a number >= 0",
        id="poly-power-string",
    ),
    # -- the file itself ---------------------------------------------------------------------------------------
    ("file-missing", FILE, _missing_file, "no_such_config.json", ("not found", "does not exist"), "DeepSpeed config"),
    ("file-invalid-json", FILE, _bad_json, "broken.json", "not valid JSON", "line 1"),
    ("file-not-an-object", FILE, _json_list, "list.json", "must hold", "a JSON object"),
]


def _param(row: Any) -> Any:
    if hasattr(row, "marks"):  # already a pytest.param (an xfail row)
        return row
    return pytest.param(*row, id=row[0])


@pytest.mark.parametrize(("name", "fn", "given", "key", "value", "allowed"), [_param(r) for r in ROWS])
def test_bad_config_names_key_value_and_allowed(
    tmp_path: Path, name: str, fn: str, given: Any, key: str, value: str | tuple[str, ...], allowed: str
) -> None:
    with pytest.raises(ValueError) as info:
        RUN[fn](given, tmp_path)
    msg = str(info.value)
    for fragment in (key, value, allowed):  # a tuple: any of these wordings
        options = fragment if isinstance(fragment, tuple) else (fragment,)
        assert any(o in msg for o in options), f"{name}: {fragment!r} not in {msg!r}"
    if fn == SPNGD_PARAMS:
        assert msg.startswith((WHERE, "optimizer (SPNGD)")), msg  # the message says which config section is wrong
    assert "\n" not in msg  # one line, readable in a launcher's log


def test_the_table_is_big_enough() -> None:
    assert len(ROWS) >= 20


def test_the_same_shapes_pass_when_valid(tmp_path: Path) -> None:
    """Control: the rows above fail for the value they change, not for the shape of the config."""
    cfg = _opt(
        lr=0.1,
        momentum=0.0,
        damping=1e-3,
        staleness={"threshold": 0.2, "max_interval": 4},
        comm_dtype="bf16",
        fisher="mc",
        weight_rescale=True,
        stat_micro_batches=2,
        bn_damping_scale=1.0,
    )
    params = spngd_params_from_config(cfg)
    assert params is not None and params.stat_micro_batches == 2 and params.comm_dtype == "bf16"
    for stage in (0, 1, 2, 3):
        check_combination(_stage(stage))
        check_combination(_stage(stage, bf16={"enabled": True}))
    for stage in (1, 2, 3):
        check_combination(_stage(stage, fp16={"enabled": True}))
        check_combination(_stage(stage, bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"}))
    assert _poly_params(_poly(warmup_epochs=0.5, decay_damping=True, min_damping=1e-5))["steps_per_epoch"] == 10
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(cfg))
    assert load_ds_config(str(path)) == cfg
    # another optimizer type passes through untouched (first-order baselines)
    lamb = {"optimizer": {"type": "Lamb", "params": {"lr": 1e-3, "betas": [0.9, 0.99]}}}
    assert spngd_params_from_config(lamb) is None
