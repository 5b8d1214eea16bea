"""The equivalence matrix (docs/design.md §8).

One cell = one way of running SP-NGD inside DeepSpeed, and the standalone run that must give the
same parameters.

A cell names a model, a ZeRO stage, a precision, a learning-rate schedule, weight rescaling,
``gradient_clipping`` (unset, 0 or a limit below the update norm), gradient accumulation and
whether the model is built under ``deepspeed.zero.Init``. ``tests/support/ds_worker.py --cells`` runs a
list of cells on N gloo ranks; :func:`reference` runs the same cell in one standalone process fed
the same per-rank passes (micro-batch k of every rank, in rank order), which is what N ranks x
gas micro-batches compute. The loss is multiplied by ``LOSS_MULT`` so that raw gradient norms
exceed 1 on every model, where DeepSpeed's implicit ``gradient_clipping`` of 1.0 would act.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LOSS_MULT = 16.0
GLOBAL_BATCH = 48  # divisible by 2 and 3 ranks x 1 or 2 micro-batches
CLASSES = 5


@dataclass(frozen=True)
class Cell:
    model: str = "mlp"
    stage: int = 0
    precision: str = "fp32"
    schedule: str = "const"  # "const" or "poly" (SPNGDPolyDecay: the lr changes every step)
    rescale: bool = False
    clip: float | None = None  # None: gradient_clipping unset; else its value
    gas: int = 1
    zero_init: bool = False
    steps: int = 5
    staleness: bool = True
    step_bound: float | None = None  # rule 13's step bound: off unless a cell sets it
    comm_fp32: bool = False  # DeepSpeed's communication_data_type "fp32" (default: the model's dtype)

    @property
    def name(self) -> str:
        clip = "unset" if self.clip is None else f"{self.clip:g}"
        parts = [
            self.model,
            f"z{self.stage}",
            self.precision,
            self.schedule,
            f"rescale{int(self.rescale)}",
            f"clip-{clip}",
            f"gas{self.gas}",
        ]
        if self.zero_init:
            parts.append("zinit")
        if not self.staleness:
            parts.append("nostale")
        if self.step_bound:
            parts.append(f"bound{self.step_bound:g}")
        if self.comm_fp32:
            parts.append("comm-fp32")
        return "-".join(parts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> Cell:
        return Cell(**d)

    def but(self, **kw: Any) -> Cell:
        return replace(self, **kw)


def build_model(kind: str) -> nn.Module:
    """Tiny models, deterministic init.

    Block counts: mlp 8, conv 3, convbn 3 (BatchNorm on split batches), tied 1 curvature block +
    shared first-order weights, bnpool 2 (so 3 ranks leave one rank without any block). The
    convolutions that feed a BatchNorm start 4x larger than torch's default, so that rule 8's bound
    sqrt(2 C_out) binds and weight rescaling acts.
    """
    torch.manual_seed(1234)
    return _build(kind)


class LargeConv2d(nn.Conv2d):
    """A Conv2d initialised 4x larger than torch's default, inside its own ``__init__``.

    So that ``deepspeed.zero.Init`` (which partitions a module when its ``__init__`` returns) sees
    it too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            self.weight.mul_(4.0)


def _build(kind: str) -> nn.Module:
    if kind == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        dims = [16, 24, 20, 18, 16, 14, 12, 10, CLASSES]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)
    if kind == "conv":
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, CLASSES),
        )
    if kind == "convbn":
        return nn.Sequential(
            LargeConv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, CLASSES),
        )
    if kind == "bnpool":
        return nn.Sequential(
            LargeConv2d(1, CLASSES, 3, padding=1, bias=False),
            nn.BatchNorm2d(CLASSES),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
    if kind == "tied":
        return Tied()
    if kind == "seq":
        return TokenModel(full=True)
    if kind == "seq2":
        return TokenModel(full=False)
    raise ValueError(kind)


class TinyRMSNorm(nn.Module):
    """An RMSNorm as HF writes it (``weight``, ``variance_epsilon``)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.8, 1.2, d))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class TokenModel(nn.Module):
    """A token model on the image batches.

    The 16 pixels, quantised to 7 levels, are a sequence of T = 16 tokens; Embedding -> [LayerNorm]
    -> HF Conv1D -> tanh -> [RMSNorm -> Linear] -> mean over positions -> logits (N, CLASSES).
    ``full``: 5 curvature blocks, else 2 (Embedding, Conv1D head), so that 3 ranks leave one without
    any block.
    """

    def __init__(self, full: bool) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.full = full
        # padding_idx only without the LayerNorm (the LayerNorm of a zero row amplifies by 1/sqrt(eps))
        self.emb = nn.Embedding(7, 8, padding_idx=None if full else 3)
        if full:
            self.ln = nn.LayerNorm(8)
            self.mid = Conv1D(8, 8)
            self.rms = TinyRMSNorm(8)
            self.head = nn.Linear(8, CLASSES)
        else:
            self.mid = Conv1D(CLASSES, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.detach().float().flatten(1) * 2.0).floor().clamp(-3, 3).long() + 3  # (N, 16) in [0, 7)
        h = self.emb(ids).to(x.dtype)
        if not self.full:
            return self.mid(torch.tanh(h)).mean(1)
        return self.head(self.rms(torch.tanh(self.mid(self.ln(h))))).mean(1)


class Tied(nn.Module):
    """Two Linear layers sharing one weight (as tied embeddings do), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x.flatten(1)))
        return self.head(torch.tanh(self.b(h)))


