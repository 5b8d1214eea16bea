"""launch/train.py end to end with the SGD digits config.

Plain python, torchrun and the deepspeed launcher; summary line, checkpoints, offline W&B run, and
an exact resume.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spngd_ds.recipes.distenv import free_port
from tests.support.distributed import port_taken
from tests.support.train_job import ROOT, SUMMARY, TRAIN, checkpoint_weights, job_env, parse_summary, run_job

SGD_CONFIG = str(ROOT / "ds_configs" / "digits_cpu_sgd.json")


pytestmark = pytest.mark.dist


def _train(ckpt: Path, *extra: str) -> list[str]:
    return [
        TRAIN, "--deepspeed_config", SGD_CONFIG, "--checkpoint_dir", str(ckpt), "--no_progress",
        "--log_interval", "2", *extra,
    ]  # fmt: skip


@pytest.mark.timeout(300)
def test_plain_python_summary_checkpoint_wandb(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, *_train(ckpt, "--max_steps", "6", "--checkpoint_interval", "3", "--eval_interval", "3")]
    out = run_job(cmd, cwd=tmp_path, wandb_mode="offline")
    steps, epochs, best, final = parse_summary(out)
    assert steps == 6 and abs(epochs - 6 / 44) < 0.01  # 1437 // 32 = 44 steps per epoch on one rank
    assert 0.0 <= final <= best <= 100.0
    assert re.findall(r"^step (\d+) epoch [\d.]+: val_top1=", out, re.M) == ["3", "6"]
    assert (ckpt / "latest").read_text().strip() == "step6"
    assert (ckpt / "step3" / "mp_rank_00_model_states.pt").is_file()
    assert (ckpt / "step6" / "mp_rank_00_model_states.pt").is_file()
    runs = sorted((ckpt / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((ckpt / "wandb").iterdir()) if (ckpt / "wandb").exists() else "no wandb dir"
    assert any(runs[0].rglob("*.wandb"))


@pytest.mark.timeout(400)
def test_resume_continues_exactly(tmp_path: Path) -> None:
    """6 steps straight == 3 steps, stop, resume, 3 more (same batches, augmentation, lr schedule)."""
    aug = ["--mixup_alpha", "0.4", "--random_erasing", "0.25", "--eval_interval", "100"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_job([sys.executable, *_train(straight, "--max_steps", "6", *aug)], cwd=tmp_path)
    run_job([sys.executable, *_train(split, "--max_steps", "3", *aug)], cwd=tmp_path)
    out = run_job([sys.executable, *_train(split, "--max_steps", "6", "--resume", *aug)], cwd=tmp_path)
    assert "resume: step 3, epoch 0, batch 3" in out
    assert parse_summary(out)[0] == 6
    a, b = checkpoint_weights(straight, "step6"), checkpoint_weights(split, "step6")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.timeout(300)
def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    out = run_job([sys.executable, *_train(tmp_path / "none", "--max_steps", "2", "--resume")], cwd=tmp_path)
    assert "no checkpoint" in out and parse_summary(out)[0] == 2


@pytest.mark.timeout(300)
def test_torchrun_two_ranks(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        *_train(tmp_path / "ckpt", "--max_steps", "4"),
    ]  # fmt: skip
    out = run_job(cmd, cwd=tmp_path)
    assert "2 rank(s), global batch 64 = 32 x 1 x 2, 22 steps/epoch" in out
    assert len(SUMMARY.findall(out)) == 1  # rank 0 only
    assert parse_summary(out)[0] == 4
    assert "(n=360)" in out  # evaluation covers the whole validation set across the two ranks


@pytest.mark.timeout(300)
def test_deepspeed_launcher_two_ranks(tmp_path: Path) -> None:
    for attempt in range(3):  # the port is free when chosen; another process may bind it first
        cmd = [
            sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
            *_train(tmp_path / f"ckpt{attempt}", "--max_steps", "2"),
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=240)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or not port_taken(out):
            break
    assert proc.returncode == 0, out[-4000:]
    assert "2 rank(s), global batch 64" in out and parse_summary(out)[0] == 2


def _variant(tmp_path: Path, **changes: object) -> str:
    with open(SGD_CONFIG, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.timeout(300)
def test_accumulation_bf16_zero2(tmp_path: Path) -> None:
    """Optimizer steps count boundaries only; bf16 inputs are cast; ZeRO-2 partitions the SGD state."""
    config = _variant(
        tmp_path,
        train_micro_batch_size_per_gpu=8,
        gradient_accumulation_steps=4,
        bf16={"enabled": True},
        zero_optimization={"stage": 2},
        zero_allow_untested_optimizer=True,
    )
    cmd = [sys.executable, TRAIN, "--deepspeed_config", config, "--checkpoint_dir", str(tmp_path / "ckpt"),
           "--no_progress", "--max_steps", "3", "--log_interval", "1"]  # fmt: skip
    out = run_job(cmd, cwd=tmp_path)
    assert 'set "data_types": {"buffer_dtype": "bf16"}' in out  # else BatchNorm fails on fp32 buffers
    assert "global batch 32 = 8 x 4 x 1, 44 steps/epoch" in out  # 1437 // 8 = 179 micro-batches -> 44 steps
    steps, epochs, _, _ = parse_summary(out)
    assert steps == 3 and abs(epochs - 3 / 44) < 0.01
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step3"


@pytest.mark.timeout(300)
def test_imagefolder_with_a_torchvision_model(tmp_path: Path) -> None:
    """The ImageNet code path on a generated tree: ImageFolder transforms, resnet18, loader workers."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            folder = tmp_path / "data" / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", format="JPEG")
    config = _variant(tmp_path, train_micro_batch_size_per_gpu=4)
    cmd = [sys.executable, TRAIN, "--deepspeed_config", config, "--no_checkpoint", "--no_progress",
           "--dataset", "imagefolder", "--data_path", str(tmp_path / "data"), "--model", "resnet18",
           "--image_size", "32", "--num_workers", "1", "--epochs", "2", "--bn_gamma_init_std", "0.05",
           "--mixup_alpha", "0.6", "--random_erasing", "0.5"]  # fmt: skip
    out = run_job(cmd, cwd=tmp_path)
    assert "train: imagefolder 12/12 samples, model resnet18" in out
    assert re.findall(r"^step (\d+) epoch [\d.]+: val_top1=[\d.]+% val_loss=[\d.]+ \(n=12\)", out, re.M) == ["3", "6"]
    assert parse_summary(out)[0] == 6
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.timeout(600)
def test_bad_setups_fail_with_one_clear_line(tmp_path: Path) -> None:
    cases = [
        (["--deepspeed_config", str(ROOT / "ds_configs" / "imagenet_resnet50_32k.json"), "--data_path",
          str(tmp_path / "nothere")], "nothere/train' does not exist"),
        (["--deepspeed_config", str(ROOT / "ds_configs" / "imagenet_resnet50_32k.json"), "--dataset", "digits",
          "--model", "small_resnet", "--image_size", "32"], "batch keys do not fit 1 rank(s)"),
        (["--deepspeed_config", SGD_CONFIG, "--model", "resnet51"], "unknown model 'resnet51'"),
        (["--deepspeed_config", str(tmp_path / "missing.json")], "missing.json' does not exist"),
    ]  # fmt: skip
    for args, message in cases:
        proc = subprocess.run(
            [sys.executable, TRAIN, "--no_checkpoint", *args], cwd=tmp_path, env=job_env(), capture_output=True,
            text=True, timeout=200,
        )  # fmt: skip
        assert proc.returncode != 0
        assert message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
