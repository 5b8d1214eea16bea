"""Shared pieces of the benchmark scripts: models, data, DeepSpeed configs, output helpers.

Nothing here downloads anything: models are built with ``weights=None`` and the data is
scikit-learn's bundled digits (through :func:`spngd_ds.recipes.data.load_digits_split`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
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
#: The default stale-statistics setting (DESIGN.md section 4).
DEFAULT_STALENESS: dict[str, Any] = {"threshold": 0.1, "max_interval": 20, "noise_scale": 1.0}
#: Momentum SGD as DeepSpeed builds it from ``"type": "SGD"`` (torch.optim.SGD).
SGD_PARAMS: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}


def isolate_extension_cache() -> None:
    """Give DeepSpeed's JIT-built CPU ops (the shm communication op every CPU ``init_distributed``
    loads) a cache directory of this interpreter's own, unless ``TORCH_EXTENSIONS_DIR`` is set.

    The default ``~/.cache/torch_extensions`` is shared by every virtualenv on the machine; two
    environments with different include paths rebuild the op in turn, ~100 s (or minutes, waiting on
    the lock) at every launch. Call before DeepSpeed initialises its communication backend.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(tempfile.gettempdir()) / f"spngd_bench_torch_ext_{tag}")


def prepare_environment() -> None:
    """What every benchmark sets before DeepSpeed starts: a private extension cache
    (:func:`isolate_extension_cache`), the launcher variables for a plain ``python`` run, and the
    per-step rank-agreement check of ``spngd_ds.deepspeed.agreement`` off (a debugging all-gather that
    would otherwise be timed and counted when ``SPNGD_CHECK_AGREEMENT`` is set)."""
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
    """The ``"optimizer"`` block for SP-NGD, with the default staleness or with it switched off
    (``extra``: further SP-NGD keyword arguments, e.g. ``stat_micro_batches``)."""
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
    """``"resnet20"``: CIFAR-style ResNet-20 (widths 16/32/64, 3 basic blocks per stage, 1x1-conv
    shortcuts, 10 classes); ``"resnet50"``: torchvision ResNet-50 (1000 classes), no weights."""
    torch.manual_seed(seed)
    if kind == "resnet20":
        from spngd_ds.recipes.models import SmallResNet

        return SmallResNet(num_classes=10, in_channels=3, blocks_per_stage=3)
    if kind == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None)
    raise ValueError(f"unknown model {kind!r}; use resnet20 or resnet50")


def digits_rgb(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images of the digits split (``spngd_ds.recipes.data``), upscaled to ``image_size``
    and repeated to 3 channels, and their labels."""
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
