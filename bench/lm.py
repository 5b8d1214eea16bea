"""Steps and wall time to a target validation loss in byte-level language modelling.

SP-NGD against AdamW and LAMB under DeepSpeed, at two global batch sizes.

Corpus: the Python standard library's own source, every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]`` (``site-packages``/``dist-packages`` excluded), sorted by
relative path. A file belongs to validation when the first 8 hex digits of the SHA-1 of its relative
path (POSIX form), read as an integer, fall below ``val_fraction`` * 16**8 (default 0.05): the split
is by file, the same on every machine with the same standard library, and independent of the file
order (CPython 3.11: 1,718 training files, 30.4 MB; 72 validation files, 1.2 MB). Each side is the
concatenation of its files' bytes, each file followed by one NUL byte (vocabulary 256: the byte
values). A sample is a window of ``seq_len + 1`` bytes (default 64 + 1): the model reads the first
``seq_len`` and predicts the last ``seq_len``; the loss is the mean cross-entropy per byte, in nats
(ln 256 = 5.55 for a uniform guess). Training windows start at uniformly random offsets of the
training stream, drawn from a generator seeded by the step number, so every optimizer sees the same
batches; validation is a fixed set of ``--val_windows`` (256) windows at evenly spaced offsets of the
validation stream, split over the ranks.

Model: a Llama (default; untied head; every projection an ``nn.Linear``) or a GPT-2 (HF ``Conv1D``
projections, tied head) built from a ``transformers`` config with random weights, never downloaded,
no dropout. ``small`` (default): width 64, 2 layers, 4 heads, MLP 160 (Llama: 127,296 parameters);
``tiny`` (``--short``): width 16, 1 layer.

Optimizers, each at every lr of one grid (default 1e-3 ... 3 in steps of about 3), no weight decay,
constant lr, gradients clipped at ``--clip`` (1.0) through DeepSpeed's ``gradient_clipping`` (for
SP-NGD that clips the preconditioned gradient's global norm, README "Gradient clipping"):
SP-NGD (``"type": "SPNGD"`` with bench/common.py's parameters: momentum 0.9, damping 1e-3, default
stale statistics; ``--spngd_params`` adds or overrides keys as a JSON dict, so keys of newer
curvature blocks need no code change), ``torch.optim.AdamW`` and ``pytorch_optimizer.Lamb`` (betas
0.9/0.999 both, as DeepSpeed client optimizers). All run on the same ranks, ZeRO 0, fp32, through
``spngd_ds.initialize``. Two global batch sizes: large = ``micro_batch * accumulation * ranks``
windows (16 x 8 x 2 = 256 windows, 16,384 bytes, by gradient accumulation) and small =
``micro_batch * ranks`` (32 windows, 2,048 bytes, one micro-batch); 150 and 450 steps per run.

Target and lr rule (the same for every optimizer, per batch size): every (optimizer, lr) trains for
the same number of steps (a run stops early only when its validation loss is non-finite or above its
loss at initialisation). The target validation loss is the lowest validation loss any AdamW or LAMB
run reached, plus ``--target_slack`` (0.02) nats/byte, so the better first-order method reaches it
by construction, near the end of its budget. Each optimizer's lr is the one with the fewest steps to
the target (validation every ``--eval_every`` (5) steps at the large batch, ``--eval_every_small``
(15) at the small one; ties go to the lower final validation loss, then the smaller lr). Wall time to
the target is the time in forward, backward and step (evaluation excluded), the slowest rank's; the
CPU seconds of the same work are recorded too (the busiest rank's process time), which is about the
wall time the run would take on idle cores.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/lm.py           # the full benchmark
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/lm.py --short   # smoke test, seconds
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/lm.py --spngd_params '{"damping": 1e-2}'

Writes ``bench/results/lm.json`` and ``docs/lm_benchmark.png`` (other paths: ``--json``, ``--plot``).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_report import TARGET_RATIO, plot, print_report, summarise, write_results  # noqa: E402
from torch import nn  # noqa: E402

VOCAB = 256
SEPARATOR = b"\0"
OPTIMIZERS = ("SP-NGD", "AdamW", "LAMB")
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
EXCLUDED_DIRS = ("site-packages", "dist-packages")

#: model sizes: hidden width, layers, heads, MLP width (Llama; GPT-2 uses 4 x width)
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"width": 16, "layers": 1, "heads": 2, "mlp": 32},
    "small": {"width": 64, "layers": 2, "heads": 4, "mlp": 160},
}


# ----------------------------------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[str]:
    """List the ``*.py`` files under ``root``.

    Relative POSIX paths of every ``*.py`` file under ``root``, sorted, without third-party package
    directories (:data:`EXCLUDED_DIRS`).
    """
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts) or not p.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def is_validation(rel: str, val_fraction: float) -> bool:
    """Whether the file at relative path ``rel`` belongs to validation.

    The first 32 bits of SHA-1(``rel``) below ``val_fraction`` of their range (deterministic,
    order-independent).
    """
    return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) < val_fraction * 16**8


def split_files(files: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) relative paths, each in the order of ``files``."""
    val = [f for f in files if is_validation(f, val_fraction)]
    train = [f for f in files if not is_validation(f, val_fraction)]
    return train, val


