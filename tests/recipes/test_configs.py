"""The JSON configs in ds_configs/.

They parse, carry the required keys, match the paper's table, and DeepSpeed accepts their batch,
ZeRO and precision keys.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from spngd_ds.recipes.dsconfig import RECIPE_KEY, batch_layout, ensure_buffer_dtype, fill_auto, pop_recipe
from tests.support.distributed import port_taken

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "ds_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))
RECIPE_FLAGS = {
    "dataset", "data_path", "model", "image_size", "epochs", "max_steps", "seed", "eval_interval",
    "log_interval", "mixup_alpha", "random_erasing", "bn_gamma_init_std", "num_workers",
    "eval_batch_size", "checkpoint_interval",
}  # fmt: skip

# Paper (Osawa et al., ResNet-50 / ImageNet), docs/design.md section 2:
# global batch: lr, momentum, damping, mixup alpha, power, start epoch, end epoch, epochs.
PAPER = {
    4096: (8.18e-3, 0.997, 2.5e-4, 0.4, 11, 1, 53, 36),
    8192: (1.25e-2, 0.993, 2.5e-4, 0.4, 8, 1, 53.5, 36),
    16384: (2.5e-2, 0.985, 2.5e-4, 0.4, 8, 1, 53.5, 36),
    32768: (3e-2, 0.97, 2e-4, 0.6, 3.5, 1.5, 49.5, 46),
    65536: (4e-2, 0.95, 1.5e-4, 0.6, 2.9, 2, 64.5, 61),
    131072: (7e-2, 0.93, 1e-4, 1.0, 3.0, 1, 95, 81),
}
# file: (global batch, GPUs the file is written for)
IMAGENET = {
    "imagenet_resnet50_32k.json": (32768, 128),
    "imagenet_resnet50_131k.json": (131072, 128),
    "imagenet_resnet50_32k_sgd.json": (32768, 128),
    "imagenet_resnet50_32k_lamb.json": (32768, 128),
}
DIGITS_VARIANTS = {
    # file: (zero stage, precision, accumulation)
    "digits_cpu.json": (0, "fp32", 1),
    "digits_cpu_sgd.json": (0, "fp32", 1),
    "digits_cpu_lamb.json": (0, "fp32", 1),
    "digits_cpu_zero1.json": (1, "fp32", 1),
    "digits_cpu_zero2.json": (2, "fp32", 1),
    "digits_cpu_zero3.json": (3, "fp32", 1),
    "digits_cpu_bf16.json": (0, "bf16", 1),
    "digits_cpu_gas4.json": (0, "fp32", 4),
}
SPNGD_KEYS = {
    "lr", "momentum", "damping", "weight_decay", "fisher", "bn_damping_scale", "weight_rescale",
    "staleness", "comm_dtype",
}  # fmt: skip


def load(name: str) -> dict[str, Any]:
    with open(CONFIG_DIR / name, encoding="utf-8") as f:
        data = json.load(f)
    assert isinstance(data, dict)
    return data


def precision(cfg: dict[str, Any]) -> str:
    if (cfg.get("bf16") or {}).get("enabled"):
        return "bf16"
    if (cfg.get("fp16") or {}).get("enabled"):
        return "fp16"
    return "fp32"


def test_every_expected_config_exists_and_nothing_else() -> None:
    assert {p.name for p in CONFIGS} == set(IMAGENET) | set(DIGITS_VARIANTS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_with_required_keys(path: Path) -> None:
    cfg = load(path.name)
    assert "train_micro_batch_size_per_gpu" in cfg
    assert isinstance(cfg.get("gradient_accumulation_steps", 1), int)
    assert cfg["optimizer"]["type"] in {"SPNGD", "SGD", "pytorch_optimizer.Lamb"}
    assert isinstance(cfg["optimizer"]["params"], dict)
    assert cfg["zero_optimization"]["stage"] in {0, 1, 2, 3}
    assert cfg["wandb"] == {"enabled": True, "project": "spngd_ds"}
    sched = cfg["scheduler"]
    assert sched["type"] in {"SPNGDPolyDecay", "WarmupCosineLR"}
    if cfg["optimizer"]["type"] == "SPNGD":
        # the ImageNet configs capture statistics from one micro-batch per rank (>= 4,096 samples at
        # 128 GPUs: sampling noise of r <= 0.034, bench/step_time.py --regime noise)
        extra = {"stat_micro_batches"} if path.name in IMAGENET else set()
        assert set(cfg["optimizer"]["params"]) == SPNGD_KEYS | extra
        if extra:
            assert cfg["optimizer"]["params"]["stat_micro_batches"] == 1
        assert cfg["optimizer"]["params"]["bn_damping_scale"] == 64.0
        assert cfg["optimizer"]["params"]["weight_decay"] == 0.0
        assert sched["type"] == "SPNGDPolyDecay"
        assert set(sched["params"]) == {"warmup_epochs", "start_epoch", "end_epoch", "power", "steps_per_epoch"}
        assert sched["params"]["steps_per_epoch"] == "auto"
    if precision(cfg) != "fp32":  # DeepSpeed keeps buffers fp32 otherwise, and BatchNorm fails
        assert cfg["data_types"]["buffer_dtype"] == precision(cfg)
    if cfg["zero_optimization"]["stage"] > 0:
        assert cfg["zero_allow_untested_optimizer"] is True
    if cfg["zero_optimization"]["stage"] == 3:
        assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    recipe = pop_recipe(dict(cfg), RECIPE_FLAGS)
    assert set(recipe) <= RECIPE_FLAGS
    filled = fill_auto(cfg, steps_per_epoch=7, total_steps=70)
    assert filled and "auto" not in json.dumps(cfg)


@pytest.mark.parametrize("name", sorted(DIGITS_VARIANTS))
def test_digits_variants(name: str) -> None:
    cfg = load(name)
    stage, prec, gas = DIGITS_VARIANTS[name]
    assert cfg["zero_optimization"]["stage"] == stage
    assert precision(cfg) == prec
    assert cfg.get("gradient_accumulation_steps", 1) == gas
    assert RECIPE_KEY not in cfg  # the digits job's settings are train.py's flag defaults
    layout = batch_layout(cfg, world_size=2)
    assert layout.global_batch in {64}, "every digits variant trains on the same global batch"


def test_digits_variants_differ_from_default_only_where_named() -> None:
    base = load("digits_cpu.json")
    for name in ("digits_cpu_zero1.json", "digits_cpu_zero2.json", "digits_cpu_zero3.json"):
        cfg = load(name)
        assert cfg["optimizer"] == base["optimizer"] and cfg["scheduler"] == base["scheduler"]
    assert load("digits_cpu_bf16.json")["optimizer"] == base["optimizer"]
    assert load("digits_cpu_gas4.json")["optimizer"] == base["optimizer"]


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_global_batch(name: str) -> None:
    cfg = load(name)
    global_batch, gpus = IMAGENET[name]
    assert cfg["train_micro_batch_size_per_gpu"] == 32
    assert cfg["train_batch_size"] == global_batch
    micro, gas = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    assert micro * gas * gpus == global_batch
    assert batch_layout(cfg, world_size=gpus) == (32, gas, global_batch)
    with pytest.raises(ValueError, match="do not fit 2 rank"):
        batch_layout(cfg, world_size=2)
    assert precision(cfg) == "bf16"
    recipe = cfg[RECIPE_KEY]
    assert recipe["dataset"] == "imagefolder" and recipe["model"] == "resnet50" and recipe["image_size"] == 224


@pytest.mark.parametrize("name", ["imagenet_resnet50_32k.json", "imagenet_resnet50_131k.json"])
def test_imagenet_spngd_matches_paper(name: str) -> None:
    cfg = load(name)
    lr, momentum, damping, mixup, power, start, end, epochs = PAPER[cfg["train_batch_size"]]
    opt, sched, recipe = cfg["optimizer"]["params"], cfg["scheduler"]["params"], cfg[RECIPE_KEY]
    assert cfg["optimizer"]["type"] == "SPNGD"
    assert (opt["lr"], opt["momentum"], opt["damping"]) == (lr, momentum, damping)
    assert (sched["power"], sched["start_epoch"], sched["end_epoch"]) == (power, start, end)
    assert (recipe["mixup_alpha"], recipe["epochs"]) == (mixup, epochs)
    assert recipe["bn_gamma_init_std"] == 0.05 and recipe["random_erasing"] > 0


def test_baselines_are_the_same_job() -> None:
    spngd = load("imagenet_resnet50_32k.json")
    lamb = ("imagenet_resnet50_32k_lamb.json", "pytorch_optimizer.Lamb")
    for name, kind in (("imagenet_resnet50_32k_sgd.json", "SGD"), lamb):
        cfg = load(name)
        assert cfg["optimizer"]["type"] == kind
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16"):
            assert cfg[key] == spngd[key]
    sgd = load("imagenet_resnet50_32k_sgd.json")["optimizer"]["params"]
    assert sgd["momentum"] == 0.9
    assert load("digits_cpu_sgd.json")["optimizer"]["type"] == "SGD"


def test_spngd_params_validate_with_the_optimizer_config() -> None:
    spngd_ds = pytest.importorskip("spngd_ds")
    try:
        config_cls = spngd_ds.SPNGDConfig
        poly = spngd_ds.SPNGDPolyDecay
    except (ImportError, AttributeError):
        pytest.skip("spngd_ds core not importable")
    sched_args = set(inspect.signature(poly.__init__).parameters) - {"self", "optimizer", "last_epoch"}
    for path in CONFIGS:
        cfg = load(path.name)
        if cfg["optimizer"]["type"] != "SPNGD":
            continue
        config_cls.model_validate(cfg["optimizer"]["params"])
        assert set(cfg["scheduler"]["params"]) <= sched_args, path.name


_DS_INIT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from spngd_ds.recipes.distenv import ensure_single_process_env
    from spngd_ds.recipes.dsconfig import fill_auto
    ensure_single_process_env()
    import torch, deepspeed
    deepspeed.init_distributed()
    for path in sys.argv[2:]:
        with open(path) as f:
            cfg = json.load(f)
        # DeepSpeed's own keys only: the SP-NGD blocks are the core's business (and its tests').
        cfg["optimizer"] = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}
        cfg["scheduler"] = {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": 1}}
        cfg["wandb"] = {"enabled": False}
        cfg["train_micro_batch_size_per_gpu"] = 4
        fill_auto(cfg, steps_per_epoch=4, total_steps=8)
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
        )
        engine, opt, _, sched = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        for _ in range(engine.gradient_accumulation_steps()):
            x = torch.randn(4, 6, dtype=dtype)
            loss = torch.nn.functional.cross_entropy(engine(x).float(), torch.randint(0, 3, (4,)))
            engine.backward(loss)
            engine.step()
        assert engine.global_steps == 1, engine.global_steps
        print("OK", os.path.basename(path), engine.zero_optimization_stage(), dtype, flush=True)
    from spngd_ds.process_exit import exit_process
    exit_process(0)  # not the interpreter's teardown, which gloo's threads can abort
    """
)


