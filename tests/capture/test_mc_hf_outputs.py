"""``fisher="mc"`` on HF-style outputs.

Logits as ``.logits`` or ``["logits"]``, 3-D (N, T, V), positions without a loss term left out of G
(mask from ``labels`` with -100, shifted by one for a causal LM, else from ``attention_mask``). The
sampled labels are recorded, and the head's G is compared with the float64 formula (1/n_valid)
Σ_valid ĝ ĝᵀ, ĝ = softmax − e_ŷ.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spngd_ds
from tests.support import hf_tiny

N, T, V, D = 3, 5, 6, 4


def make_model(class_name: str, as_dict: bool) -> nn.Module:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(V, D)
            self.head = nn.Linear(D, V)
            self.double()

        def forward(self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None) -> Any:
            logits = self.head(torch.tanh(self.emb(input_ids)))
            return {"logits": logits} if as_dict else types.SimpleNamespace(logits=logits, loss=None)

    Tiny.__name__ = class_name
    return Tiny()


def run(model: nn.Module, monkeypatch: pytest.MonkeyPatch, **kw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One MC step (lr 0); returns the head's G, the sampled labels (N, T) and the logits."""
    drawn: list[Tensor] = []
    real = torch.multinomial

    def recording(*args: Any, **kwargs: Any) -> Tensor:
        out = real(*args, **kwargs)
        drawn.append(out.clone())
        return out

    monkeypatch.setattr(torch, "multinomial", recording)
    opt = spngd_ds.SPNGD(model, lr=0.0, momentum=0.0, damping=1e-3, staleness=None, fisher="mc")
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(3))
    out = model(ids, **kw)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    logits.sum().backward()  # any loss: MC statistics ignore it
    opt.step()
    assert len(drawn) == 1
    return opt.blocks["head"].stats["G"].value, drawn[0].view(N, T), logits.detach()


def expected_g(logits: Tensor, sampled: Tensor, valid: Tensor) -> Tensor:
    g = F.softmax(logits, -1) - F.one_hot(sampled, V).to(logits.dtype)
    g = g * valid[..., None]
    rows = g.reshape(-1, V)
    return rows.t() @ rows / valid.sum()


@pytest.mark.parametrize("as_dict", [True, False])
def test_labels_mask_token_classifier(as_dict: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(4))
    labels[0, 3:] = -100
    labels[2, 0] = -100
    g, sampled, logits = run(make_model("TinyForTokenClassification", as_dict), monkeypatch, labels=labels)
    ref = expected_g(logits, sampled, (labels != -100).double())
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-14)


def test_labels_mask_shifted_for_causal_lm(monkeypatch: pytest.MonkeyPatch) -> None:
    labels = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(4))
    labels[1, 2:] = -100  # padding at the end of sequence 1
    g, sampled, logits = run(make_model("TinyForCausalLM", True), monkeypatch, labels=labels)
    valid = torch.zeros(N, T)
    valid[:, :-1] = (labels[:, 1:] != -100).double()
    torch.testing.assert_close(g, expected_g(logits, sampled, valid.double()), rtol=1e-10, atol=1e-14)
    assert valid.sum() == N * (T - 1) - 3


def test_attention_mask_without_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    mask = torch.ones(N, T, dtype=torch.long)
    mask[2, 3:] = 0
    g, sampled, logits = run(make_model("TinyForCausalLM", False), monkeypatch, attention_mask=mask)
    torch.testing.assert_close(g, expected_g(logits, sampled, mask.double()), rtol=1e-10, atol=1e-14)


def test_no_mask_every_position(monkeypatch: pytest.MonkeyPatch) -> None:
    g, sampled, logits = run(make_model("TinyModel", True), monkeypatch)
    torch.testing.assert_close(
        g, expected_g(logits, sampled, torch.ones(N, T, dtype=torch.float64)), rtol=1e-10, atol=1e-14
    )


def test_outputs_without_logits_are_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Flatten(0))
    opt = spngd_ds.SPNGD(model, fisher="mc")
    with pytest.raises(ValueError, match="fisher='mc' needs the model to return logits"):
        model(torch.randn(2, 3))
    del opt


def test_gpt2_runs_with_mc_fisher() -> None:
    """A tiny HF GPT-2 (ModelOutput, 3-D logits, labels) takes MC-Fisher steps with finite loss."""
    pytest.importorskip("transformers")
    logging.getLogger("spngd_ds").setLevel(logging.ERROR)
    model = hf_tiny.build("gpt2")
    opt = spngd_ds.SPNGD(model, lr=0.02, damping=1e-2, fisher="mc", staleness=None)
    batch = hf_tiny.batch("gpt2")
    batch["labels"][:, -4:] = -100
    losses = []
    for _ in range(3):
        opt.zero_grad()
        out = model(**batch)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    stale = [f"{b.name}.{s.name}" for b in opt.blocks.values() for s in b.stats.values() if s.refreshes != 3]
    assert not stale, stale
