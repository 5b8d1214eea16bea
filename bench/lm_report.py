"""The selection and the report of ``bench/lm.py``.

The target validation loss, each optimizer's lr by the steps to it, the verdict per batch size, the
table, the plot and the JSON. Losses are validation cross-entropy in nats per byte; times are
training seconds of the slowest rank.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

if TYPE_CHECKING:
    from lm import Run

FIRST_ORDER = ("AdamW", "LAMB")
#: at the larger batch, SP-NGD's steps to the target over the better first-order method's
TARGET_RATIO = 0.7


# ------------------------------------------------------------------------------------- selection


def target_loss(runs: dict[str, dict[float, Run]], slack: float) -> float:
    """The lowest validation loss any first-order run reached, plus ``slack`` nats."""
    best = min(
        (v for n in FIRST_ORDER for r in runs.get(n, {}).values() for v in r.val_loss if math.isfinite(v)),
        default=math.inf,
    )
    return best + slack


def choose_lr(grid: dict[float, Run], target: float) -> float:
    """Fewest steps to ``target``; then the lower final validation loss; then the smaller lr."""

    def key(lr: float) -> tuple[float, float, float]:
        s = grid[lr].steps_to(target)
        return (math.inf if s is None else s), grid[lr].final(), lr

    return min(grid, key=key)


def summarise(
    runs: dict[str, dict[float, Run]], slack: float, grid: tuple[float, ...], target: float | None = None
) -> dict[str, Any]:
    """Per batch size: the target, each optimizer's chosen lr and its figures, the verdict.

    ``target``: the target validation loss to use (default: the best first-order loss plus ``slack``).
    """
    target = target_loss(runs, slack) if target is None else target
    out: dict[str, Any] = {"target_val_loss": target, "optimizers": {}}
    for name, per_lr in runs.items():
        lr = choose_lr(per_lr, target)
        r = per_lr[lr]
        out["optimizers"][name] = {
            "lr": lr,
            "lr_at_grid_edge": len(grid) > 1 and lr in (grid[0], grid[-1]),
            "steps_to_target": r.steps_to(target),
            "seconds_to_target": r.seconds_to(target),
            "final_val_loss": r.final(),
            "best_val_loss": min(r.val_loss),
            "best_final_val_loss_over_grid": min(x.final() for x in per_lr.values()),
            "mean_step_s": r.seconds[-1] / len(r.seconds) if r.seconds else math.nan,
            "grid_steps_to_target": {str(k): v.steps_to(target) for k, v in per_lr.items()},
            "grid_final_val_loss": {str(k): v.final() for k, v in per_lr.items()},
            "grid_diverged": {str(k): v.diverged for k, v in per_lr.items()},
        }
    res = out["optimizers"]
    first = {n: res[n] for n in FIRST_ORDER if n in res and res[n]["steps_to_target"] is not None}
    ngd = res.get("SP-NGD", {})
    if first and ngd:
        best = min(first, key=lambda n: (first[n]["steps_to_target"], first[n]["seconds_to_target"]))
        ns, nt = ngd["steps_to_target"], ngd["seconds_to_target"]
        fs, ft = first[best]["steps_to_target"], first[best]["seconds_to_target"]
        out["verdict"] = {
            "best_first_order": best,
            "step_ratio": (ns / fs if fs else math.inf) if ns is not None else math.inf,
            "wall_ratio": (nt / ft if ft else math.inf) if nt is not None else math.inf,
        }
        out["verdict"]["met"] = out["verdict"]["step_ratio"] <= TARGET_RATIO
    return out


# ---------------------------------------------------------------------------------------- report


def print_report(res: dict[str, Any]) -> None:
    """The per-optimizer table and the verdict per batch size."""
    rows = []
    for batch_name, summ in res["summary"].items():
        for name, r in summ["optimizers"].items():
            sec = r["seconds_to_target"]
            rows.append(
                [
                    batch_name,
                    name,
                    r["lr"],
                    r["steps_to_target"] if r["steps_to_target"] is not None else "-",
                    sec if sec is not None else "-",
                    r["final_val_loss"],
                    r["mean_step_s"] * 1e3,
                    "edge" if r["lr_at_grid_edge"] else "",
                ]
            )
    print(
        common.format_table(
            ["batch", "optimizer", "lr", "steps to target", "s to target", "final val loss", "ms/step", "grid"], rows
        )
    )
    for batch_name, summ in res["summary"].items():
        v = summ.get("verdict")
        head = f"{batch_name} (target val loss {summ['target_val_loss']:.4f} nats/byte)"
        if v is None:
            print(f"{head}: no first-order run or no SP-NGD run reached the target")
            continue
        print(
            f"{head}: SP-NGD / {v['best_first_order']} steps {v['step_ratio']:.2f} (target <= {TARGET_RATIO}: "
            f"{'met' if v['met'] else 'MISSED'}), wall time {v['wall_ratio']:.2f}"
        )


def plot(res: dict[str, Any], path: Path) -> None:
    """Plot validation loss against steps and against training seconds.

    Validation loss against steps and against training seconds, per batch size, at each optimizer's
    chosen lr; the dashed line is the target.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"SP-NGD": "#d62728", "AdamW": "#1f77b4", "LAMB": "#9467bd"}
    batches = list(res["summary"])
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 4.0 * len(batches)), squeeze=False)
    for i, batch_name in enumerate(batches):
        summ = res["summary"][batch_name]
        for name, r in summ["optimizers"].items():
            run = res["runs"][batch_name][name][str(r["lr"])]
            secs = [0.0] + run["seconds"]
            xs = (run["eval_steps"], [secs[s] for s in run["eval_steps"]])
            for j in range(2):
                axes[i][j].plot(
                    xs[j], run["val_loss"], color=colors[name], marker=".", lw=1.5, label=f"{name} (lr {r['lr']:g})"
                )
        for j, label in enumerate(("step", "training seconds (slowest rank)")):
            ax = axes[i][j]
            ax.axhline(summ["target_val_loss"], color="k", ls="--", lw=0.8)
            ax.set_xlabel(label)
            ax.set_ylabel("validation loss (nats/byte)")
            ax.grid(True, alpha=0.3)
            ax.set_title(
                f"{res['setting']['model']} {res['setting']['size']}, batch "
                f"{res['batch_sizes'][batch_name]} x {res['setting']['seq_len']} bytes ({batch_name})",
                fontsize=10,
            )
        axes[i][0].legend(fontsize=8, loc="upper right")
    fig.suptitle(
        "Python stdlib bytes; lr per optimizer from the same grid; dashed: target (best first-order + slack)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as strict JSON (non-finite numbers as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(common.finite(payload), indent=1, allow_nan=False) + "\n")