@dataclass
class Corpus:
    """The two byte streams (uint8, 1-D) and the files each was built from."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: list[str]
    val_files: list[str]

    def summary(self) -> dict[str, Any]:
        return {
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "train_bytes": int(self.train.numel()),
            "val_bytes": int(self.val.numel()),
        }


def read_stream(root: Path, files: list[str]) -> torch.Tensor:
    """The bytes of ``files`` (relative to ``root``) concatenated, each followed by :data:`SEPARATOR`."""
    data = bytearray()
    for rel in files:
        data += (root / rel).read_bytes()
        data += SEPARATOR
    return torch.frombuffer(data, dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


def load_corpus(val_fraction: float, max_files: int | None = None, root: Path | None = None) -> Corpus:
    """The split corpus.

    ``max_files``: only the first that many files of the sorted list (a smoke test); the split of each file does not
    depend on it.
    """
    root = root or stdlib_root()
    files = source_files(root)[:max_files]
    train, val = split_files(files, val_fraction)
    if not train or not val:
        raise ValueError(f"{len(files)} files under {root} give {len(train)} training and {len(val)} validation files")
    return Corpus(read_stream(root, train), read_stream(root, val), train, val)


def windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Rows ``stream[s : s + length]`` for each start, as int64 token ids (len(starts), length)."""
    return stream[starts[:, None] + torch.arange(length)].long()