@pytest.mark.dist
@pytest.mark.timeout(450)
def test_deepspeed_accepts_digits_variant_keys() -> None:
    """Each digits variant's batch/ZeRO/precision keys initialise DeepSpeed and take one step."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    paths = [str(CONFIG_DIR / n) for n in sorted(DIGITS_VARIANTS)]
    for _ in range(3):  # a one-process group binds a port found free a moment earlier: retry if taken
        proc = subprocess.run(
            [sys.executable, "-c", _DS_INIT, str(ROOT), *paths],
            capture_output=True, text=True, timeout=400, env=env, cwd=str(ROOT),
        )  # fmt: skip
        if proc.returncode == 0 or not port_taken(proc.stderr):
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ok = [line.split() for line in proc.stdout.splitlines() if line.startswith("OK ")]
    assert [o[1] for o in ok] == sorted(DIGITS_VARIANTS)
    stages = {o[1]: int(o[2]) for o in ok}
    assert stages == {n: DIGITS_VARIANTS[n][0] for n in DIGITS_VARIANTS}


def test_ensure_buffer_dtype() -> None:
    cfg: dict[str, Any] = {"bf16": {"enabled": True}}
    assert ensure_buffer_dtype(cfg, has_batchnorm=False) is None and "data_types" not in cfg
    assert ensure_buffer_dtype(cfg, has_batchnorm=True) == "bf16"
    assert cfg["data_types"] == {"buffer_dtype": "bf16"}
    assert ensure_buffer_dtype(cfg, has_batchnorm=True) is None  # already set: left alone
    fp32: dict[str, Any] = {"bf16": {"enabled": False}}
    assert ensure_buffer_dtype(fp32, has_batchnorm=True) is None and fp32 == {"bf16": {"enabled": False}}
    assert ensure_buffer_dtype({"fp16": {"enabled": True}}, has_batchnorm=True) == "fp16"
