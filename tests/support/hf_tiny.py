"""Tiny random-init HF transformers built from configs (no download), and their batches.

Also the share of parameters SP-NGD gives curvature. Shared by the coverage tests and the coverage
table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 256


def build(kind: str, device: str | None = None, real_size: bool = False) -> nn.Module:
    """``kind`` one of "gpt2", "bert", "llama", "vit"; tiny (or real-size shapes, for the meta device)."""
    import transformers as tf

    ctx = torch.device(device) if device is not None else torch.device("cpu")
    with ctx:
        torch.manual_seed(0)
        if kind == "gpt2":
            cfg = (
                tf.GPT2Config()
                if real_size
                else tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
            )
            return tf.GPT2LMHeadModel(cfg)
        if kind == "bert":
            sizes = (
                {}
                if real_size
                else {
                    "vocab_size": VOCAB,
                    "hidden_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "intermediate_size": 128,
                    "max_position_embeddings": 64,
                }
            )
            cfg = tf.BertConfig(num_labels=3, **sizes)  # type: ignore[call-arg, arg-type, assignment]
            return tf.BertForSequenceClassification(cfg)  # type: ignore[arg-type]
        if kind == "llama":
            cfg = (
                tf.LlamaConfig(
                    vocab_size=32000,
                    hidden_size=4096,
                    intermediate_size=11008,
                    num_hidden_layers=32,  # type: ignore[assignment]
                    num_attention_heads=32,
                    tie_word_embeddings=False,
                )
                if real_size
                else tf.LlamaConfig(
                    vocab_size=VOCAB,
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=64,
                    tie_word_embeddings=False,
                )
            )
            return tf.LlamaForCausalLM(cfg)  # type: ignore[arg-type]
        if kind == "vit":
            cfg = (
                tf.ViTConfig()
                if real_size
                else tf.ViTConfig(  # type: ignore[assignment, call-arg]
                    image_size=16,
                    patch_size=4,
                    num_channels=3,
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=128,
                    num_labels=3,
                )
            )
            return tf.ViTForImageClassification(cfg)  # type: ignore[arg-type]
    raise ValueError(kind)


def batch(kind: str, n: int = 8, t: int = 16, seed: int = 0) -> dict[str, Any]:
    """Keyword inputs (with labels) for :func:`build`'s model."""
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        pixels = torch.randn(n, 3, 16, 16, generator=g)
        return {"pixel_values": pixels, "labels": torch.randint(0, 3, (n,), generator=g)}
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    if kind == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (n,), generator=g)}
    return {"input_ids": ids, "labels": ids.clone()}


def tied_parameters(model: nn.Module) -> set[int]:
    """Ids of parameters registered in more than one module (tied input/output embeddings)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def coverage(model: nn.Module, **spngd_kwargs: Any) -> tuple[float, list[str]]:
    """Share of trainable parameters in a curvature block, and the fallback lines.

    Tied parameters are counted once; the blocks are those of :func:`spngd_ds.blocks.build_blocks`
    with the options of ``spngd_kwargs``.
    """
    from spngd_ds.blocks import BlockOptions, build_blocks
    from spngd_ds.staleness import RefreshSchedule

    opts = BlockOptions(**spngd_kwargs)
    blocks, fallback = build_blocks(model, lambda: RefreshSchedule(threshold=None), 64.0, opts)
    tied = tied_parameters(model)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in tied)
    curved = sum(p.numel() for b in blocks if b.stats for p in b.params)
    return curved / total, fallback


KINDS_OFF = {"curvature_conv1d": False, "curvature_norm": False, "curvature_embedding": False}
"""The options that give the layer kinds of Linear/Conv2d/BatchNorm only."""