def train_batch(stream: torch.Tensor, step: int, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """The global batch of training step ``step``.

    ``count`` windows of ``seq_len + 1`` bytes at uniformly random offsets (the same for every
    optimizer and rank).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - seq_len - 1, (count,), generator=gen)
    return windows(stream, starts, seq_len + 1)


def val_windows(stream: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """``count`` validation windows of ``seq_len + 1`` bytes at evenly spaced offsets."""
    starts = torch.linspace(0, stream.numel() - seq_len - 2, count).long()
    return windows(stream, starts, seq_len + 1)


# ------------------------------------------------------------------------------------------ model


def build_lm(kind: str, size: str, seq_len: int, seed: int) -> nn.Module:
    """A randomly initialised causal LM from a ``transformers`` config (nothing downloaded).

    ``kind``: ``"llama"`` (untied head) or ``"gpt2"`` (tied head); ``size``: a key of :data:`SIZES`.
    """
    s = SIZES[size]
    torch.manual_seed(seed)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=s["width"],
            intermediate_size=s["mlp"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["heads"],
            max_position_embeddings=seq_len,
            tie_word_embeddings=False,
            attention_dropout=0.0,
            use_cache=False,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        )
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg2 = GPT2Config(
            vocab_size=VOCAB,
            n_positions=seq_len,
            n_embd=s["width"],
            n_layer=s["layers"],
            n_head=s["heads"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            bos_token_id=None,
            eos_token_id=None,
        )
        cfg2._attn_implementation = "sdpa"
        return GPT2LMHeadModel(cfg2)
    raise ValueError(f"unknown model {kind!r}; use llama or gpt2")


def lm_loss(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of windows ``ids`` (N, T + 1)."""
    logits = model(input_ids=ids[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def curvature_coverage(opt: Any, model: nn.Module) -> dict[str, Any]:
    """Share of the trainable parameters inside a curvature block of SP-NGD ``opt``.

    Share of the trainable parameters inside a curvature block of SP-NGD ``opt``, and the layers it
    updates first order.
    """
    total = common.param_count(model)
    covered = sum(p.numel() for b in opt.blocks.values() if b.stats for p in b.params)
    return {
        "fraction": covered / total,
        "covered_params": covered,
        "total_params": total,
        "first_order_layers": list(opt.first_order_layers),
    }


# -------------------------------------------------------------------------------------- training


@dataclass
class Setting:
    """What one benchmark invocation trains (the same for every optimizer)."""

    model: str
    size: str
    seq_len: int
    micro_batch: int
    accumulation: dict[str, int]
    steps: dict[str, int]
    eval_every: dict[str, int]
    val_windows: int
    clip: float
    seed: int
    spngd_params: dict[str, Any]


@dataclass
class Run:
    """Run one (optimizer, lr, batch) configuration.

    One (optimizer, lr, batch) run: validation loss at ``eval_steps``, per-step training loss (rank
    0's micro-batches, mean), cumulative training seconds and CPU seconds of forward, backward and
    step (slowest rank), and the whole run's wall and CPU seconds (engine set-up and validation
    included; CPU: the busiest rank's process time, about the wall time on idle cores).
    """

    lr: float
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    run_wall_s: float = 0.0
    run_cpu_s: float = 0.0
    diverged: bool = False
    coverage: dict[str, Any] | None = None

    def steps_to(self, target: float) -> int | None:
        """First evaluated step whose validation loss is at or below ``target``."""
        return next((s for s, v in zip(self.eval_steps, self.val_loss, strict=True) if v <= target), None)

    def seconds_to(self, target: float) -> float | None:
        s = self.steps_to(target)
        return None if s is None else (self.seconds[s - 1] if s > 0 else 0.0)

    def final(self) -> float:
        return self.val_loss[-1] if self.val_loss and not self.diverged else math.inf


def ds_config_for(name: str, lr: float, st: Setting, gas: int) -> dict[str, Any]:
    """The DeepSpeed config of one run (SP-NGD's optimizer block, or none for a client optimizer)."""
    block = common.spngd_block(staleness=True, **(st.spngd_params | {"lr": lr}))
    cfg = common.ds_config(block, st.micro_batch, stage=0, gas=gas)
    cfg["gradient_clipping"] = st.clip
    if name != "SP-NGD":
        del cfg["optimizer"]
    return cfg


def client_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer | None:
    """AdamW or LAMB over ``model``'s parameters (None for SP-NGD, which DeepSpeed builds)."""
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    if name == "LAMB":
        import pytorch_optimizer

        return pytorch_optimizer.Lamb(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    return None


def validation_loss(model: nn.Module, val: torch.Tensor, rank: int, world: int, chunk: int) -> float:
    """Mean per-byte loss over all validation windows (each rank evaluates its share; summed)."""
    mine = val[rank::world]
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for lo in range(0, mine.shape[0], chunk):
            ids = mine[lo : lo + chunk]
            total[0] += float(lm_loss(model, ids)) * ids.shape[0]
            total[1] += ids.shape[0]
    model.train()
    if world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1])


def train_run(
    name: str, lr: float, batch_name: str, st: Setting, corpus: Corpus, val: torch.Tensor, rank: int, world: int
) -> Run:
    """Train one fresh model with optimizer ``name`` at ``lr`` for ``st.steps[batch_name]`` steps."""
    import spngd_ds

    run_start, run_cpu = time.perf_counter(), time.process_time()
    gas = st.accumulation[batch_name]
    model = build_lm(st.model, st.size, st.seq_len, st.seed)
    opt_in = client_optimizer(name, model, lr)
    engine, opt, _, _ = spngd_ds.initialize(
        model=model, optimizer=opt_in, model_parameters=model.parameters(), config=ds_config_for(name, lr, st, gas)
    )
    run = Run(lr=lr)
    if name == "SP-NGD":
        run.coverage = curvature_coverage(opt, model)
    glob = st.micro_batch * gas * world
    chunk = max(st.micro_batch, 1)
    initial = validation_loss(engine.module, val, rank, world, chunk)
    run.eval_steps.append(0)
    run.val_loss.append(initial)
    times: list[tuple[float, float]] = []
    for step in range(1, st.steps[batch_name] + 1):
        ids = train_batch(corpus.train, step - 1, glob, st.seq_len, st.seed)
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        losses = []
        for mb in range(gas):
            lo = (mb * world + rank) * st.micro_batch
            loss = lm_loss(engine, ids[lo : lo + st.micro_batch])
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        times.append((time.perf_counter() - start, time.process_time() - cpu))
        run.train_loss.append(sum(losses) / len(losses))
        if step % st.eval_every[batch_name] == 0 or step == st.steps[batch_name]:
            v = validation_loss(engine.module, val, rank, world, chunk)
            run.eval_steps.append(step)
            run.val_loss.append(v)
            if not math.isfinite(v) or v > initial:
                run.diverged = True
                break
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (times, time.process_time() - run_cpu))
    spent, spent_cpu = 0.0, 0.0
    for per_step in zip(*(g[0] for g in gathered), strict=True):
        spent += max(t[0] for t in per_step)
        spent_cpu += max(t[1] for t in per_step)
        run.seconds.append(spent)
        run.cpu_seconds.append(spent_cpu)
    run.run_cpu_s = max(g[1] for g in gathered)
    run.run_wall_s = time.perf_counter() - run_start
    del engine, opt, model, opt_in
    gc.collect()
    return run


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="smoke test: tiny model, one lr, a few steps")
    p.add_argument("--model", default="llama", choices=["llama", "gpt2"])
    p.add_argument("--size", default=None, choices=list(SIZES), help="default: small (tiny with --short)")
    p.add_argument("--seq_len", type=int, default=None, help="bytes read per window (default 64; 16 with --short)")
    p.add_argument("--micro_batch", type=int, default=None, help="windows per rank per micro-batch (default 16)")
    p.add_argument(
        "--accumulation",
        type=int,
        default=None,
        help="micro-batches per step of the large batch (default 8; the small batch has 1)",
    )
    p.add_argument("--steps_large", type=int, default=None, help="steps of every large-batch run (default 150)")
    p.add_argument("--steps_small", type=int, default=None, help="steps of every small-batch run (default 450)")
    p.add_argument("--batches", nargs="+", default=["large", "small"], choices=["large", "small"])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--lrs", type=float, nargs="+", default=None, help=f"lr grid (default {LR_GRID})")
    p.add_argument("--eval_every", type=int, default=None, help="large batch: steps between validations (default 5)")
    p.add_argument(
        "--eval_every_small", type=int, default=None, help="small batch: steps between validations (default 15)"
    )
    p.add_argument("--val_windows", type=int, default=None, help="validation windows (default 256)")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of files (by path hash) for validation")
    p.add_argument(
        "--max_files",
        type=int,
        default=None,
        help="first files of the sorted list only (default all; 200 with --short)",
    )
    p.add_argument("--target_slack", type=float, default=0.02, help="nats/byte above the best first-order loss")
    p.add_argument(
        "--target_from",
        type=Path,
        default=None,
        help="take each batch size's target from this results file (runs of SP-NGD variants alone)",
    )
    p.add_argument("--clip", type=float, default=1.0, help="DeepSpeed gradient_clipping for every optimizer")
    p.add_argument(
        "--spngd_params",
        type=json.loads,
        default={},
        help="JSON dict of extra SP-NGD keyword arguments, e.g. '{\"positions_as_samples\": true}'",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=common.RESULTS_DIR / "lm.json")
    p.add_argument("--plot", type=Path, default=common.DOCS_DIR / "lm_benchmark.png")
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args(argv)
    if not isinstance(a.spngd_params, dict):
        p.error("--spngd_params must be a JSON object")
    short = a.short
    defaults = {
        "size": "tiny" if short else "small",
        "seq_len": 16 if short else 64,
        "micro_batch": 2 if short else 16,
        "accumulation": 2 if short else 8,
        "steps_large": 3 if short else 150,
        "steps_small": 4 if short else 450,
        "eval_every": 2 if short else 5,
        "eval_every_small": 2 if short else 15,
        "val_windows": 8 if short else 256,
        "lrs": [1e-3] if short else list(LR_GRID),
        "max_files": 200 if short else None,
    }
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def setting_from(a: argparse.Namespace) -> Setting:
    return Setting(
        model=a.model,
        size=a.size,
        seq_len=a.seq_len,
        micro_batch=a.micro_batch,
        accumulation={"large": a.accumulation, "small": 1},
        steps={"large": a.steps_large, "small": a.steps_small},
        eval_every={"large": a.eval_every, "small": a.eval_every_small},
        val_windows=a.val_windows,
        clip=a.clip,
        seed=a.seed,
        spngd_params=dict(common.SPNGD_PARAMS) | a.spngd_params,
    )


