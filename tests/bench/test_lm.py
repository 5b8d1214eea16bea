"""bench/lm.py: the corpus split (by file, deterministic, disjoint) and a 2-rank ``--short`` run's JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.support.distributed import free_port, kill_tagged, without_deprecation_noise

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "lm.py"

pytestmark = pytest.mark.timeout(300)


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_lm", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_lm"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


lm = _load()


def test_source_files_sorted_without_site_packages(tmp_path: Path) -> None:
    for rel in ("b/z.py", "a.py", "site-packages/pkg/x.py", "b/dist-packages/y.py", "c/notes.txt", "b/a.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    assert lm.source_files(tmp_path) == ["a.py", "b/a.py", "b/z.py"]


def test_split_is_by_file_deterministic_and_disjoint() -> None:
    files = lm.source_files(lm.stdlib_root())
    assert len(files) > 100 and files == sorted(files)
    train, val = lm.split_files(files, 0.05)
    assert set(train).isdisjoint(val) and sorted(train + val) == files
    assert 0.02 < len(val) / len(files) < 0.10
    # order-independent: the same split from a shuffled list, and a file's side does not depend on the others
    again_train, again_val = lm.split_files(list(reversed(files)), 0.05)
    assert set(again_train) == set(train) and set(again_val) == set(val)
    assert [f for f in files[:300] if lm.is_validation(f, 0.05)] == [f for f in val if f in set(files[:300])]
    # a larger fraction only moves files from train to validation
    _, val_more = lm.split_files(files, 0.2)
    assert set(val) < set(val_more)


def test_streams_are_the_files_bytes() -> None:
    corpus = lm.load_corpus(0.05, max_files=200)
    root = lm.stdlib_root()
    assert corpus.train_files + corpus.val_files and set(corpus.train_files).isdisjoint(corpus.val_files)
    expected = b"".join((root / f).read_bytes() + lm.SEPARATOR for f in corpus.val_files)
    assert bytes(corpus.val.numpy()) == expected
    first = (root / corpus.train_files[0]).read_bytes()
    assert bytes(corpus.train[: len(first) + 1].numpy()) == first + lm.SEPARATOR
    assert corpus.train.numel() == sum((root / f).stat().st_size + 1 for f in corpus.train_files)
    # windows and the per-step batch: in range, deterministic, the targets are the inputs shifted by one byte
    b1 = lm.train_batch(corpus.train, 3, 8, 16, seed=0)
    assert b1.shape == (8, 17) and 0 <= int(b1.min()) and int(b1.max()) < lm.VOCAB
    assert lm.train_batch(corpus.train, 3, 8, 16, seed=0).equal(b1)
    assert not lm.train_batch(corpus.train, 4, 8, 16, seed=0).equal(b1)
    v = lm.val_windows(corpus.val, 5, 16)
    assert bytes(v[0].to(torch.uint8).numpy()) == expected[:17]


def _run_short(tmp_path: Path, nproc: int) -> subprocess.CompletedProcess[str]:
    tag = uuid.uuid4().hex
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT), SPNGD_TEST_LAUNCH=tag)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(SCRIPT),
        "--short",
        "--json",
        str(tmp_path / "lm.json"),
        "--plot",
        str(tmp_path / "lm.png"),
    ]
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT), start_new_session=True
    ) as popen:
        try:
            out, err = popen.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            kill_tagged(tag)
            popen.communicate()
            raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    assert proc.returncode == 0, f"{out[-4000:]}\n{without_deprecation_noise(err)[-8000:]}"
    return proc


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


@pytest.mark.dist
def test_short_run_on_two_ranks(tmp_path: Path) -> None:
    proc = _run_short(tmp_path, 2)
    res = json.loads((tmp_path / "lm.json").read_text())
    assert (tmp_path / "lm.png").stat().st_size > 10_000
    st = res["setting"]
    assert res["world_size"] == 2
    assert res["batch_sizes"] == {
        "large": st["micro_batch"] * st["accumulation"]["large"] * 2,
        "small": st["micro_batch"] * 2,
    }
    assert st["accumulation"]["large"] > 1
    assert res["corpus"]["train_files"] > 0 and res["corpus"]["val_files"] > 0
    assert 0.5 < res["spngd_coverage"]["fraction"] <= 1.0  # Llama's projections and head are nn.Linear
    for batch_name in ("large", "small"):
        steps = st["steps"][batch_name]
        summ = res["summary"][batch_name]
        assert _finite(summ["target_val_loss"])
        assert set(res["runs"][batch_name]) == {"SP-NGD", "AdamW", "LAMB"}
        for name, per_lr in res["runs"][batch_name].items():
            assert set(per_lr) == {str(lr) for lr in res["lr_grid"]}
            for run in per_lr.values():
                assert not run["diverged"]
                assert run["eval_steps"][0] == 0 and run["eval_steps"][-1] == steps
                assert len(run["val_loss"]) == len(run["eval_steps"]) and all(map(_finite, run["val_loss"]))
                # random init predicts about uniformly over 256 bytes
                assert abs(run["val_loss"][0] - math.log(256)) < 0.3
                assert len(run["train_loss"]) == len(run["seconds"]) == len(run["cpu_seconds"]) == steps
                assert all(map(_finite, run["train_loss"] + run["seconds"] + run["cpu_seconds"]))
                assert run["seconds"] == sorted(run["seconds"]) and run["seconds"][0] > 0
            chosen = summ["optimizers"][name]
            assert chosen["lr"] in res["lr_grid"] and _finite(chosen["final_val_loss"])
        # the better first-order method reaches the target by construction
        assert any(summ["optimizers"][n]["steps_to_target"] is not None for n in ("AdamW", "LAMB"))
    assert "target val loss" in proc.stdout and "SP-NGD" in proc.stdout


def test_spngd_params_flag_adds_and_overrides_keys() -> None:
    a = lm.parse_args(["--spngd_params", '{"damping": 0.01, "stat_micro_batches": null}'])
    st = lm.setting_from(a)
    assert st.spngd_params["damping"] == 0.01 and st.spngd_params["stat_micro_batches"] is None
    assert st.spngd_params["momentum"] == 0.9  # the rest from bench/common.py
    cfg = lm.ds_config_for("SP-NGD", 0.5, st, gas=4)
    assert cfg["optimizer"]["params"]["lr"] == 0.5 and cfg["optimizer"]["params"]["damping"] == 0.01
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 1.0
    assert "optimizer" not in lm.ds_config_for("AdamW", 0.5, st, gas=4)
    with pytest.raises(SystemExit):
        lm.parse_args(["--spngd_params", "[1, 2]"])
