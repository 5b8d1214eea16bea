"""Shared pieces of the benchmark scripts.

Models, data, DeepSpeed configs, output helpers, and the counter of every ``torch.distributed``
collective (:class:`CollectiveCounter`).

Nothing here downloads anything: models are built with ``weights=None`` and the data is
scikit-learn's bundled digits (through :func:`spngd_ds.recipes.data.load_digits_split`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
DOCS_DIR = REPO_ROOT / "docs"

#: SP-NGD hyperparameters of the CPU default config (ds_configs/digits_cpu.json), without its schedule.
SPNGD_PARAMS: dict[str, Any] = {
    "lr": 0.02,
    "momentum": 0.9,
    "damping": 1e-3,
    "weight_decay": 0.0,
    "fisher": "empirical",
    "bn_damping_scale": 64.0,
}
#: The default stale-statistics setting (docs/design.md, section 2, rule 6).
DEFAULT_STALENESS: dict[str, Any] = {"threshold": 0.1, "max_interval": 20, "noise_scale": 1.0}
#: Momentum SGD as DeepSpeed builds it from ``"type": "SGD"`` (torch.optim.SGD).
SGD_PARAMS: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}


def isolate_extension_cache() -> None:
    """Give DeepSpeed's JIT-built CPU ops a private extension cache.

    Give DeepSpeed's JIT-built CPU ops (the shm communication op every CPU ``init_distributed``
    loads) a cache directory of this interpreter's own, unless ``TORCH_EXTENSIONS_DIR`` is set.

    The default ``~/.cache/torch_extensions`` is shared by every virtualenv on the machine; two
    environments with different include paths rebuild the op in turn, ~100 s (or minutes, waiting on
    the lock) at every launch. Call before DeepSpeed initialises its communication backend.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(tempfile.gettempdir()) / f"spngd_bench_torch_ext_{tag}")


def prepare_environment() -> None:
    """Set what every benchmark needs before DeepSpeed starts.

    What every benchmark sets before DeepSpeed starts: a private extension cache
    (:func:`isolate_extension_cache`), the launcher variables for a plain ``python`` run, and the
    per-step rank-agreement check of ``spngd_ds.deepspeed.agreement`` off (a debugging all-gather
    that would otherwise be timed and counted when ``SPNGD_CHECK_AGREEMENT`` is set).
    """
    isolate_extension_cache()
    ensure_launcher_env()
    os.environ["SPNGD_CHECK_AGREEMENT"] = "0"


def ensure_launcher_env() -> None:
    """Let ``python bench/x.py`` run as a world of one rank: the variables torchrun would set."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def spngd_block(staleness: bool, comm_dtype: str = "fp32", **extra: Any) -> dict[str, Any]:
    """Build the ``"optimizer"`` block for SP-NGD.

    The ``"optimizer"`` block for SP-NGD, with the default staleness or with it switched off
    (``extra``: further SP-NGD keyword arguments, e.g. ``stat_micro_batches``).
    """
    params = dict(SPNGD_PARAMS, staleness=dict(DEFAULT_STALENESS) if staleness else None, comm_dtype=comm_dtype)
    return {"type": "SPNGD", "params": params | extra}


def sgd_block() -> dict[str, Any]:
    """The ``"optimizer"`` block for momentum SGD built by DeepSpeed."""
    return {"type": "SGD", "params": dict(SGD_PARAMS)}


def ds_config(optimizer: dict[str, Any], micro_batch: int, stage: int = 0, gas: int = 1) -> dict[str, Any]:
    """A fp32 DeepSpeed config at ZeRO ``stage`` with ``gas`` micro-batches per step."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": gas,
        "steps_per_print": 10**9,
        "optimizer": optimizer,
        "zero_optimization": {"stage": stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
    }


def build_model(kind: str, seed: int = 0) -> nn.Module:
    """Build a benchmark model by name.

    ``"resnet20"``: CIFAR-style ResNet-20 (widths 16/32/64, 3 basic blocks per stage, 1x1-conv
    shortcuts, 10 classes); ``"resnet50"``: torchvision ResNet-50 (1000 classes), no weights.
    """
    torch.manual_seed(seed)
    if kind == "resnet20":
        from spngd_ds.recipes.models import SmallResNet

        return SmallResNet(num_classes=10, in_channels=3, blocks_per_stage=3)
    if kind == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None)
    raise ValueError(f"unknown model {kind!r}; use resnet20 or resnet50")