def main(argv: list[str] | None = None) -> None:
    """Sweep every optimizer over the grid at each batch size, pick, print, write JSON and the plot."""
    a = parse_args(argv)
    common.prepare_environment()
    torch.set_num_threads(1)
    # high learning rates make SP-NGD reject statistics and log each time: expected in a sweep
    logging.getLogger("spngd_ds").setLevel(logging.ERROR)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    wall = time.perf_counter()
    st = setting_from(a)
    corpus = load_corpus(a.val_fraction, a.max_files)
    val = val_windows(corpus.val, a.val_windows, st.seq_len)
    sizes = {b: st.micro_batch * st.accumulation[b] * world for b in a.batches}
    res: dict[str, Any] = {
        "setting": asdict(st),
        "world_size": world,
        "lr_grid": list(a.lrs),
        "target_slack": a.target_slack,
        "target_ratio": TARGET_RATIO,
        "val_fraction": a.val_fraction,
        "corpus": corpus.summary(),
        "batch_sizes": sizes,
        "tokens_per_step": {b: n * st.seq_len for b, n in sizes.items()},
        "model_params": common.param_count(build_lm(st.model, st.size, st.seq_len, st.seed)),
        "runs": {},
        "summary": {},
    }
    for batch_name in a.batches:
        runs: dict[str, dict[float, Run]] = {}
        for name in a.optimizers:
            runs[name] = {}
            for lr in a.lrs:
                r = train_run(name, lr, batch_name, st, corpus, val, rank, world)
                runs[name][lr] = r
                if rank == 0:
                    print(
                        f"{batch_name} {name} lr {lr:g}: val {r.val_loss[0]:.3f} -> {r.val_loss[-1]:.3f} "
                        f"(step {r.eval_steps[-1]}{', diverged' if r.diverged else ''}), "
                        f"{r.seconds[-1] / max(len(r.seconds), 1) * 1e3:.0f} ms/step "
                        f"({r.cpu_seconds[-1] / max(len(r.cpu_seconds), 1) * 1e3:.0f} CPU), run {r.run_wall_s:.0f} s "
                        f"({r.run_cpu_s:.0f} CPU), {time.perf_counter() - wall:.0f} s",
                        flush=True,
                    )
        res["runs"][batch_name] = {n: {str(lr): asdict(r) for lr, r in g.items()} for n, g in runs.items()}
        given = json.loads(a.target_from.read_text())["summary"][batch_name] if a.target_from else None
        fixed = given["target_val_loss"] if given is not None else None
        res["summary"][batch_name] = summarise(runs, a.target_slack, tuple(a.lrs), fixed)
        cov = next((r.coverage for r in runs.get("SP-NGD", {}).values() if r.coverage), None)
        if cov is not None:
            res["spngd_coverage"] = cov
        if rank == 0 and batch_name != a.batches[-1]:  # what is done so far survives a stopped run
            write_results(a.json, {**res, "machine": common.machine_info(), "partial": True})
    res["machine"] = common.machine_info()
    res["wall_s"] = time.perf_counter() - wall
    res["runs_cpu_s"] = sum(r["run_cpu_s"] for per in res["runs"].values() for g in per.values() for r in g.values())
    if rank == 0:
        print_report(res)
        write_results(a.json, res)
        plot(res, a.plot)
        print(f"wrote {a.json} and {a.plot}; wall {res['wall_s']:.0f} s", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
    from spngd_ds.process_exit import exit_process

    exit_process(0)  # not the interpreter's teardown, which gloo's threads can abort
