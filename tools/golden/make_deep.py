#!/usr/bin/env python3
"""A six-layer tiny Llama for the interleaved (virtual-stage) pipeline tests.

Two layers (every other fixture) cannot be cut into pp=2 or 3 ranks × 2 or 3 virtual
stages. This one has GQA (4 heads, 2 kv heads), tied embeddings (held by the first and the last pipeline
rank) and randomized norms, in float32. Deterministic:

    python tools/golden/make_deep.py     # writes tests/fixtures/models/llama-deep/

The parallel tests compare every layout against one process of tidemill, so no golden
loss is needed here; the model is checked to reload in transformers with the same logits.
"""
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "models" / "llama-deep"

torch.set_num_threads(2)
torch.manual_seed(404)
cfg = LlamaConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)
cfg._attn_implementation = "eager"
model = LlamaForCausalLM(cfg).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
if OUT.exists():
    shutil.rmtree(OUT)
model.save_pretrained(OUT, safe_serialization=True)
(OUT / "generation_config.json").unlink(missing_ok=True)

ids = torch.tensor([[1, 5, 17, 33, 60, 2, 9, 80]])
loaded = AutoModelForCausalLM.from_pretrained(OUT, dtype=torch.float32, attn_implementation="eager")
with torch.no_grad():
    diff = (model(input_ids=ids).logits - loaded.eval()(input_ids=ids).logits).abs().max().item()
print(f"[llama-deep] reload max |dlogits| = {diff:.3e}")
assert diff == 0.0