def digits_rgb(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the training images of the digits split at ``image_size``.

    Training images of the digits split (``spngd_ds.recipes.data``), upscaled to ``image_size`` and
    repeated to 3 channels, and their labels.
    """
    from spngd_ds.recipes.data import load_digits_split

    train, _ = load_digits_split(image_size=image_size)
    x, y = train.tensors
    return x.expand(-1, 3, -1, -1).contiguous(), y


def param_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def machine_info() -> dict[str, Any]:
    """Where a figure was measured: CPU model and cores, GPU if any, library versions."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), model)
    except OSError:
        pass
    import deepspeed

    return {
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15min": list(os.getloadavg()),
    }


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (strict JSON has no Infinity/NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``bench/results/<name>.json`` (non-finite numbers as null); return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(finite(payload), indent=1, allow_nan=False) + "\n")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (floats with 4 significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in text]
    return "\n".join(lines)


def mib(nbytes: float) -> float:
    """Bytes to MiB."""
    return nbytes / 2**20


# -- counting every collective (what a rank sends, ring model) -----------------------------------------

#: every collective and point-to-point function of torch.distributed; those mapped to None have no
#: byte formula here and raise when called during a measured step
FUNCS: dict[str, str | None] = {
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_single": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter": "reduce_scatter_list",
    "all_gather_into_tensor": "all_gather",
    "all_gather_single": "all_gather",
    "_all_gather_base": "all_gather",
    "all_gather": "all_gather_list",
    "all_to_all_single": "all_to_all",
    "reduce": "reduce",
    "broadcast": "reduce",
    "barrier": "none",
    "monitored_barrier": "none",
    "all_gather_coalesced": None,
    "all_gather_object": None,
    "gather": None,
    "gather_object": None,
    "scatter": None,
    "scatter_object_list": None,
    "broadcast_object_list": None,
    "all_to_all": None,
    "send": None,
    "recv": None,
    "isend": None,
    "irecv": None,
    "batch_isend_irecv": None,
    "_all_gather_base_coalesced": None,
    "_reduce_scatter_base_coalesced": None,
}


def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, list | tuple):
        return sum(_nbytes(x) for x in t)
    return 0


def sent_bytes(kind: str, a: dict[str, Any], rank: int, world: int) -> float:
    """Bytes one rank sends in one collective of ``kind`` (bound arguments ``a``), ring model."""
    n = world
    if n == 1 or kind == "none":
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n * _nbytes(a.get("tensor", a.get("tensors")))
    if kind == "reduce_scatter":  # the full input buffer, (N-1)/N of it leaves each rank
        return (n - 1) / n * _nbytes(a.get("input"))
    if kind == "reduce_scatter_list":
        return (n - 1) / n * _nbytes(a.get("input_list"))
    if kind == "all_gather":  # (N-1)/N of the full output buffer
        return (n - 1) / n * _nbytes(a.get("output_tensor"))
    if kind == "all_gather_list":
        return (n - 1) * _nbytes(a.get("tensor"))
    if kind == "all_to_all":
        inp = a["input"]
        splits = a.get("input_split_sizes")
        row = inp.element_size() * (math.prod(inp.shape[1:]) if inp.dim() > 1 else 1)
        if not splits:
            return (n - 1) / n * _nbytes(inp)
        return float(sum(s for q, s in enumerate(splits) if q != rank) * row)
    if kind == "reduce":
        return (n - 1) / n * _nbytes(a.get("tensor"))
    raise KeyError(kind)


