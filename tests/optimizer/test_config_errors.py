"""Bad configurations fail at construction with a message naming the key and value.

The message also gives the allowed values (docs/configuration.md); nothing fails deep inside a step.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import spngd_ds
from spngd_ds.config import SPNGDConfig, validate_spngd_params


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


# (kwargs, key as named in the message, value as shown, a fragment of the allowed values)
BAD = [
    (dict(fisher="natural"), "fisher", "'natural'", "'empirical', 'mc'"),
    (dict(fisher="Empirical"), "fisher", "'Empirical'", "'empirical', 'mc'"),
    (dict(damping=-1e-3), "damping", "-0.001", "> 0"),
    (dict(damping=0.0), "damping", "0.0", "> 0"),
    (dict(momentum=1.0), "momentum", "1.0", "[0, 1)"),
    (dict(momentum=-0.1), "momentum", "-0.1", "[0, 1)"),
    (dict(lr=-0.1), "lr", "-0.1", ">= 0"),
    (dict(lr="fast"), "lr", "'fast'", ">= 0"),
    (dict(weight_decay=-1e-4), "weight_decay", "-0.0001", ">= 0"),
    (dict(staleness={"threshold": 0}), "staleness.threshold", "0", "> 0"),
    (dict(staleness={"threshold": -1}), "staleness.threshold", "-1", "> 0"),
    (dict(staleness={"max_interval": 0}), "staleness.max_interval", "0", ">= 1"),
    (dict(staleness={"max_interval": 2.5}), "staleness.max_interval", "2.5", ">= 1"),
    (dict(staleness=5), "staleness", "5", "null or"),
    (dict(comm_dtype="int8"), "comm_dtype", "'int8'", "'fp32', 'bf16', 'fp16'"),
    (dict(stat_micro_batches=0), "stat_micro_batches", "0", ">= 1"),
    (dict(weight_rescale="yes"), "weight_rescale", "'yes'", "true or false"),
    (dict(bn_damping_scale=0.0), "bn_damping_scale", "0.0", "> 0"),
    (dict(bn_damping_scale=-64.0), "bn_damping_scale", "-64.0", "> 0"),
]


@pytest.mark.parametrize("kwargs,key,shown,allowed", BAD, ids=[f"{b[1]}={b[2]}" for b in BAD])
def test_bad_value_names_key_value_and_allowed(kwargs: dict[str, Any], key: str, shown: str, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        spngd_ds.SPNGD(_model(), **kwargs)
    msg = str(info.value)
    assert msg.startswith("SPNGD"), msg
    assert f"'{key}' = {shown}" in msg, msg
    assert "allowed" in msg and allowed in msg, msg


def test_misspelled_staleness_key_suggests_the_right_one() -> None:
    with pytest.raises(ValueError) as info:
        spngd_ds.SPNGD(_model(), staleness={"threshhold": 0.1, "max_interval": 5})
    msg = str(info.value)
    assert "staleness.threshhold" in msg
    assert "did you mean 'threshold'?" in msg
    assert "threshold, max_interval" in msg  # the allowed keys of the sub-config


def test_several_errors_are_reported_together() -> None:
    with pytest.raises(ValueError) as info:
        spngd_ds.SPNGD(_model(), lr=-1.0, comm_dtype="int8", staleness={"max_intervall": 3})
    msg = str(info.value)
    for fragment in ("'lr' = -1.0", "'comm_dtype' = 'int8'", "did you mean 'max_interval'?"):
        assert fragment in msg, msg


def test_unknown_top_level_key_did_you_mean() -> None:
    with pytest.raises(ValueError) as info:
        validate_spngd_params({"lr": 0.1, "dampnig": 1e-3})
    msg = str(info.value)
    assert "unknown key 'dampnig'" in msg and "did you mean 'damping'?" in msg, msg
    for key in SPNGDConfig.model_fields:
        assert key in msg  # the list of allowed keys
    with pytest.raises(ValueError, match=r"did you mean 'weight_decay'\?"):
        validate_spngd_params({"weight_decays": 0.0})
    # nothing close: no suggestion, but still the allowed keys
    with pytest.raises(ValueError) as info:
        validate_spngd_params({"zzz": 1})
    assert "did you mean" not in str(info.value) and "unknown key 'zzz'" in str(info.value)
    # the where= prefix names the config section
    with pytest.raises(ValueError, match=r"^optimizer\.params: "):
        validate_spngd_params({"lr": -1}, where="optimizer.params")


def test_unknown_keyword_to_constructor_is_a_type_error() -> None:
    """A misspelled Python keyword is caught by Python itself.

    The JSON path goes through ``validate_spngd_params`` and gets the did-you-mean message.
    """
    with pytest.raises(TypeError, match="dampnig"):
        spngd_ds.SPNGD(_model(), dampnig=1e-3)


def test_params_must_be_a_mapping() -> None:
    with pytest.raises(ValueError, match="mapping"):
        validate_spngd_params([("lr", 0.1)])  # type: ignore[arg-type]


def test_valid_config_round_trip() -> None:
    cfg = validate_spngd_params(
        {
            "lr": 0.3,
            "momentum": 0.0,
            "damping": 1e-3,
            "staleness": None,
            "comm_dtype": "bf16",
            "fisher": "mc",
            "weight_rescale": True,
            "stat_micro_batches": 2,
        }
    )
    assert (cfg.lr, cfg.momentum, cfg.damping, cfg.staleness, cfg.comm_dtype) == (0.3, 0.0, 1e-3, None, "bf16")
    assert cfg.fisher == "mc" and cfg.weight_rescale is True and cfg.stat_micro_batches == 2
    with pytest.raises(ValidationError):  # frozen
        cfg.lr = 1.0


@pytest.mark.parametrize("bad", ["generator", "list"])
def test_passing_parameters_instead_of_model_is_a_clear_type_error(bad: str) -> None:
    model = _model()
    arg = model.parameters() if bad == "generator" else list(model.parameters())
    with pytest.raises(TypeError) as info:
        spngd_ds.SPNGD(arg)
    msg = str(info.value)
    assert "nn.Module" in msg and re.search(bad, msg), msg


def test_model_without_trainable_parameters() -> None:
    frozen = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        spngd_ds.SPNGD(frozen)
    with pytest.raises(ValueError, match="no trainable parameters"):
        spngd_ds.SPNGD(nn.ReLU())


def test_bad_config_leaves_no_hooks_behind() -> None:
    """Validation happens before any hook is registered on the model."""
    model = _model()
    with pytest.raises(ValueError):
        spngd_ds.SPNGD(model, damping=-1.0)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m
