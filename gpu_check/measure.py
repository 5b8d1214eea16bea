"""What one SP-NGD step costs on the device, against momentum SGD: host synchronisations and steps.

Standalone ``spngd_ds.SPNGD`` (no DeepSpeed) on a torchvision ResNet, one process, two parts::

    python gpu_check/measure.py syncs  --out DIR   # host reads in a step, SP-NGD and SGD
    python gpu_check/measure.py timing --out DIR   # step times, bf16, gradient accumulation
    python gpu_check/measure.py timing --out DIR --dry-run   # either part on the CPU, tiny sizes

``syncs``: ResNet-50 (fp32, 2 images of 32x32: the count does not depend on the size) takes a
first step, then a step in which every statistic is due ("refresh") and one in which none is
("quiet"). Each is counted three ways: host synchronisations CUDA reports under
``torch.cuda.set_sync_debug_mode("warn")`` (one warning each; 0 on the CPU), host reads the
dispatcher sees (``item``/``float``/``bool`` of a tensor, data-dependent shapes, copies between
host and device) and, on a GPU, the kernels the profiler records. The same for ``torch.optim.SGD``
(momentum 0.9, ``foreach`` False and True). Writes ``DIR/syncs.json``.

``timing``: ResNet-50 at 224x224, 32 images a micro-batch, 8 micro-batches a step, bf16 as
DeepSpeed's bf16 engine runs it at ZeRO stage 0 (:class:`Bf16Runner`): the forward and backward
run on bf16 copies of the weights and BatchNorm buffers, made once a step (bf16 activations,
bf16 gradients accumulated over the micro-batches), the gradients are handed to the fp32 weights
and the optimizer steps those (fp32 master weights; SP-NGD's statistics captured in fp32 from the
bf16 activations and gradients). One step = 8 forward + backward passes + ``opt.step()``, timed between
two ``torch.cuda.synchronize()``; the kinds of step take turns and each figure is the median of
``--reps`` after ``--warmup``. SP-NGD uses the optimizer block of
``ds_configs/imagenet_resnet50_32k.json``; SGD is ``torch.optim.SGD(momentum=0.9)``. The amortized
ratio is ``(f * refresh + (1 - f) * quiet) / sgd`` at the refresh fraction ``f`` of the default
staleness measured in ``bench/results/step_time_accum_cpu.json`` (the mean over the statistic
kinds A, G, F of the share refreshed per step). Writes ``DIR/timing.json``.

Both print a table and end with one line ``<part>: ok`` (or raise). Sizes: ``--dry-run`` uses
ResNet-18, 2 images of 32x32, 2 micro-batches, one measured step of each kind.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHIPPED_CONFIG = ROOT / "ds_configs" / "imagenet_resnet50_32k.json"
REFRESH_SOURCE = ROOT / "bench" / "results" / "step_time_accum_cpu.json"
TARGET_RATIO = 1.10
#: ops whose result the host must wait for (a read of a value or a data-dependent shape)
HOST_READ_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::unique_dim_consecutive",
    "aten::repeat_interleave",
    "aten::argwhere",
}


def sizes(dry_run: bool) -> dict[str, Any]:
    """The model and batch of each part: the shipped regime on a GPU, tiny ones on the CPU."""
    if dry_run:
        return {
            "device": "cpu",
            "model": "resnet18",
            "image_size": 32,
            "micro_batch": 2,
            "gas": 2,
            "warmup": 0,
            "reps": 1,
            "sync_model": "resnet18",
        }
    return {
        "device": "cuda",
        "model": "resnet50",
        "image_size": 224,
        "micro_batch": 32,
        "gas": 8,
        "warmup": 2,
        "reps": 5,
        "sync_model": "resnet50",
    }


def build_model(name: str, device: str) -> nn.Module:
    """A torchvision ResNet (1,000 classes), seeded, on ``device``."""
    try:
        import torchvision
    except ImportError as exc:
        raise SystemExit("gpu_check/measure.py needs torchvision (the ResNets come from it)") from exc
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=1000).to(device)


#: learning rate of both optimizers here: random images and labels with a real learning rate can
#: blow the weights up within a few steps; what a step costs does not depend on it
LR = 1e-6


def spngd_params() -> dict[str, Any]:
    """The SP-NGD parameters of the shipped ResNet-50 config (the default staleness), at ``LR``."""
    params = dict(json.loads(SHIPPED_CONFIG.read_text())["optimizer"]["params"])
    params["lr"] = LR
    return params


def sync(device: str) -> None:
    """Wait for the GPU's queued work when ``device`` is ``"cuda"``."""
    if device == "cuda":
        torch.cuda.synchronize()