def global_batch(step: int, n: int = GLOBAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def spngd_params(cell: Cell) -> dict[str, Any]:
    stal = {"threshold": 0.5, "max_interval": 3} if cell.staleness else None
    return {
        "lr": 0.05,
        "momentum": 0.9,
        "damping": 1e-2,
        "weight_decay": 1e-4,
        "staleness": stal,
        "weight_rescale": cell.rescale,
        "bn_damping_scale": 64.0,
        "stat_micro_batches": None,  # every micro-batch: k micro-batches are exactly one batch
        "overlap_statistics": True,  # forced: with every micro-batch captured, "auto" on a CPU does not
        "step_bound": cell.step_bound,
    }


POLY = {"steps_per_epoch": 1, "start_epoch": 0.0, "end_epoch": 12.0, "power": 2.0}


def ds_config(cell: Cell, world: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (world * cell.gas),
        "gradient_accumulation_steps": cell.gas,
        "optimizer": {"type": "SPNGD", "params": spngd_params(cell)},
        "zero_optimization": {"stage": cell.stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    if cell.schedule == "poly":
        cfg["scheduler"] = {"type": "SPNGDPolyDecay", "params": dict(POLY)}
    if cell.clip is not None:
        cfg["gradient_clipping"] = cell.clip
    if cell.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"buffer_dtype": "bf16"}
    if cell.comm_fp32:
        cfg["communication_data_type"] = "fp32"
    return cfg


def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float(), y) * LOSS_MULT


def reference(cell: Cell, ranks: int, steps: int | None = None) -> dict[str, torch.Tensor]:
    """Parameters after the cell's steps in one standalone SP-NGD process (the cell's reference).

    Fed what ``ranks`` ranks x ``cell.gas`` micro-batches compute (fp32; ``gradient_clipping`` > 0
    becomes ``clip_norm``). A bf16 cell gets :func:`reference_bf16`.
    """
    import spngd_ds

    if cell.precision == "bf16":
        return reference_bf16(cell, ranks, steps)

    model = build_model(cell.model)
    params = spngd_params(cell)
    if cell.clip:
        params["clip_norm"] = cell.clip
    opt = spngd_ds.SPNGD(model, **params)
    sched = spngd_ds.SPNGDPolyDecay(opt, **POLY) if cell.schedule == "poly" else None
    splits = ranks * cell.gas
    opt.capture.grad_scale = lambda: float(splits)
    order = [r * cell.gas + k for k in range(cell.gas) for r in range(ranks)]
    for step in range(cell.steps if steps is None else steps):
        x, y = global_batch(step)
        opt.zero_grad()
        xs, ys = x.chunk(splits), y.chunk(splits)
        for i in order:
            loss = loss_of(model(xs[i]), ys[i])
            opt.observe_loss(loss)  # what engine.backward hands over on each rank (rule 13's L)
            (loss / splits).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def reference_bf16(cell: Cell, ranks: int, steps: int | None = None) -> dict[str, torch.Tensor]:
    """The fp32 master weights after a bf16 cell's steps, from one standalone process.

    The process runs the passes as DeepSpeed's bf16 engine does, with the same rounding:

    - the model in bf16 (parameters and buffers) from the start, the fp32 masters copied from the
      bf16 parameters; SP-NGD built on the bf16 model (its statistics are fp32, captured from the
      bf16 activations and output gradients) with the masters as its parameter groups' tensors,
      as DeepSpeed's bf16 wrapper hands them over at stage 0;
    - each rank's pass (micro-batch k of every rank, in rank order) run on its own, its loss not
      divided (``gradient_accumulation_steps`` is 1 in the bf16 cells), its bf16 gradients taken
      to fp32 and summed in fp32;
    - the ranks' gradients averaged as DeepSpeed averages them:

      - stage 0: summed and divided by the rank count in fp32 (SP-NGD's own reduction);
      - ZeRO 1 and 2, bf16 communication: each rank's gradient divided by the rank count in
        bf16, and the quotients of all parameters, flattened (ZeRO 1 in parameter order, ZeRO 2
        reversed, as the backward hands them over) and padded to a multiple of 2·ranks, summed in
        bf16 in the order of a ring over ``ranks`` segments (:func:`_ring_sum`);
      - ZeRO 3, bf16 communication: the same, parameter by parameter;
      - fp32 communication (``cell.comm_fp32``): each rank's gradient divided by the rank count
        (in bf16 at ZeRO 1 and 2, where any fp32 sum of three such quotients is exact; in fp32 at
        ZeRO 3, summed in the ring order, parameter by parameter) and the sum rounded to bf16;
    - after each step the masters copied into the bf16 parameters.

    The orders were read off DeepSpeed's gradients at 3 ranks (gloo); at 2 ranks the order of two
    additions does not matter. This is :func:`deepspeed_average`.
    """
    import spngd_ds

    assert cell.gas == 1, "bf16 cells run one micro-batch per rank and step"
    bf16 = torch.bfloat16
    model = build_model(cell.model).to(bf16)
    params = spngd_params(cell)
    if cell.clip:
        params["clip_norm"] = cell.clip
    opt = spngd_ds.SPNGD(model, **params)
    masters: list[torch.Tensor] = []
    for group in opt.param_groups:
        group["params"] = [p.detach().float() for p in group["params"]]
        masters += group["params"]
    sched = spngd_ds.SPNGDPolyDecay(opt, **POLY) if cell.schedule == "poly" else None
    weights = list(model.parameters())
    for step in range(cell.steps if steps is None else steps):
        x, y = global_batch(step)
        per_rank: list[list[torch.Tensor]] = [[] for _ in masters]  # each rank's bf16 gradient
        for xs, ys in zip(x.chunk(ranks), y.chunk(ranks), strict=True):
            for w in weights:
                w.grad = None
            loss_of(model(xs.to(bf16)), ys).backward()
            for mine, w in zip(per_rank, weights, strict=True):
                mine.append(w.grad if w.grad is not None else torch.zeros_like(w))
        for m, g in zip(masters, deepspeed_average(cell, per_rank), strict=True):
            m.grad = g
        opt.step()
        with torch.no_grad():
            for w, m in zip(weights, masters, strict=True):
                w.copy_(m)
        if sched is not None:
            sched.step()
    return {n: m.detach().clone() for (n, _), m in zip(model.named_parameters(), masters, strict=True)}


def deepspeed_average(cell: Cell, grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Each parameter's gradient averaged over the ranks and rounded as DeepSpeed does it (fp32).

    ``grads[i][r]``: parameter i's bf16 gradient on rank r (parameters in model order). The rules
    are those of :func:`reference_bf16`'s docstring.
    """
    ranks = len(grads[0])
    bf16 = torch.bfloat16
    if cell.stage == 0:  # SP-NGD's own fp32 all-reduce
        totals = []
        for gs in grads:
            total = torch.zeros_like(gs[0], dtype=torch.float32)
            for g in gs:
                total.add_(g.float())
            totals.append(total.div_(ranks))
        return totals
    if cell.stage == 3:  # a reduce-scatter of each parameter, divided first
        if cell.comm_fp32:
            return [_ring_sum([g.float() / ranks for g in gs]).to(bf16).float() for gs in grads]
        return [_ring_sum([g / ranks for g in gs]).float() for gs in grads]
    if cell.comm_fp32:  # any fp32 sum of ranks' bf16 quotients is exact here: the order does not matter
        return [torch.stack([(g / ranks).float() for g in gs]).sum(0).to(bf16).float() for gs in grads]
    # ZeRO 1 and 2, bf16: one ring over the flat gradients (ZeRO 1: parameter order; ZeRO 2: the
    # order the backward hands them over, reversed), padded to 2·ranks elements as DeepSpeed pads
    order = list(range(len(grads))) if cell.stage == 1 else list(reversed(range(len(grads))))
    flats = [torch.cat([(grads[i][r] / ranks).reshape(-1) for i in order]) for r in range(ranks)]
    pad = -flats[0].numel() % (2 * ranks)
    summed = _ring_sum([torch.cat([f, f.new_zeros(pad)]) for f in flats])
    pieces = summed[: flats[0].numel()].split([grads[i][0].numel() for i in order])
    out: list[torch.Tensor] = [torch.empty(0)] * len(grads)
    for i, piece in zip(order, pieces, strict=True):
        out[i] = piece.reshape(grads[i][0].shape).float()
    return out


def _ring_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """Σ parts (one per rank, same shape) in the order of a ring reduce over ``len(parts)`` segments.

    The flattened tensor is cut into ``len(parts)`` segments of ceil(numel / ranks) elements;
    segment r is accumulated in the parts' dtype (rounding after each addition) starting from rank
    r + 1 around the ring and ending with rank r.
    """
    ranks = len(parts)
    flat = [t.reshape(-1) for t in parts]
    chunk = -(-flat[0].numel() // ranks)
    out = torch.empty_like(flat[0])
    for r in range(ranks):
        part = slice(r * chunk, (r + 1) * chunk)
        order = [(r + 1 + k) % ranks for k in range(ranks)]
        acc = flat[order[0]][part].clone()
        for q in order[1:]:
            acc += flat[q][part]
        out[part] = acc
    return out.view_as(parts[0])


def rel_err(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Max over tensors of max|a - b| / max|b|."""
    assert out.keys() == ref.keys(), (sorted(out), sorted(ref))
    return max(float((out[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)) for k in ref)


def motion_err(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """Max over tensors of max|a - b| / max|b - start| (for bf16: error relative to how far it moved)."""
    assert out.keys() == ref.keys()
    return max(float((out[k] - ref[k]).abs().max() / (ref[k] - start[k]).abs().max().clamp_min(1e-12)) for k in ref)
