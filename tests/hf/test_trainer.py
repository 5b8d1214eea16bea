"""SP-NGD inside a real ``transformers.Trainer`` (``TrainingArguments(deepspeed=...)``) on the CPU.

The Trainer builds the engine itself (through Accelerate, which calls ``deepspeed.initialize``), so
the only SP-NGD code a user adds is ``spngd_ds.patch_deepspeed()``. Each case runs this file as a
script under ``torch.distributed.run`` (1 or 2 gloo ranks) in a subprocess with a timeout, and
checks what the Trainer ended up with: its optimizer unwraps to :class:`spngd_ds.SPNGD` (the engine's
client optimizer too), SP-NGD stepped once per Trainer step on the path its ZeRO stage implies, the
loss went down, and with 2 ranks the curvature blocks are owned by both ranks.

Run by hand: ``python -m torch.distributed.run --nproc_per_node 2 tests/hf/test_trainer.py --stage 3
--zero-init --out /tmp/r.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MICRO = 32  # per-rank batch (explicit: "auto" breaks with 2 CPU ranks, see DEEPSPEED_NOTES)
STEPS = 8
LR = 0.05

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


pytestmark = pytest.mark.dist


# ----------------------------------------------------------------------------------------- worker
def ds_config(stage: int, poly: bool = False, fp16: bool = False) -> dict[str, Any]:
    """A DeepSpeed config with the SP-NGD optimizer block a Trainer user writes.

    ``"lr": "auto"`` takes ``TrainingArguments.learning_rate``.
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "SPNGD", "params": {"lr": "auto", "momentum": 0.9, "damping": 1e-2}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1000,
    }
    if stage > 0:
        cfg["zero_allow_untested_optimizer"] = True
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every layer
    if poly:
        cfg["scheduler"] = {
            "type": "SPNGDPolyDecay",
            "params": {"warmup_epochs": 0.0, "start_epoch": 0.5, "end_epoch": 4.0, "power": 2.0, "steps_per_epoch": 4},
        }
    if fp16:
        cfg["fp16"] = {"enabled": "auto"}  # TrainingArguments(fp16=True) fills it in
    return cfg


def _build_model() -> Any:
    import torch
    from torch import nn

    class TinyImageClassifier(nn.Module):
        """Conv2d + BatchNorm + Linear on 8x8 grey digits; HF-style forward (dict with loss, logits)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, kernel_size=3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 4 * 4, 10)

        def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            h = torch.relu(self.bn(self.conv(pixel_values)))
            logits = self.fc(nn.functional.max_pool2d(h, 2).flatten(1))
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits, labels)
            return out

    return TinyImageClassifier()


def _path_name(path: Any) -> str:
    """The path's name, "fast" or "compatible" (from the path object the engine wiring installed)."""
    name = path if isinstance(path, str) or path is None else type(path).__name__
    return str(name).lower().removesuffix("path")


def _lm_data(n: int = 128, t: int = 16) -> list[dict[str, Any]]:
    """Token sequences with a learnable rule (arithmetic progressions mod the vocabulary)."""
    import torch

    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 256, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(t)) % 256
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def run_case(
    stage: int, zero_init: bool, poly: bool, fp16: bool, steps: int, out_dir: str, model_kind: str = "digits"
) -> dict[str, Any]:
    """Train with a real Trainer and report what it used (runs on every rank)."""
    import torch
    import torch.distributed as dist

    import spngd_ds

    spngd_ds.patch_deepspeed()
    spngd_ds.patch_deepspeed()  # a second call is harmless
    import deepspeed
    from transformers import Trainer, TrainingArguments

    from spngd_ds.deepspeed.patch import is_patched
    from spngd_ds.recipes.data import load_digits_split

    torch.manual_seed(0)
    cfg = ds_config(stage, poly=poly, fp16=fp16)
    args = TrainingArguments(
        output_dir=out_dir,
        deepspeed=cfg,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LR,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        fp16=fp16,
    )
    if model_kind == "digits":
        train, _ = load_digits_split(image_size=8)
        data = [{"pixel_values": x, "labels": y} for x, y in train]  # type: ignore[attr-defined]
        build = _build_model
    else:  # a tiny HF language model from its config
        from tests.support import hf_tiny

        data = _lm_data()

        def build() -> Any:
            return hf_tiny.build(model_kind)

    if zero_init:  # what from_pretrained does under an active ZeRO-3 config
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = build()
    else:
        model = build()
    built_partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    trainer = Trainer(model=model, args=args, train_dataset=data)
    try:
        trainer.train()
    except ValueError as exc:
        return {"error": str(exc)}
    wrapper = trainer.optimizer
    inner: Any = getattr(wrapper, "optimizer", wrapper)
    engine = trainer.model_wrapped
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {
        "optimizer_type": f"{type(inner).__module__}.{type(inner).__qualname__}",
        "is_spngd": isinstance(inner, spngd_ds.SPNGD),
        "client_is_spngd": getattr(engine, "client_optimizer", None) is inner,
        "step_count": int(inner.step_count),
        "path": _path_name(getattr(inner, "path", None)),
        "owners": sorted(set(inner.assignment.values())),
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "zero_stage": int(engine.zero_optimization_stage()),  # type: ignore[operator]
        "built_partitioned": built_partitioned,
        "scheduler_type": type(getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)).__name__,
        "losses": losses,
        "patched": is_patched(),
        "first_order_layers": list(inner.first_order_layers),
        "block_kinds": sorted({b.kind for b in inner.blocks.values()}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--zero-init", action="store_true")
    p.add_argument("--poly", action="store_true")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--model", default="digits", choices=["digits", "gpt2", "llama"])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    result = run_case(a.stage, a.zero_init, a.poly, a.fp16, a.steps, os.path.dirname(a.out) or ".", a.model)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(a.out).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------ tests
class RunFailed(AssertionError):  # noqa: N818 - a test outcome, not an error of the code
    """A Trainer run exited non-zero; ``log`` holds its whole output (the message only its tail)."""

    def __init__(self, returncode: int | None, log: str) -> None:
        super().__init__(f"Trainer run failed ({returncode}):\n{log[-6000:]}")
        self.log = log


def launch(nproc: int, tmp_path: Path, *args: str, timeout: float = 300.0) -> dict[str, Any]:
    """Run this file on ``nproc`` ranks.

    Rank 0's JSON result (every rank killed on timeout; a run takes 45-95 s on 2 busy cores).
    """
    out = tmp_path / "result.json"
    from tests.support.distributed import STANDALONE, kill_tagged

    tag = uuid.uuid4().hex  # marks every process of this launch (torchrun detaches its ranks)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT), SPNGD_TEST_LAUNCH=tag)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *STANDALONE,
        f"--nproc_per_node={nproc}",
        str(Path(__file__).resolve()),
        *args,
        "--out",
        str(out),
    ]
    with subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(tmp_path),
        start_new_session=True,
    ) as popen:
        try:
            log, _ = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            kill_tagged(tag)  # ranks in sessions of their own would keep the pipe open
            popen.communicate()
            raise
    if popen.returncode != 0 or not out.exists():
        raise RunFailed(popen.returncode, log)
    return dict(json.loads(out.read_text()))