class CollectiveCounter:
    """Wrap every collective of :data:`FUNCS` to count its calls and bytes.

    Replaces every function of :data:`FUNCS` in ``torch.distributed`` and
    ``torch.distributed.distributed_c10d`` (and DeepSpeed's cached all-gather / reduce-scatter
    functions) by a wrapper that logs :func:`sent_bytes` and the wall seconds of each call (for an
    asynchronous one, its issue plus its ``wait``). Nested calls (one c10d function calling another)
    count once, as the outermost.
    """

    def __init__(self) -> None:
        import deepspeed.comm.comm as ds_comm
        from torch.distributed import distributed_c10d as c10d

        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.measuring = False
        self.allowed: frozenset[str] | None = None
        self.log: list[dict[str, Any]] = []
        self.outside: dict[str, int] = {}  # calls outside measured windows (engine setup)
        self._depth = 0
        self._wrapped: dict[int, Callable[..., Any]] = {}
        for name in FUNCS:
            for mod in (dist, c10d):
                orig = getattr(mod, name, None)
                if orig is not None:
                    setattr(mod, name, self._wrap(name, orig))
        cdb = ds_comm.cdb
        for attr, name in (
            ("all_gather_function", "all_gather_into_tensor"),
            ("reduce_scatter_function", "reduce_scatter_tensor"),
        ):
            orig = getattr(cdb, attr, None)
            if orig is not None:
                setattr(cdb, attr, self._wrap(getattr(orig, "__name__", name), orig))

    def _wrap(self, name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        inner = getattr(orig, "__wrapped_by_counter__", orig)
        if id(inner) in self._wrapped:
            return self._wrapped[id(inner)]
        sig = inspect.signature(inner)
        kind = FUNCS.get(name)

        @functools.wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            entry = None
            if self._depth == 0:
                entry = self._record(name, kind, sig, args, kwargs, sys._getframe(1).f_code.co_filename)
            self._depth += 1
            start = time.perf_counter()
            try:
                out = inner(*args, **kwargs)
            finally:
                self._depth -= 1
            if entry is not None:
                entry["seconds"] = time.perf_counter() - start
                if out is not None and hasattr(out, "wait"):  # async_op: the wait counts too
                    entry["async"] = True
                    out = _TimedWork(out, entry)
            return out

        wrapper.__wrapped_by_counter__ = inner  # type: ignore[attr-defined]
        self._wrapped[id(inner)] = wrapper
        return wrapper

    def _record(
        self,
        name: str,
        kind: str | None,
        sig: inspect.Signature,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        caller: str,
    ) -> dict[str, Any] | None:
        """Log one call made inside a measured window.

        Log one call made inside a measured window (its entry, which the wrapper completes with the
        call's wall ``seconds``); count it in :attr:`outside` otherwise.
        """
        if not self.measuring:
            self.outside[name] = self.outside.get(name, 0) + 1
            return None
        if kind is None or (self.allowed is not None and name not in self.allowed):
            raise RuntimeError(
                f"unexpected collective torch.distributed.{name} during a measured step "
                f"(called from {caller}); allowed: {sorted(self.allowed or FUNCS)}"
            )
        bound = sig.bind_partial(*args, **kwargs).arguments
        group = bound.get("group")
        world = dist.get_world_size(group) if group is not None else self.world
        rank = dist.get_rank(group) if group is not None else self.rank
        entry = {
            "fn": name,
            "bytes": sent_bytes(kind, bound, rank, world),
            "ours": "/spngd_ds/" in caller.replace("\\", "/"),
            "seconds": 0.0,
            "async": False,
        }
        self.log.append(entry)
        return entry

    def window(self, allowed: frozenset[str] | None = None) -> _Window:
        """``with counter.window() as w:`` counts the calls inside; ``w.calls`` afterwards."""
        return _Window(self, allowed)


class _TimedWork:
    """The handle of an asynchronous collective: its ``wait`` adds to the call's logged seconds."""

    def __init__(self, work: Any, entry: dict[str, Any]) -> None:
        self._work, self._entry = work, entry

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._entry["seconds"] += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class _Window:
    def __init__(self, counter: CollectiveCounter, allowed: frozenset[str] | None) -> None:
        self.counter, self.allowed = counter, allowed
        self.calls: list[dict[str, Any]] = []

    def __enter__(self) -> _Window:
        c = self.counter
        c.log, c.measuring, c.allowed = [], True, self.allowed
        return self

    def __exit__(self, *exc: object) -> None:
        c = self.counter
        self.calls, c.log, c.measuring, c.allowed = c.log, [], False, None


def summarise_calls(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes (total, SP-NGD's, DeepSpeed's) and call counts by function of one measured step."""
    by_fn: dict[str, dict[str, float]] = {}
    for c in calls:
        row = by_fn.setdefault(c["fn"], {"calls": 0, "bytes": 0.0})
        row["calls"] += 1
        row["bytes"] += c["bytes"]
    return {
        "bytes": sum(c["bytes"] for c in calls),
        "ours_bytes": sum(c["bytes"] for c in calls if c["ours"]),
        "deepspeed_bytes": sum(c["bytes"] for c in calls if not c["ours"]),
        "calls": len(calls),
        "ours_calls": sum(1 for c in calls if c["ours"]),
        "by_function": by_fn,
    }
