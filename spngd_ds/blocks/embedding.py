"""Kronecker block of an nn.Embedding (docs/design.md rules 10 and 12).

An embedding is a Linear without bias on one-hot rows: s = Wᵀ e_k, W (V, d). Its A factor is
diagonal, A = diag(token counts)/n (``padding_idx`` not counted), kept as a (V, 1, 1) vector; G is
the (d, d) Gram of the output gradients g = n·∂L/∂s (diagonal too above ``max_factor_dim``). With
``positions_as_samples`` every looked-up index is a sample (n = number of indices); otherwise the
leading dim is (n = N, G over N·T rows divided by n·T). π from the traces as in rule 5, and
P(∇W) = Â⁻¹ ∇W Ĝ⁻¹ (the Linear layout transposed).

A lookup broadcast over the batch (indices (1, T) in a forward of N sequences: HF's position
embeddings) sees each output gradient summed over the N sequences. It counts N·T samples (A: the
counts times N), and G takes (Σ_i g_i)(Σ_i g_i)ᵀ for Σ_i g_i g_iᵀ, exact in expectation when the
sequences' gradients are independent with mean zero (N times the G of the summed rows alone).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from spngd_ds.blocks.base import Block, InversionJob, Statistic
from spngd_ds.blocks.diagonal import apply_left, apply_right
from spngd_ds.blocks.kron import pair_inversion_job
from spngd_ds.blocks.shapes import full_shape
from spngd_ds.staleness import RefreshSchedule


def embedding_supported(module: nn.Module) -> bool:
    """A dense-gradient nn.Embedding whose gradient is the plain sum over its lookups."""
    return isinstance(module, nn.Embedding) and not module.sparse and not module.scale_grad_by_freq


class EmbeddingBlock(Block):
    """A diagonal ⊗ dense (or diagonal) Kronecker block of one nn.Embedding."""

    kind = "embedding"

    def __init__(
        self,
        name: str,
        module: nn.Embedding,
        schedule: Callable[[], RefreshSchedule],
        positions_as_samples: bool = True,
        max_dim: int | None = None,
    ):
        """The block of ``module``'s weight (vocab, D): a diagonal A and a dense (or diagonal) G."""
        weight = module.weight
        assert isinstance(weight, nn.Parameter)
        super().__init__(name, module, [weight])
        shape = full_shape(module.weight)
        self.vocab, self.d_G = int(shape[0]), int(shape[1])
        self.padding_idx = module.padding_idx
        self.positions_as_samples = positions_as_samples
        self.diagonal = {"A"} | ({"G"} if max_dim is not None and self.d_G > max_dim else set())
        g_shape = (self.d_G, 1, 1) if "G" in self.diagonal else (self.d_G, self.d_G)
        self.stats = {
            "A": Statistic("A", schedule(), (self.vocab, 1, 1)),
            "G": Statistic("G", schedule(), g_shape),
        }
        self.pi = 1.0
        self.vectors_per_sample: dict[str, float] = {"A": 1.0, "G": 1.0}
        #: the model's batch size in the current forward (set by the capture), for broadcast lookups
        self.batch_hint: int | None = None

    def samples_in(self, idx: torch.Tensor) -> int:
        """Samples in an index tensor (..., ) or its output gradient (..., d) (``lookup_dims``)."""
        if idx.dim() == 0:
            return 1
        return idx.numel() if self.positions_as_samples or idx.dim() == 1 else int(idx.shape[0])

    def capture_forward(self, inputs: torch.Tensor, due: set[str]) -> Callable[[torch.Tensor, float], None] | None:
        """Count the token ids of ``inputs`` into A when due; return G's capture when due."""
        idx = inputs.detach()
        n = self.samples_in(idx)
        per_sample = max(idx.numel(), 1) / max(n, 1)
        hint = self.batch_hint
        # a lookup broadcast over the batch: every index serves `copies` sequences
        copies = hint if hint is not None and hint > 1 and idx.dim() >= 2 and idx.shape[0] == 1 else 1
        n_seen = n * copies
        if "A" in due:
            flat = idx.reshape(-1).long()
            counts = torch.zeros(self.vocab, dtype=self.dtype, device=idx.device)
            counts.index_add_(0, flat, torch.ones(flat.shape[0], dtype=self.dtype, device=idx.device))
            if self.padding_idx is not None:
                counts[self.padding_idx] = 0.0
            self.vectors_per_sample["A"] = per_sample
            self.stats["A"].add(counts.mul_(copies).view(-1, 1, 1), n_seen, fresh=True)
        if "G" not in due:
            return None

        def capture_backward(grad: torch.Tensor, scale: float) -> None:
            rows = grad.detach().reshape(-1, self.d_G).to(self.dtype)
            gram = rows.pow(2).sum(0).view(-1, 1, 1) if "G" in self.diagonal else rows.t() @ rows
            self.vectors_per_sample["G"] = per_sample
            self.stats["G"].add(gram.mul_((n_seen * scale) ** 2 / per_sample), n_seen, fresh=True)

        return capture_backward

    def normalise(self, name: str, total: torch.Tensor, count: float) -> torch.Tensor:
        """Mean over ``count`` samples; notes ρ for the staleness rule."""
        value = total / count
        # ρ as device figures, read back with every due statistic's at once (no synchronisation here)
        self.stats[name].schedule.note_value_figures(value, self.vectors_per_sample[name], count)
        return value

    def inversion_job(self, damping: float, refreshed: set[str]) -> InversionJob | None:
        """Rule 5 on A (diagonal) and G for the statistics due in ``refreshed``, or ``None``."""
        return pair_inversion_job(self, damping, refreshed)

    def precondition(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Â⁻¹ ∇W Ĝ⁻¹ for the weight gradient (vocab, D), in its dtype."""
        a_inv, g_inv = self.stats["A"].inverse, self.stats["G"].inverse
        if a_inv is None or g_inv is None:
            return grads
        p = apply_right(apply_left(a_inv, grads[0].reshape(self.vocab, self.d_G).to(self.dtype)), g_inv)
        return [p.reshape(grads[0].shape).to(grads[0].dtype)]

    def inversion_cost(self) -> float:
        """The vocabulary size (diagonal A) plus d_G³ (or d_G when G is diagonal)."""
        return float(self.vocab + (self.d_G if "G" in self.diagonal else self.d_G**3))

    def memory_cost(self) -> float:
        """The vocabulary size (diagonal A) plus d_G² (or d_G when G is diagonal)."""
        return float(self.vocab + (self.d_G if "G" in self.diagonal else self.d_G**2))