def force_due(opt: Any, everything: bool) -> None:
    """Make every statistic due at the next step (``everything``) or none of them."""
    step = opt.step_count
    for b in opt.blocks.values():
        for s in b.stats.values():
            interval = s.schedule.state()[0]
            s.schedule.load((interval, step if everything else step + 10**6))
    opt.capture.start_step(opt._due(step))


# -- counting -------------------------------------------------------------------------------------
class DispatchCount(TorchDispatchMode):
    """Counts every aten op dispatched, the host reads among them and host<->device copies."""

    def __init__(self) -> None:
        """Start with no operator counted."""
        super().__init__()
        self.ops = 0
        self.reads: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Count the operator ``func`` (and the host reads among them), then run it."""
        kwargs = kwargs or {}
        self.ops += 1
        name = func._schema.name
        if name in HOST_READ_OPS:
            self.reads[name] += 1
        elif name in ("aten::_to_copy", "aten::copy_") and args and isinstance(args[0], torch.Tensor):
            src = args[1] if name == "aten::copy_" else args[0]
            dst = args[0] if name == "aten::copy_" else (kwargs.get("device") or src.device)
            dst_type = dst.device.type if isinstance(dst, torch.Tensor) else torch.device(dst).type
            if isinstance(src, torch.Tensor) and src.device.type != dst_type:
                self.reads[f"{name} {src.device.type}->{dst_type}"] += 1
        return func(*args, **kwargs)


@contextmanager
def counted(device: str) -> Iterator[dict[str, Any]]:
    """Count what the ``with`` body makes the host wait for (see the module docstring)."""
    out: dict[str, Any] = {}
    mode = DispatchCount()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with mode:
                yield out
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")  # before our own synchronize
                sync(device)
    out["cuda_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    out["host_reads"] = sum(mode.reads.values())
    out["host_reads_by_op"] = dict(mode.reads)
    out["aten_ops"] = mode.ops


def kernels(device: str, body: Callable[[], None]) -> int | None:
    """Kernels (and copies) the GPU ran for ``body``, from the profiler.

    ``None`` when the profiler failed; ``body`` then ran without it.
    """
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            body()
            sync(device)
    except RuntimeError as exc:
        print(f"profiler failed ({exc}); kernels not counted", file=sys.stderr)
        return None
    return int(sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA))


def count_step(
    device: str, model: nn.Module, opt: Any, batch: tuple[torch.Tensor, torch.Tensor], before: Callable[[], None]
) -> dict[str, Any]:
    """Counts of one forward + backward and of one ``opt.step()`` (``before`` runs first, uncounted)."""
    x, y = batch
    before()
    opt.zero_grad(set_to_none=True)
    with counted(device) as fb:
        F.cross_entropy(model(x), y).backward()
    with counted(device) as st:
        opt.step()
    fb_k = st_k = None
    if device == "cuda":  # the same step again, under the profiler
        before()
        opt.zero_grad(set_to_none=True)
        fb_k = kernels(device, lambda: F.cross_entropy(model(x), y).backward())
        st_k = kernels(device, opt.step)
    return {"forward_backward": fb | {"kernels": fb_k}, "step": st | {"kernels": st_k}}


def run_syncs(sz: dict[str, Any]) -> dict[str, Any]:
    """Host synchronisations, host reads, aten ops and kernels of SP-NGD and SGD steps."""
    import spngd_ds

    device = sz["device"]
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(2, 3, 32, 32, generator=g).to(device), torch.randint(0, 1000, (2,), generator=g).to(device))
    result: dict[str, Any] = {"model": sz["sync_model"], "batch": "2 x 3 x 32 x 32, fp32", "device": device}
    try:
        model = build_model(sz["sync_model"], device)
        opt = spngd_ds.SPNGD(model, **spngd_params())
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()  # the first step: every statistic is captured and inverted once
        result["spngd_refresh"] = count_step(device, model, opt, batch, lambda: force_due(opt, True))
        result["spngd_quiet"] = count_step(device, model, opt, batch, lambda: force_due(opt, False))
        result["spngd_metrics"] = opt.metrics()
    except Exception as exc:  # noqa: BLE001 -- recorded; SGD's counts still come
        traceback.print_exc()
        result["error"] = f"SP-NGD: {type(exc).__name__}: {exc}"
    for foreach in (False, True):
        model = build_model(sz["sync_model"], device)
        sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, foreach=foreach)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        sgd.step()
        result[f"sgd_foreach_{str(foreach).lower()}"] = count_step(device, model, sgd, batch, lambda: None)
    return result


def syncs_table(r: dict[str, Any]) -> str:
    """The result of :func:`run_syncs` as a text table."""
    rows = [f"{'step':28s} {'cuda syncs':>10s} {'host reads':>10s} {'aten ops':>9s} {'kernels':>8s}"]
    for key in ("spngd_refresh", "spngd_quiet", "sgd_foreach_false", "sgd_foreach_true"):
        if key not in r:
            rows.append(f"{key:28s} (not measured: {r.get('error')})")
            continue
        for part in ("forward_backward", "step"):
            c = r[key][part]
            k = "-" if c["kernels"] is None else str(c["kernels"])
            rows.append(
                f"{key + ' ' + part.replace('forward_backward', 'fwd+bwd'):28s} {c['cuda_syncs']:10d} "
                f"{c['host_reads']:10d} {c['aten_ops']:9d} {k:>8s}"
            )
    return "\n".join(rows)


# -- timing ---------------------------------------------------------------------------------------
class Bf16Runner:
    """``model`` (fp32: the master weights) run as DeepSpeed's bf16 engine runs it at ZeRO stage 0.

    :meth:`start` casts the weights to bf16 once a step (DeepSpeed copies the masters into its bf16
    module after each step); :meth:`loss` runs a forward on those bf16 weights and bf16 BatchNorm
    buffers (bf16 activations; the backward accumulates bf16 gradients, as stage 0 does);
    :meth:`finish` hands the gradients to the fp32 weights' ``.grad`` for the optimizer (DeepSpeed's
    bf16 wrapper copies them to the fp32 masters' gradients).
    """

    def __init__(self, model: nn.Module) -> None:
        """Hold ``model``'s parameters and bf16 copies of its buffers."""
        self.model = model
        # BatchNorm running statistics live in bf16, as with DeepSpeed's "buffer_dtype": "bf16"
        self.buffers = {n: b.to(torch.bfloat16) if b.is_floating_point() else b for n, b in model.named_buffers()}
        self.params = dict(model.named_parameters())
        self.weights: dict[str, torch.Tensor] = {}

    def start(self) -> None:
        """Make bf16 copies of the fp32 parameters for the next step's forwards."""
        self.weights = {n: p.detach().to(torch.bfloat16).requires_grad_() for n, p in self.params.items()}

    def loss(self, x: torch.Tensor, y: torch.Tensor, gas: int) -> torch.Tensor:
        """Loss of ``model`` in bf16 on ``x``, ``y``, divided by the ``gas`` accumulation steps."""
        out = torch.func.functional_call(self.model, {**self.weights, **self.buffers}, (x,))
        return F.cross_entropy(out.float(), y) / gas  # DeepSpeed divides by the accumulation steps

    def finish(self) -> None:
        """Hand the bf16 gradients to the fp32 parameters' ``.grad``."""
        for n, p in self.params.items():
            g = self.weights[n].grad
            p.grad = None if g is None else g.float()


