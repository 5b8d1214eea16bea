"""Hooks that feed the curvature statistics (docs/design.md rules 1-4, 6 and section 3).

A forward hook on each block's module captures what the forward pass gives (A's activations,
BatchNorm's x̂) and registers a tensor hook on the module's output for what the backward pass gives
(G's and F's output gradients). A tensor hook on the forward output, rather than a module backward
hook, works with in-place ReLUs. Only statistics that are due this step are captured.

Output gradients arrive as ∂L_mb/∂s of whatever loss was backpropagated; ``grad_scale`` turns them
into per-sample gradients: g_i = grad_i · N_mb · grad_scale (for DeepSpeed:
gradient_accumulation_steps / loss_scale; 1 for a standalone mean loss).

``fisher="mc"``: a forward hook on the model itself samples ŷ ~ softmax(logits) and runs one extra
backward of the sampled mean cross-entropy with ``torch.autograd.grad`` to the hooked outputs only;
no parameter gradient is touched, and the true backward then captures nothing. The logits are the
model's output tensor, its ``.logits`` (HF ``ModelOutput``) or its ``["logits"]``, (N, C) or
(N, T, ..., V) (one label per position). Positions that carry no loss term are left out of the
sampled loss: the mask comes from the ``labels`` keyword of the forward when it has the logits'
shape (-100 ignored; shifted by one for a causal LM, class name ``*ForCausalLM`` / ``*LMHeadModel``),
else from its ``attention_mask``, else every position counts. The sampled loss is
Σ_valid CE / sqrt(n_valid·P) (P positions), so that G and F of the per-position layers
(``positions_as_samples``, count P) are means over the n_valid valid positions without a host
synchronisation; A still counts every position (the forward hooks do not see the mask).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from spngd_ds.blocks.base import Block

BackwardCapture = Callable[[torch.Tensor, float], None]
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class CurvatureCapture:
    """Owns the hooks on a model and routes captured tensors into its blocks' statistics.

    Attributes:
        due: block name -> names of its statistics captured this step (set by the optimizer).
        grad_scale: callable giving the factor described in the module docstring.
        stat_micro_batches: capture only the first k micro-batches (forwards) of a step, or all.
        forwards_per_step: training forwards per optimizer step when the caller knows it (DeepSpeed's
            gradient_accumulation_steps), else ``None``.
        on_factors_complete: called once per step at the end of the forward after which no A
            is captured any more (the ``min(stat_micro_batches, forwards_per_step)``-th), when
            that forward is known.
        feeds_bn: names of Linear/Conv2d modules whose output is the input of a BatchNorm.
        got_grad: ids of the trainable parameters that received a gradient on this rank since
            the last :meth:`start_step` (a parameter without one is left alone by the update).
        seconds: wall time spent inside capture hooks since the last :meth:`start_step`.
        last_seconds: the same for the step before (what the last optimizer step consumed).
    """

    def __init__(self, model: nn.Module, blocks: list[Block], fisher: str) -> None:
        """Capture statistics of ``blocks`` in ``model`` with the ``fisher`` labels ("empirical" or "mc")."""
        self.model = model
        self.fisher = fisher
        self.blocks = {b.name: b for b in blocks if b.stats}
        self.due: dict[str, set[str]] = {}
        self.grad_scale: Callable[[], float] = lambda: 1.0
        self.stat_micro_batches: int | None = None
        self.forwards_per_step: int | None = None
        self.on_factors_complete: Callable[[], None] | None = None
        self.micro_batch = 0
        self.enabled = True
        self.seconds = 0.0
        self.last_seconds = 0.0
        self.feeds_bn: set[str] = set()
        self._mc_targets: list[tuple[torch.Tensor, BackwardCapture]] = []
        #: BatchNorm running statistics (live tensors) and their copies from the step's start
        self._bn_live: list[torch.Tensor] = []
        self._bn_saved: list[torch.Tensor] = []
        self._bn_valid = False
        #: the ``labels`` and ``attention_mask`` keywords of the current forward (fisher="mc")
        self._mc_keywords: dict[str, object] = {}
        #: leading dim of the current forward's first tensor argument (the model's batch size)
        self.batch_size: int | None = None
        self._handles: list[RemovableHandle] = []
        self._probe_handles: list[RemovableHandle] = []
        self._probe_outputs: dict[tuple[int, tuple[int, ...], int], tuple[torch.Tensor, str]] = {}
        self.got_grad: set[int] = set()
        self._forward_index = 0
        self._a_counted: dict[str, int] = {}
        modules = dict(model.named_modules())
        self._block_modules = {name: modules[name] for name in self.blocks}
        #: the blocks' forward hooks, installed only while a forward can capture for them (below)
        self._block_handles: dict[str, RemovableHandle] = {}
        self._set_block_hooks(set(self.blocks))
        for p in model.parameters():
            if p.requires_grad:
                self._handles.append(p.register_hook(self._presence_hook(id(p))))
        self._handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._root_hook))
        self._install_probe(modules)

    # -- step control -----------------------------------------------------------------------------
    def start_step(self, due: dict[str, set[str]]) -> None:
        """Set what is captured from now until the next optimizer step."""
        self.due = due
        self.micro_batch = 0
        self.got_grad = set()
        self.last_seconds, self.seconds = self.seconds, 0.0

    def remove(self) -> None:
        """Remove every hook this object installed."""
        self._set_block_hooks(set())
        for h in self._handles + self._probe_handles:
            h.remove()
        self._handles, self._probe_handles = [], []

    def _set_block_hooks(self, names: set[str]) -> None:
        """Have the forward hooks of exactly the blocks ``names`` installed.

        A hook that only returns costs PyTorch's slow module call (about 17 us a module here: 0.7 ms
        a ResNet-20 forward), so a forward that captures nothing runs without them.
        """
        for name in [n for n in self._block_handles if n not in names]:
            self._block_handles.pop(name).remove()
        for name in sorted(names - self._block_handles.keys()):
            hook = self._forward_hook(self.blocks[name])
            self._block_handles[name] = self._block_modules[name].register_forward_hook(hook)

    def _capturing(self) -> bool:
        smb = self.stat_micro_batches
        return (
            self.enabled
            and self.model.training
            and torch.is_grad_enabled()
            and (smb is None or self.micro_batch <= smb)
        )

    # -- hooks ----------------------------------------------------------------------------------
    def _root_pre_hook(self, module: nn.Module, inputs: tuple[object, ...], kwargs: dict[str, object]) -> None:
        first = next((t for t in (*inputs, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        self.batch_size = int(first.shape[0]) if first is not None else None
        if self.fisher == "mc":
            self._mc_keywords = {k: kwargs.get(k) for k in ("labels", "attention_mask")}
        if self.model.training and torch.is_grad_enabled():
            if self.micro_batch == 0:
                self._snapshot_batchnorm()
            self.micro_batch += 1
            self._forward_index += 1
            self._mc_targets = []
        self._set_block_hooks({n for n in self.blocks if self.due.get(n)} if self._capturing() else set())

    def _snapshot_batchnorm(self) -> None:
        """Remember BatchNorm running statistics before the step's first forward.

        So that a skipped step (non-finite gradients, fp16 overflow) can undo what its forwards did
        to them: one multi-tensor copy into buffers kept from step to step (allocated again only
        when the model's BatchNorm buffers change).
        """
        live = [
            getattr(m, name)
            for m in self.model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and all(isinstance(getattr(m, name, None), torch.Tensor) for name in _BN_BUFFERS)
            for name in _BN_BUFFERS
        ]
        saved = self._bn_saved
        if len(saved) != len(live) or any(a is not b for a, b in zip(self._bn_live, live, strict=True)):
            self._bn_live = live
            self._bn_saved = [t.detach().clone() for t in live]
        elif live:
            with torch.no_grad():
                torch._foreach_copy_(saved, live)
        self._bn_valid = True

    def restore_batchnorm(self) -> None:
        """Put back the running statistics of :meth:`_snapshot_batchnorm` (a skipped step)."""
        if self._bn_valid and self._bn_live:
            with torch.no_grad():
                torch._foreach_copy_(self._bn_live, self._bn_saved)
        self._bn_valid = False

    def _presence_hook(self, key: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self.got_grad.add(key)

        return hook

    def _forward_hook(
        self, block: Block
    ) -> Callable[[nn.Module, tuple[torch.Tensor, ...], object], torch.Tensor | None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> torch.Tensor | None:
            if not (module.training and self._capturing()):
                return None
            due = self.due.get(block.name)
            if not due or not isinstance(output, torch.Tensor):
                return None
            if not output.requires_grad or not all(p.requires_grad for p in block.params):
                return None  # a frozen layer (or a forward without autograd) is simply not captured
            start = time.perf_counter()
            stat_a = block.stats.get("A")
            count_before = stat_a.local_count if stat_a is not None else 0.0
            if hasattr(block, "batch_hint"):  # an Embedding looked up with broadcast (1, T) indices
                block.batch_hint = self.batch_size
            backward = block.capture_forward(inputs[0], due)
            if stat_a is not None and "A" in due:
                # rule 3: a module called several times in one forward adds locations, not samples
                if self._a_counted.get(block.name) == self._forward_index:
                    stat_a.local_count = count_before
                self._a_counted[block.name] = self._forward_index
            result = None
            if backward is not None:
                if self.fisher == "mc":
                    # clone so that a later in-place op (ReLU) cannot change what we differentiate
                    result = output.clone()
                    self._mc_targets.append((output, backward))
                else:
                    output.register_hook(self._timed(backward))
            self.seconds += time.perf_counter() - start
            return result

        return hook

    def _timed(self, backward: BackwardCapture) -> Callable[[torch.Tensor], None]:
        def tensor_hook(grad: torch.Tensor) -> None:
            start = time.perf_counter()
            backward(grad, self.grad_scale())
            self.seconds += time.perf_counter() - start

        return tensor_hook

    def last_factor_forward(self) -> int | None:
        """The forward of a step (1-based) after which no A is captured, when it is known."""
        known = [k for k in (self.stat_micro_batches, self.forwards_per_step) if k is not None]
        return min(known) if known else None

    def _root_hook(self, module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        self._finish_probe()
        self._sample_mc(output)
        if (
            self.on_factors_complete is not None
            and self.enabled
            and self.model.training
            and torch.is_grad_enabled()
            and self.micro_batch == self.last_factor_forward()
        ):
            self.on_factors_complete()

    def _sample_mc(self, output: object) -> None:
        """fisher="mc": one extra backward of a sampled label's loss to the hooked outputs."""
        if self.fisher != "mc" or not self._mc_targets:
            return
        targets, self._mc_targets = self._mc_targets, []
        found = find_logits(output)
        if found is None or found.dim() < 2:
            shape = tuple(found.shape) if found is not None else type(output).__name__
            raise ValueError(
                f"SPNGD fisher='mc' needs the model to return logits (N, classes) or (N, T, ..., vocabulary), as a "
                f"tensor, a .logits attribute or a 'logits' key; got {shape}. Use fisher='empirical' for other outputs."
            )
        start = time.perf_counter()
        with torch.enable_grad():
            logits = found if found.dtype == torch.float64 else found.float()
            flat = logits.reshape(-1, logits.shape[-1])
            sampled = torch.multinomial(torch.softmax(flat.detach(), dim=-1), 1).squeeze(1)
            if logits.dim() == 2:
                loss = F.cross_entropy(flat, sampled)
            else:
                valid = loss_mask(self.model, logits, self._mc_keywords)
                per_position = F.cross_entropy(flat, sampled, reduction="none")
                if valid is None:
                    loss = per_position.mean()
                else:
                    mask = valid.reshape(-1).to(per_position.dtype)
                    # Σ_valid CE / sqrt(n_valid·P): g = P·grad gives Σ_valid ĝĝᵀ·P/n_valid over P samples
                    loss = (per_position * mask).sum() / (mask.sum().clamp_min(1.0) * mask.numel()).sqrt()
            grads = torch.autograd.grad(loss, [t for t, _ in targets], retain_graph=True, allow_unused=True)
        for (_, backward), grad in zip(targets, grads, strict=True):
            if grad is not None:
                backward(grad, 1.0)
        self.seconds += time.perf_counter() - start

    # -- which Linear/Conv2d feeds a BatchNorm (rule 8), found on the first training forward ------
    def _install_probe(self, modules: dict[str, nn.Module]) -> None:
        for name, m in modules.items():
            if isinstance(m, nn.Linear | nn.Conv2d):
                self._probe_handles.append(m.register_forward_hook(self._probe_producer(name)))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                self._probe_handles.append(m.register_forward_pre_hook(self._probe_consumer))

    @staticmethod
    def _probe_key(t: torch.Tensor) -> tuple[int, tuple[int, ...], int]:
        # storage, shape and version rather than identity: ZeRO-3's module hooks hand the next
        # module a detached alias of the output; an in-place op in between changes the version
        return t.data_ptr(), tuple(t.shape), t._version

    def _probe_producer(self, name: str) -> Callable[[nn.Module, tuple[object, ...], object], None]:
        def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            if isinstance(output, torch.Tensor) and output.numel() > 0:
                # keep the tensor alive so that its storage cannot be reused during the probe
                self._probe_outputs[self._probe_key(output)] = (output, name)

        return hook

    def _probe_consumer(self, module: nn.Module, inputs: tuple[object, ...]) -> None:
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor) and x.numel() > 0:
            entry = self._probe_outputs.get(self._probe_key(x))
            if entry is not None:
                self.feeds_bn.add(entry[1])

    def _finish_probe(self) -> None:
        if self._probe_handles:
            for h in self._probe_handles:
                h.remove()
            self._probe_handles = []
            self._probe_outputs = {}


