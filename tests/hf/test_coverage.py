"""Tiny random-init HF transformers (GPT-2, BERT classifier, Llama with an untied head, ViT) under standalone SP-NGD.

The share of parameters with curvature, and 20 steps on one batch with a finite, falling loss.
``python tests/hf/test_coverage.py`` prints the coverage table, tiny and real-size (built on the
meta device).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run as a script
from tests.support import hf_tiny  # noqa: E402

pytest.importorskip("transformers")

KINDS = ["gpt2", "bert", "llama", "vit"]


@pytest.mark.parametrize("kind", KINDS)
def test_coverage_with_every_kind_on(kind: str) -> None:
    model = hf_tiny.build(kind)
    share, fallback = hf_tiny.coverage(model)
    before, _ = hf_tiny.coverage(model, **hf_tiny.KINDS_OFF)
    print(f"{kind}: {before:.1%} -> {share:.1%}; first order: {fallback}")
    assert share >= 0.95, (share, fallback)
    assert all("shares a parameter" in line or "ViTEmbeddings" in line for line in fallback), fallback
    if kind == "gpt2":  # tied wte / lm_head stay first order and are named
        assert any(line.startswith("transformer.wte (Embedding): shares a parameter with lm_head") for line in fallback)


@pytest.mark.parametrize("kind", KINDS)
def test_twenty_steps_fall(kind: str) -> None:
    """SP-NGD at lr 0.05, damping 1e-3, one batch of 8, every kind on, the defaults otherwise.

    Rule 13's step bound (on by default, fed the loss through ``observe_loss``) keeps the steps safe
    once the batch is memorised (the loss near zero: without the bound BERT and ViT blow up there,
    also with only Linear blocks).
    """
    import spngd_ds

    logging.getLogger("spngd_ds").setLevel(logging.ERROR)
    model = hf_tiny.build(kind)
    opt = spngd_ds.SPNGD(model, lr=0.05, damping=1e-3)
    batch = hf_tiny.batch(kind)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        out = model(**batch)
        out.loss.backward()
        opt.observe_loss(out.loss)
        opt.step()
        losses.append(float(out.loss.detach()))
    print(kind, [round(x, 3) for x in losses])
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.9 * losses[0] and min(losses[-5:]) < min(losses[:5]), losses
    assert opt.metrics()["spngd/inversion_failures"] == 0


def table() -> None:
    """Coverage before (Linear/Conv2d/BatchNorm only) and after, tiny and real-size."""
    import torch

    for real in (False, True):
        for kind in KINDS:
            try:
                model = hf_tiny.build(kind, device="meta" if real else None, real_size=real)
            except Exception as exc:  # noqa: BLE001 - a model that cannot be built on meta is reported
                print(f"| {kind} ({'real' if real else 'tiny'}) | not built: {exc} |")
                continue
            params = sum(p.numel() for p in model.parameters())
            before, _ = hf_tiny.coverage(model, **hf_tiny.KINDS_OFF)
            after, fallback = hf_tiny.coverage(model)
            default, _ = hf_tiny.coverage(model)
            print(
                f"| {kind} ({'real' if real else 'tiny'}, {params / 1e6:.2f}M) | {before:.1%} | {after:.1%} | "
                f"{default:.1%} | {'; '.join(fallback) or '-'} |"
            )
            del model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    table()
