"""``spngd_ds.patch_deepspeed()``: SP-NGD for code that calls ``deepspeed.initialize`` for you.

HF ``transformers.Trainer`` (``TrainingArguments(deepspeed="ds.json")``), Accelerate's DeepSpeed
plugin and Lightning's DeepSpeed strategy build the engine with ``deepspeed.initialize`` and the
user's JSON, where ``"optimizer": {"type": "SPNGD"}`` would fail DeepSpeed's own check. After
:func:`patch_deepspeed`, ``deepspeed.initialize`` is a wrapper that hands every call whose config
names ``"SPNGD"`` (optimizer) or ``"SPNGDPolyDecay"`` (scheduler) to
:func:`spngd_ds.deepspeed.integration.initialize` -- the same validation, the same refusals and the
same engine wiring as calling ``spngd_ds.initialize`` yourself -- and every other call to DeepSpeed's
original, untouched.

``spngd_ds.initialize`` itself calls ``deepspeed.initialize`` (then the wrapper); a thread-local
flag set around the hand-over makes that inner call go straight to the original, so there is no
recursion and another thread's calls are not affected.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "TESTED_DEEPSPEED",
    "check_deepspeed_version",
    "is_patched",
    "patch_deepspeed",
    "unpatch_deepspeed",
    "wants_spngd",
]

#: DeepSpeed versions spngd_ds is tested with (the range in pyproject.toml's dependencies).
TESTED_DEEPSPEED = ">=0.19.8,<0.20"

_lock = threading.Lock()
_inside = threading.local()  # .depth > 0 while this thread runs spngd_ds.initialize for the wrapper
_original: Callable[..., Any] | None = None
_wrapper: Callable[..., Any] | None = None


def check_deepspeed_version(version: str | None = None) -> str:
    """The installed DeepSpeed version, if inside :data:`TESTED_DEEPSPEED`.

    Args:
        version: the version to check (default: ``deepspeed.__version__``).

    Raises:
        RuntimeError: the version is outside the tested range (naming both).
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import deepspeed

        version = str(deepspeed.__version__)
    try:
        parsed = Version(version)
    except InvalidVersion:
        parsed = None
    # A local or dev build of a tested release ("0.19.8+abc") counts as that release.
    if parsed is None or Version(parsed.base_version) not in SpecifierSet(TESTED_DEEPSPEED):
        raise RuntimeError(
            f"spngd_ds.patch_deepspeed: DeepSpeed {version} is installed, but spngd_ds is tested with "
            f"deepspeed{TESTED_DEEPSPEED} only (it relies on that series' engine and ZeRO internals); "
            f"install one with: pip install 'deepspeed{TESTED_DEEPSPEED}'"
        )
    return version


def wants_spngd(config: object) -> bool:
    """True when a DeepSpeed config names SP-NGD's optimizer or schedule.

    ``config`` (a dict; anything else is False) names ``SPNGD`` as optimizer or ``SPNGDPolyDecay``
    as scheduler, case-insensitive, as ``spngd_ds.initialize`` reads it.
    """
    from spngd_ds.deepspeed.integration import SCHEDULER_TYPE, SPNGD_TYPE

    if not isinstance(config, dict):
        return False
    for key, name in (("optimizer", SPNGD_TYPE), ("scheduler", SCHEDULER_TYPE)):
        block = config.get(key)
        if isinstance(block, dict) and str(block.get("type", "")).lower() == name:
            return True
    return False


def _config_of(call: dict[str, Any]) -> Any:
    """The config of a ``deepspeed.initialize`` call as DeepSpeed resolves it.

    ``config``, else ``config_params``, else ``args.deepspeed_config`` (a dict, a path, or
    ``None``). ``call`` maps the call's parameter names to its arguments.
    """
    for key in ("config", "config_params"):
        if call.get(key) is not None:
            return call[key]
    args = call.get("args")
    return getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)


def _make_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        if getattr(_inside, "depth", 0) > 0:  # spngd_ds.initialize calling DeepSpeed
            return original(*args, **kwargs)
        try:
            call = dict(signature.bind(*args, **kwargs).arguments)
        except TypeError:
            return original(*args, **kwargs)  # let DeepSpeed report the bad call in its own words
        config = _config_of(call)
        if config is None:
            return original(*args, **kwargs)
        from spngd_ds.deepspeed.integration import initialize as spngd_initialize
        from spngd_ds.deepspeed.integration import load_ds_config

        cfg = load_ds_config(config)  # a path is read once here, with spngd_ds's error messages
        if not wants_spngd(cfg):
            return original(*args, **kwargs)
        call.pop("config", None)
        call.pop("config_params", None)
        extra = call.pop("kwargs", {})  # DeepSpeed's signature has no **kwargs today; be safe
        _inside.depth = getattr(_inside, "depth", 0) + 1
        try:
            return spngd_initialize(config=cfg, **call, **extra)
        finally:
            _inside.depth -= 1

    initialize.__spngd_patch__ = True  # type: ignore[attr-defined]
    return initialize


def _rebind(old: Callable[..., Any], new: Callable[..., Any]) -> None:
    """Point every already-imported module's global that *is* ``old`` at ``new``.

    This reaches modules that did ``from deepspeed import initialize`` before the patch.
    """
    for module_name, module in list(sys.modules.items()):
        if module_name == __name__:  # our own _original/_wrapper globals keep what they hold
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is old:
                namespace[name] = new


def patch_deepspeed() -> None:
    """Make ``deepspeed.initialize`` understand ``"type": "SPNGD"`` and ``"type": "SPNGDPolyDecay"``.

    Call it once, before the Trainer (or Accelerate, or Lightning) builds the engine::

        import spngd_ds
        spngd_ds.patch_deepspeed()
        args = transformers.TrainingArguments(..., deepspeed="ds.json")

    Configs that name another optimizer and scheduler go to DeepSpeed unchanged. A second call does
    nothing. :func:`unpatch_deepspeed` restores the original.

    Raises:
        RuntimeError: the installed DeepSpeed is outside :data:`TESTED_DEEPSPEED`.
    """
    global _original, _wrapper
    import deepspeed

    check_deepspeed_version(str(deepspeed.__version__))
    with _lock:
        current = deepspeed.initialize
        if getattr(current, "__spngd_patch__", False):
            return
        _original = current
        _wrapper = _make_wrapper(current)
        _rebind(current, _wrapper)
        deepspeed.initialize = _wrapper


def unpatch_deepspeed() -> None:
    """Undo :func:`patch_deepspeed` (no-op when not patched)."""
    global _original, _wrapper
    import deepspeed

    with _lock:
        if _original is None or _wrapper is None:
            return
        _rebind(_wrapper, _original)
        deepspeed.initialize = _original
        _original = _wrapper = None


def is_patched() -> bool:
    """Whether ``deepspeed.initialize`` is currently spngd_ds's wrapper."""
    import deepspeed

    return bool(getattr(deepspeed.initialize, "__spngd_patch__", False))