def refresh_fraction() -> tuple[float | None, str]:
    """The share of statistics the default staleness refreshes per step, and where it comes from."""
    try:
        data = json.loads(REFRESH_SOURCE.read_text())
        by_kind = data["engines"]["spngd"]["refresh_fraction_by_kind"]
        setup = data["setup"]
    except (OSError, KeyError, ValueError) as exc:
        return None, f"{REFRESH_SOURCE.relative_to(ROOT)} unreadable ({exc})"
    f = sum(by_kind.values()) / len(by_kind)
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in by_kind.items())
    return f, (
        f"{REFRESH_SOURCE.relative_to(ROOT)}: {setup['model']}, {setup['global_batch']} samples a step, "
        f"{setup['accum_steps']} steps of the default staleness; mean of the kinds ({kinds})"
    )


def run_timing(sz: dict[str, Any]) -> dict[str, Any]:
    """Median step times (s) of SP-NGD and its baselines at the sizes in ``sz``."""
    import spngd_ds

    device, gas, mb, size = sz["device"], sz["gas"], sz["micro_batch"], sz["image_size"]
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(mb, 3, size, size, generator=g).to(device, torch.bfloat16),
            torch.randint(0, 1000, (mb,), generator=g).to(device),
        )
        for _ in range(gas)
    ]
    models = {"spngd": build_model(sz["model"], device), "sgd": build_model(sz["model"], device)}
    runners = {k: Bf16Runner(m) for k, m in models.items()}
    spngd = spngd_ds.SPNGD(models["spngd"], **spngd_params())
    spngd.capture.grad_scale = lambda: float(gas)  # per-sample gradients of a loss divided by gas
    spngd.capture.forwards_per_step = gas
    error = None
    sgd = torch.optim.SGD(models["sgd"].parameters(), lr=LR, momentum=0.9)

    def step(kind: str) -> Callable[[], None]:
        opt: torch.optim.Optimizer = sgd if kind == "sgd" else spngd
        runner = runners["sgd" if kind in ("sgd", "fwd_bwd") else "spngd"]

        def body() -> None:
            if kind in ("spngd_refresh", "spngd_quiet"):
                force_due(spngd, kind == "spngd_refresh")
            runner.start()
            for x, y in data:
                runner.loss(x, y, gas).backward()
            runner.finish()
            if kind != "fwd_bwd":
                opt.step()
            opt.zero_grad(set_to_none=True)

        return body

    kinds = ["sgd", "spngd_quiet", "spngd_refresh", "fwd_bwd"]
    steps = {k: step(k) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    first = time.perf_counter()
    try:
        steps["spngd_refresh"]()  # SP-NGD's first step captures and inverts every statistic
        sync(device)
    except Exception as exc:  # noqa: BLE001 -- recorded; SGD is still timed
        traceback.print_exc()
        error = f"SP-NGD: {type(exc).__name__}: {exc}"
        kinds = ["sgd", "fwd_bwd"]
        times = {k: [] for k in kinds}
    first_s = time.perf_counter() - first
    for rep in range(sz["warmup"] + sz["reps"]):
        for kind in kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]:  # rotate: noise hits all
            sync(device)
            t0 = time.perf_counter()
            steps[kind]()
            sync(device)
            if rep >= sz["warmup"]:
                times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    if error is not None:
        return {
            "setup": {k: sz[k] for k in ("model", "image_size", "micro_batch", "gas", "reps", "device")},
            "error": error,
            "step_s": times,
            "median_step_s": med,
        }
    f, source = refresh_fraction()
    fractions = sorted({0.0, 0.1, 0.25, 0.5, 1.0} | ({round(f, 4)} if f is not None else set()))

    def amortized(frac: float) -> float:
        return (frac * med["spngd_refresh"] + (1 - frac) * med["spngd_quiet"]) / med["sgd"]

    ratio = amortized(f) if f is not None else None
    return {
        "setup": {k: sz[k] for k in ("model", "image_size", "micro_batch", "gas", "warmup", "reps", "device")}
        | {
            "precision": "bf16 forward/backward, fp32 master weights and optimizer",
            "spngd": spngd_params(),
            "sgd": {"lr": LR, "momentum": 0.9, "foreach": "default"},
        },
        "first_spngd_step_s": first_s,
        "step_s": times,
        "median_step_s": med,
        "ratio_to_sgd": {k: med[k] / med["sgd"] for k in ("spngd_quiet", "spngd_refresh", "fwd_bwd")},
        "refresh_fraction": f,
        "refresh_fraction_source": source,
        "amortized_ratio": ratio,
        "amortized_ratio_at": {f"{x:g}": amortized(x) for x in fractions},
        "target_ratio": TARGET_RATIO,
        "target_met": None if ratio is None else ratio <= TARGET_RATIO,
        "spngd_metrics": spngd.metrics(),
    }


