"""``max_factor_dim`` keeps a huge factor diagonal, in bounded memory.

A Llama-shaped untied head with V = 32,000 (hidden 64) keeps its V x V G factor diagonal, warns
once, counts it in the metrics, and takes a standalone step in bounded memory (peak resident set of
a fresh process, ``ru_maxrss``, under 3 GiB; a dense G would be 4 GiB in fp32, 8 GiB with its
inverse).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.dist

SCRIPT = r"""
import json, logging, resource, sys
import torch
import transformers as tf
import spngd_ds

records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("spngd_ds").addHandler(Keep())
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=False)
model = tf.LlamaForCausalLM(cfg)
opt = spngd_ds.SPNGD(model, lr=0.05, damping=1e-3)
ids = torch.randint(0, 32000, (4, 32))
before = model.lm_head.weight.detach().clone()
losses = []
for _ in range(2):
    opt.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    losses.append(float(out.loss))
head = opt.blocks["lm_head"]
print(json.dumps({
    "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "kind": head.kind, "diagonal": sorted(head.diagonal), "g_shape": list(head.stats["G"].value.shape),
    "moved": float((model.lm_head.weight - before).abs().max()),
    "losses": losses, "metric": opt.metrics()["spngd/diagonal_factors"],
    "curvature_bytes": opt.curvature_nbytes(),
    "warnings": [r for r in records if "max_factor_dim" in r],
}))
"""


def test_llama_head_with_32k_vocabulary_steps_in_bounded_memory() -> None:
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(res)
    assert res["kind"] == "kron_diag" and res["diagonal"] == ["G"] and res["g_shape"] == [32000, 1, 1]
    assert res["metric"] == 1.0 and len(res["warnings"]) == 1 and "lm_head.G" in res["warnings"][0]
    assert res["moved"] > 0 and all(abs(loss) < 1e6 for loss in res["losses"])
    assert res["maxrss_kib"] < 3 * 1024 * 1024, res["maxrss_kib"]
    assert res["curvature_bytes"] < 64 * 1024 * 1024
