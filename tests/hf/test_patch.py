"""``spngd_ds.patch_deepspeed()`` routing, without building an engine.

``deepspeed.initialize`` is replaced by a recording fake *before* patching, and
``spngd_ds.deepspeed.integration.initialize`` by a recorder that makes the inner
``deepspeed.initialize`` call the real one makes; so these tests see exactly which function each
call reaches. The real thing (a Trainer building the engine) is in tests/hf/test_trainer.py.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import types
from pathlib import Path
from typing import Any

import deepspeed
import pytest

import spngd_ds
from spngd_ds.deepspeed import integration as deepspeed_integration
from spngd_ds.deepspeed import patch

SGD = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
SPNGD = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SPNGD", "params": {"lr": 0.1}}}
POLY_ONLY = {
    "train_micro_batch_size_per_gpu": 4,
    "scheduler": {"type": "spngdpolydecay", "params": {"start_epoch": 1, "end_epoch": 2, "steps_per_epoch": 3}},
}


class Calls:
    """What reached DeepSpeed's (fake) original and spngd_ds's initialize, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def names(self) -> list[str]:
        return [name for name, _, _ in self.log]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Any:
    real = deepspeed.initialize
    record = Calls()

    @functools.wraps(real)  # same signature as DeepSpeed's, which the wrapper binds against
    def fake_original(*args: Any, **kwargs: Any) -> str:
        record.log.append(("deepspeed", args, kwargs))
        return "from-deepspeed"

    def fake_spngd_initialize(**kwargs: Any) -> str:
        record.log.append(("spngd", (), kwargs))
        # what spngd_ds.initialize does after taking the SPNGD blocks out of the config
        cfg = {k: v for k, v in kwargs["config"].items() if k not in ("optimizer", "scheduler")}
        deepspeed.initialize(model=kwargs.get("model"), config=cfg)
        return "from-spngd"

    monkeypatch.setattr(deepspeed, "initialize", fake_original)
    monkeypatch.setattr(deepspeed_integration, "initialize", fake_spngd_initialize)
    patch.patch_deepspeed()
    yield record
    patch.unpatch_deepspeed()
    assert deepspeed.initialize is fake_original


def test_other_optimizer_types_pass_through_untouched(calls: Calls) -> None:
    model = object()
    assert deepspeed.initialize(None, model, config=SGD, dist_init_required=False) == "from-deepspeed"
    assert calls.names() == ["deepspeed"]
    _, args, kwargs = calls.log[0]
    assert args == (None, model) and kwargs == {"config": SGD, "dist_init_required": False}
    assert kwargs["config"] is SGD  # not copied, not edited


def test_no_config_goes_to_deepspeed(calls: Calls) -> None:
    assert deepspeed.initialize(model=object()) == "from-deepspeed"  # DeepSpeed reports the missing config
    assert calls.names() == ["deepspeed"]


def test_spngd_config_goes_to_spngd_initialize_once(calls: Calls, tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(SPNGD))
    model = object()
    out = deepspeed.initialize(None, model, None, ["p"], config=str(path), lr_scheduler=None)
    assert out == "from-spngd"
    assert calls.names() == ["spngd", "deepspeed"]  # the inner call reached the original: no recursion
    _, _, kwargs = calls.log[0]
    assert kwargs["config"] == SPNGD and kwargs["model"] is model and kwargs["model_parameters"] == ["p"]
    assert "config_params" not in kwargs
    assert calls.log[1][2]["config"] == {"train_micro_batch_size_per_gpu": 4}


def test_accelerate_style_config_params_and_scheduler_only(calls: Calls) -> None:
    # accelerate: deepspeed.initialize(model=..., config_params=cfg, model_parameters=..., lr_scheduler=...)
    def sched(opt: Any) -> None:
        return None

    out = deepspeed.initialize(model=object(), config_params=POLY_ONLY, model_parameters=[], lr_scheduler=sched)
    assert out == "from-spngd"
    kwargs = calls.log[0][2]
    assert kwargs["config"] == POLY_ONLY and kwargs["lr_scheduler"] is sched


def test_config_from_args_deepspeed_config(calls: Calls, tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(SPNGD))
    args = types.SimpleNamespace(deepspeed_config=str(path), local_rank=0)
    assert deepspeed.initialize(args=args, model=object()) == "from-spngd"
    assert calls.log[0][2]["args"] is args and calls.log[0][2]["config"] == SPNGD


def test_bad_config_path_names_it(calls: Calls, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        deepspeed.initialize(model=object(), config=str(tmp_path / "missing.json"))


def test_second_call_is_harmless_and_names_bound_elsewhere_follow(calls: Calls) -> None:
    wrapper = deepspeed.initialize
    assert patch.is_patched()
    patch.patch_deepspeed()
    spngd_ds.patch_deepspeed()
    assert deepspeed.initialize is wrapper
    assert deepspeed.initialize(model=object(), config=SPNGD) == "from-spngd"
    assert calls.names() == ["spngd", "deepspeed"]  # wrapped once, not twice


def test_from_deepspeed_import_initialize_is_rebound(monkeypatch: pytest.MonkeyPatch) -> None:
    original = deepspeed.initialize
    user = types.ModuleType("user_script_that_did_from_deepspeed_import_initialize")
    user.initialize = original  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, user.__name__, user)
    patch.patch_deepspeed()
    try:
        assert user.initialize is deepspeed.initialize and patch.is_patched()
    finally:
        patch.unpatch_deepspeed()
    assert user.initialize is original and deepspeed.initialize is original
    assert not patch.is_patched()


def test_other_threads_are_still_routed(calls: Calls, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def slow_spngd(**kwargs: Any) -> str:
        calls.log.append(("spngd", (), kwargs))
        if kwargs["model"] == 0:  # while this thread is inside spngd_ds.initialize, another one calls DeepSpeed
            worker = threading.Thread(target=lambda: seen.append(deepspeed.initialize(model=1, config=SPNGD)))
            worker.start()
            worker.join(timeout=30)
        return "from-spngd"

    monkeypatch.setattr(deepspeed_integration, "initialize", slow_spngd)
    assert deepspeed.initialize(model=0, config=SPNGD) == "from-spngd"
    assert seen == ["from-spngd"]  # the flag that sends inner calls to the original is per thread
    assert [kw["model"] for name, _, kw in calls.log if name == "spngd"] == [0, 1]


@pytest.mark.parametrize("version", ["0.18.9", "0.20.0", "0.19.7", "not-a-version"])
def test_untested_deepspeed_version_is_refused(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = deepspeed.initialize
    monkeypatch.setattr(deepspeed, "__version__", version)
    with pytest.raises(RuntimeError) as err:
        spngd_ds.patch_deepspeed()
    assert f"DeepSpeed {version} is installed" in str(err.value)
    assert patch.TESTED_DEEPSPEED in str(err.value)
    assert deepspeed.initialize is before and not patch.is_patched()


@pytest.mark.parametrize("version", ["0.19.8", "0.19.8+cpu", "0.19.9"])
def test_tested_versions_pass(version: str) -> None:
    assert patch.check_deepspeed_version(version) == version


def test_tested_range_matches_pyproject() -> None:
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"deepspeed{patch.TESTED_DEEPSPEED}"' in text