def timing_table(r: dict[str, Any]) -> str:
    """The result of :func:`run_timing` as a text table (ms per step)."""
    s, med = r["setup"], r["median_step_s"]
    if "error" in r:
        return "\n".join(
            [
                f"{s['model']} {s['image_size']}x{s['image_size']}: {r['error']}",
                *(f"  {k:14s} {v * 1e3:10.1f} ms" for k, v in med.items()),
            ]
        )
    rows = [
        f"{s['model']} {s['image_size']}x{s['image_size']}, {s['micro_batch']} a micro-batch x {s['gas']}, "
        f"{s['precision']}; median of {s['reps']} ({s['device']})"
    ]
    for k in ("sgd", "spngd_quiet", "spngd_refresh", "fwd_bwd"):
        ratio = 1.0 if k == "sgd" else r["ratio_to_sgd"][k]
        rows.append(f"  {k:14s} {med[k] * 1e3:10.1f} ms  {ratio:6.3f}x SGD")
    if r["amortized_ratio"] is not None:
        rows.append(
            f"  amortized at refresh fraction {r['refresh_fraction']:.3f}: {r['amortized_ratio']:.3f}x SGD "
            f"(target {r['target_ratio']:.2f}: {'met' if r['target_met'] else 'NOT met'})"
        )
    rows.append("  at other fractions: " + ", ".join(f"{k}: {v:.3f}x" for k, v in r["amortized_ratio_at"].items()))
    rows.append(f"  refresh fraction from {r['refresh_fraction_source']}")
    return "\n".join(rows)