def find_logits(output: object) -> torch.Tensor | None:
    """The logits of a model output.

    The tensor itself, its ``.logits`` (HF ``ModelOutput``), or its ``["logits"]``; ``None`` when
    there are none.
    """
    if isinstance(output, torch.Tensor):
        return output
    found = getattr(output, "logits", None)
    if found is None and isinstance(output, dict):
        found = output.get("logits")
    return found if isinstance(found, torch.Tensor) else None


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal LM whose logits at position t predict the label at t + 1.

    A model whose logits at position t predict the label at t + 1 (HF's causal LM heads shift the
    labels inside their loss): class name ``*ForCausalLM`` or ``*LMHeadModel``.
    """
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def loss_mask(model: nn.Module, logits: torch.Tensor, keywords: Mapping[str, object]) -> torch.Tensor | None:
    """Which positions of ``logits`` (N, T, ..., V) carry a loss term.

    A bool tensor of ``logits.shape[:-1]``, or ``None`` (all): from ``labels`` (-100 ignored;
    shifted for a causal LM, whose last position then has none), else from ``attention_mask``.
    """
    shape = logits.shape[:-1]
    labels = keywords.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == shape:
        if not is_causal_lm(model):
            return labels != -100
        valid = torch.zeros(shape, dtype=torch.bool, device=labels.device)
        valid[:, :-1] = labels[:, 1:] != -100
        return valid
    mask = keywords.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == shape:
        return mask != 0
    return None