def _check_trained(r: dict[str, Any], world: int, stage: int) -> None:
    assert "error" not in r, r["error"] if "error" in r else ""
    assert r["optimizer_type"] == "spngd_ds.optimizer.SPNGD" and r["is_spngd"], r
    assert r["client_is_spngd"], "the engine's client optimizer is not the SPNGD object the Trainer holds"
    assert r["step_count"] == STEPS, r  # one SP-NGD step per Trainer step
    assert r["path"] == ("fast" if stage == 0 else "compatible"), r
    assert r["zero_stage"] == stage and r["world"] == world, r
    assert r["owners"] == list(range(world)), r  # curvature sharded over every rank
    losses = r["losses"]
    assert len(losses) == STEPS, losses
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], f"loss did not go down: {losses}"


def test_trainer_one_rank_stage0_with_spngd_scheduler(tmp_path: Path) -> None:
    r = launch(1, tmp_path, "--stage", "0", "--poly")
    _check_trained(r, world=1, stage=0)
    assert r["scheduler_type"] == "SPNGDPolyDecay", r


def test_trainer_two_ranks_stage0(tmp_path: Path) -> None:
    r = launch(2, tmp_path, "--stage", "0")
    _check_trained(r, world=2, stage=0)
    assert r["scheduler_type"] != "SPNGDPolyDecay", r  # HF's own schedule drives SP-NGD's lr


def test_trainer_two_ranks_zero3_model_built_under_zero_init(tmp_path: Path) -> None:
    # what from_pretrained does when a ZeRO-3 config is active: parameters are (0,) placeholders
    r = launch(2, tmp_path, "--stage", "3", "--zero-init")
    assert r["built_partitioned"], "the model was not built under deepspeed.zero.Init"
    _check_trained(r, world=2, stage=3)


@pytest.mark.parametrize(("kind", "stage"), [("gpt2", 0), ("llama", 0), ("gpt2", 3), ("llama", 3)])
def test_trainer_two_ranks_language_models(tmp_path: Path, kind: str, stage: int) -> None:
    """Tiny HF GPT-2 (Conv1D, LayerNorm, Embedding; tied head) and Llama (RMSNorm, untied head) on 2 ranks.

    At ZeRO 3 built under zero.Init (shapes from ds_shape).
    """
    args = ["--stage", str(stage), "--model", kind] + (["--zero-init"] if stage == 3 else [])
    r = launch(2, tmp_path, *args, timeout=300.0)
    assert "error" not in r, r["error"] if "error" in r else ""
    assert r["is_spngd"] and r["step_count"] == STEPS and r["world"] == 2 and r["zero_stage"] == stage, r
    assert r["path"] == ("fast" if stage == 0 else "compatible"), r
    assert r["built_partitioned"] == (stage == 3), r
    assert r["owners"] == [0, 1], r
    # every layer has curvature but the tied embedding / head
    assert all("shares a parameter" in line for line in r["first_order_layers"]), r["first_order_layers"]
    expected = {"kron", "norm", "embedding", "plain"} if kind == "gpt2" else {"kron", "norm", "embedding"}
    assert expected <= set(r["block_kinds"]) | {"plain"}, r["block_kinds"]
    losses = r["losses"]
    assert all(x == x for x in losses) and sum(losses[-2:]) / 2 < 0.97 * losses[0], f"loss did not go down: {losses}"


def test_trainer_refused_combination_has_spngd_error(tmp_path: Path) -> None:
    from spngd_ds.deepspeed.integration import check_combination

    cfg = ds_config(0, fp16=True)
    cfg["fp16"]["enabled"] = True
    with pytest.raises(ValueError) as direct:
        check_combination(cfg)
    r = launch(1, tmp_path, "--stage", "0", "--fp16", "--steps", "1")
    assert r.get("error") == str(direct.value), r


if __name__ == "__main__":
    from spngd_ds.process_exit import exit_process

    exit_process(main())