def machine() -> dict[str, Any]:
    """Python, torch and CUDA versions and the GPU's name."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu}


def main(argv: list[str] | None = None) -> int:
    """Run one part (``syncs`` or ``timing``), print its table and write its JSON; exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["syncs", "timing"])
    p.add_argument("--out", type=Path, default=ROOT / "gpu_check" / "out")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes")
    p.add_argument("--reps", type=int, default=None, help="measured steps of each kind (timing)")
    a = p.parse_args(argv)
    sz = sizes(a.dry_run)
    if a.reps is not None:
        sz["reps"] = a.reps
    if sz["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible (torch.cuda.is_available() is false); --dry-run runs on the CPU")
    a.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if a.part == "syncs":
        result = run_syncs(sz)
        table = syncs_table(result)
    else:
        result = run_timing(sz)
        table = timing_table(result)
    result["machine"] = machine()
    result["wall_s"] = time.perf_counter() - start
    (a.out / f"{a.part}.json").write_text(json.dumps(result, indent=1, default=str))
    print(table)
    if "error" in result:
        print(f"{a.part}: FAILED: {result['error']}")
        return 1
    metrics = result.get("spngd_metrics", {})
    if metrics.get("spngd/skipped_steps", 0) or metrics.get("spngd/inversion_failures", 0):
        print(f"{a.part}: FAILED: SP-NGD skipped steps or failed inversions, not real steps: {metrics}")
        return 1
    if not all(math.isfinite(v) for v in result.get("median_step_s", {}).values()):
        print(f"{a.part}: FAILED: a step time is not finite")
        return 1
    print(f"{a.part}: ok ({result['wall_s']:.0f} s; {a.out / (a.part + '.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
