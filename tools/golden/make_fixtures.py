#!/usr/bin/env python3
"""Generate tiny reference models + golden losses for tidemill's numerical tests.

Everything is created locally from configs with a fixed seed (no hub downloads).
Run from anywhere:

    python tools/golden/make_fixtures.py            # writes tests/fixtures/

Requires torch, transformers (5.x), safetensors; peft only for the version stamp.

Output (relative to the repository root):
  tests/fixtures/models/{llama2,llama3,qwen2,mixtral}/   HF model dirs
  tests/fixtures/data/eval_tokens.jsonl                  6 pre-tokenized samples
  tests/fixtures/data/train_tokens.jsonl                 16 pre-tokenized samples
  tests/fixtures/golden.json                             reference losses

Golden loss definition (transformers semantics): every sample is run on its own
(batch 1, no padding, position_ids 0..n-1, eager attention, float32 compute).
labels = sample["labels"] if present else input_ids.  For t in 0..n-2 the
cross-entropy of logits[t] against labels[t+1] is summed where labels[t+1] != -100.
loss = (sum over all samples) / (number of supervised tokens over all samples).
The CE is evaluated in float64 from the float32 logits.
"""
import copy
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

try:
    import peft

    PEFT_VERSION = peft.__version__
except Exception:  # pragma: no cover
    PEFT_VERSION = None

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures"
MODELS = OUT / "models"
DATA = OUT / "data"

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    max_position_embeddings=64,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

torch.set_num_threads(2)


# --------------------------------------------------------------------------- data
def make_data():
    rng = random.Random(1234)

    def sample(n, mask_prefix):
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        ids[0] = 1  # bos-like first token
        rec = {"input_ids": ids}
        if mask_prefix is not None:
            rec["labels"] = [-100] * mask_prefix + ids[mask_prefix:]
        return rec

    # eval: lengths 5..40; samples 1, 3, 4 have prompt-masked labels
    eval_spec = [(17, None), (5, 2), (40, None), (23, 9), (31, 30), (12, None)]
    # sample 4: only labels[30] supervised -> exactly 1 supervised token
    eval_rows = [sample(n, m) for n, m in eval_spec]

    train_rows = []
    for i in range(16):
        n = rng.randint(6, 30)
        m = rng.randint(1, n - 2) if i % 3 == 1 else None
        train_rows.append(sample(n, m))
    return eval_rows, train_rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


# --------------------------------------------------------------------------- helpers
def randomize_norms(model, std=0.1):
    """Non-trivial RMSNorm weights (1 + N(0, std)) so a loader that ignores them fails."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + std * torch.randn_like(p))


def round_trip_dtype(model, dtype):
    """Round all parameters to `dtype` and back to float32 in place."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


@torch.no_grad()
def all_logits(model, rows):
    out = []
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        out.append(model(input_ids=ids, position_ids=pos).logits[0].float())
    return out


@torch.no_grad()
def golden_for(model, rows):
    model.eval()
    per = []
    tot_sum, tot_n = 0.0, 0
    for r, logits in zip(rows, all_logits(model, rows)):
        ids = r["input_ids"]
        labels = torch.tensor(r.get("labels", ids))
        tgt = labels[1:]
        lg = logits[:-1].double()
        mask = tgt != -100
        ce = torch.nn.functional.cross_entropy(lg[mask], tgt[mask], reduction="sum").item()
        n = int(mask.sum())
        # cross-check against transformers' own loss (float32 internally)
        hf = model(input_ids=torch.tensor([ids]), labels=labels.unsqueeze(0)).loss.item()
        assert abs(hf * n - ce) < 1e-4 * max(1.0, abs(ce)), (hf * n, ce)
        per.append({"loss_sum": ce, "tokens": n})
        tot_sum += ce
        tot_n += n
    return {"loss": tot_sum / tot_n, "tokens": tot_n, "samples": len(rows), "per_sample": per}


def check_reload(name, ref_model, rows, atol=1e-5):
    path = MODELS / name
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    loaded.eval()
    a = all_logits(ref_model, rows)
    b = all_logits(loaded, rows)
    md = max((x - y).abs().max().item() for x, y in zip(a, b))
    print(f"[{name}] reload max |dlogits| = {md:.3e}")
    assert md <= atol, f"{name}: reloaded logits differ by {md}"
    return loaded


def fresh_dir(name):
    d = MODELS / name
    if d.exists():
        shutil.rmtree(d)
    return d


def new_model(cls, cfg, seed):
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    m = cls(cfg)
    m.eval()
    return m


# --------------------------------------------------------------------------- models
def build_llama2(rows):
    cfg = LlamaConfig(
        **COMMON,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    m = new_model(LlamaForCausalLM, cfg, 101)
    randomize_norms(m)
    d = fresh_dir("llama2")
    m.save_pretrained(d, safe_serialization=True)
    # Rewrite config.json in the pre-transformers-5 (Llama-2 Hub) style.
    cj = json.loads((d / "config.json").read_text())
    assert cj["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}, cj["rope_parameters"]
    old = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.initializer_range,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "llama",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
        "use_cache": True,
        "vocab_size": VOCAB,
    }
    (d / "config.json").write_text(json.dumps(old, indent=2) + "\n")
    gc = d / "generation_config.json"
    if gc.exists():
        gc.unlink()
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"], os.listdir(d)
    return check_reload("llama2", m, rows)


def build_llama3(rows):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    }
    cfg = LlamaConfig(
        **COMMON,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=True,
        attention_bias=False,
    )
    m = new_model(LlamaForCausalLM, cfg, 202)
    randomize_norms(m)
    # the llama3 scaling must really change the inverse frequencies at head_dim 16
    inv = m.model.rotary_emb.inv_freq.double()
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    changed = (inv - base).abs() > 1e-9 * base
    print(f"[llama3] inv_freq scaled:   {[f'{x:.6g}' for x in inv.tolist()]}")
    print(f"[llama3] inv_freq unscaled: {[f'{x:.6g}' for x in base.tolist()]}")
    assert changed.sum() >= 2, "llama3 rope scaling did not change the frequencies"
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(), "not tied"
    round_trip_dtype(m, torch.bfloat16)
    d = fresh_dir("llama3")
    # save a bf16 copy; m itself (and its f32 rotary inv_freq buffer) stays float32
    copy.deepcopy(m).to(torch.bfloat16).save_pretrained(d, safe_serialization=True, max_shard_size="20KB")
    gc = d / "generation_config.json"
    if gc.exists():
        gc.unlink()
    cj = json.loads((d / "config.json").read_text())
    assert cj["rope_parameters"]["rope_type"] == "llama3" and "rope_theta" not in cj, cj
    assert cj["tie_word_embeddings"] is True and cj["head_dim"] == 16
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) >= 2, shards
    for s in shards:
        with safe_open(d / s, "pt") as f:
            for k in f.keys():
                assert f.get_slice(k).get_dtype() == "BF16", (s, k)
    assert "lm_head.weight" not in idx["weight_map"], "tied head should not be stored"
    print(f"[llama3] shards: {shards}")
    return check_reload("llama3", m, rows)


def build_qwen2(rows):
    cfg = Qwen2Config(
        **COMMON,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=None,
    )
    m = new_model(Qwen2ForCausalLM, cfg, 303)
    randomize_norms(m)
    with torch.no_grad():
        for layer in m.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                assert proj.bias is not None
                proj.bias.normal_(mean=0.0, std=0.2)
    round_trip_dtype(m, torch.float16)
    d = fresh_dir("qwen2")
    copy.deepcopy(m).to(torch.float16).save_pretrained(d, safe_serialization=True)
    gc = d / "generation_config.json"
    if gc.exists():
        gc.unlink()
    with safe_open(d / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all(f.get_slice(k).get_dtype() == "F16" for k in keys)
        assert "model.layers.0.self_attn.q_proj.bias" in keys
        assert f.get_tensor("model.layers.0.self_attn.k_proj.bias").abs().max() > 0.05
    return check_reload("qwen2", m, rows)


def legacy_mixtral_state_dict(model, n_layers, n_experts, inter):
    """Legacy Hub layout from the in-memory (fused) transformers-5 parameters.

    transformers 5 MixtralExperts: gate_up_proj [E, 2I, H]; forward does
    linear(x, gate_up_proj[e]).chunk(2, -1) -> (gate, up), act(gate) * up, then
    linear(., down_proj[e]) with down_proj [E, H, I].  conversion_mapping.py
    ("mixtral") maps block_sparse_moe -> mlp and merges experts.*.w1 / w3 with
    MergeModulelist(dim=0) + Concatenate(dim=1), i.e. gate_up_proj[e] = cat(w1, w3, 0),
    and experts.*.w2 -> down_proj[e].
    """
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous().clone()
        if ".mlp.experts.gate_up_proj" in k:
            pre = k.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            for e in range(n_experts):
                sd[f"{pre}.{e}.w1.weight"] = v[e, :inter].contiguous()
                sd[f"{pre}.{e}.w3.weight"] = v[e, inter:].contiguous()
        elif ".mlp.experts.down_proj" in k:
            pre = k.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(n_experts):
                sd[f"{pre}.{e}.w2.weight"] = v[e].contiguous()
        elif ".mlp.gate.weight" in k:
            sd[k.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")] = v
        else:
            sd[k] = v
    return sd


def build_mixtral(rows):
    E, I = 4, 48
    cfg = MixtralConfig(
        **COMMON,
        intermediate_size=I,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=E,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    m = new_model(MixtralForCausalLM, cfg, 404)
    randomize_norms(m)
    d = fresh_dir("mixtral")
    m.save_pretrained(d, safe_serialization=True)
    gc = d / "generation_config.json"
    if gc.exists():
        gc.unlink()
    with safe_open(d / "model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    fused = [k for k in saved if "gate_up_proj" in k or "experts.down_proj" in k]
    print(f"[mixtral] save_pretrained wrote {'FUSED' if fused else 'legacy per-expert'} layout "
          f"({len(saved)} tensors, e.g. {sorted(k for k in saved if 'layers.0.' in k and ('moe' in k or 'mlp' in k))[:4]})")
    legacy = legacy_mixtral_state_dict(m, cfg.num_hidden_layers, E, I)
    if fused or set(saved) != set(legacy) or any(not torch.equal(saved[k], legacy[k]) for k in legacy):
        print("[mixtral] rewriting model.safetensors in the legacy Hub layout")
        save_file(legacy, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        print("[mixtral] on-disk tensors equal the hand-converted legacy layout")
    with safe_open(d / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    assert not any("gate_up_proj" in k or ".mlp." in k for k in keys)
    return check_reload("mixtral", m, rows)


# --------------------------------------------------------------------------- main
def main():
    eval_rows, train_rows = make_data()
    write_jsonl(DATA / "eval_tokens.jsonl", eval_rows)
    write_jsonl(DATA / "train_tokens.jsonl", train_rows)
    MODELS.mkdir(parents=True, exist_ok=True)

    golden = {
        "generated_with": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "peft": PEFT_VERSION,
            "python": sys.version.split()[0],
            "script": "tools/golden/make_fixtures.py",
        },
        "definition": (
            "per sample (batch 1, no padding, position_ids 0..n-1, eager attention, float32): "
            "labels = labels or input_ids; sum CE(logits[t], labels[t+1]) for t in 0..n-2 where "
            "labels[t+1] != -100 (CE in float64 from float32 logits); loss = total sum / total tokens "
            "over tests/fixtures/data/eval_tokens.jsonl"
        ),
        "ln_vocab": math.log(VOCAB),
    }
    for name, build in [
        ("llama2", build_llama2),
        ("llama3", build_llama3),
        ("qwen2", build_qwen2),
        ("mixtral", build_mixtral),
    ]:
        m = build(eval_rows)
        g = golden_for(m, eval_rows)
        assert abs(g["loss"] - math.log(VOCAB)) > 0.25, (name, g["loss"])
        if name == "llama2":
            g["logits_first_sample_first_row"] = all_logits(m, eval_rows[:1])[0][0, :8].tolist()
        golden[name] = g
        print(f"[{name}] golden loss {g['loss']!r} over {g['tokens']} tokens (ln 96 = {math.log(VOCAB):.4f})")

    # json.dumps uses repr() for floats -> full float64 round-trip precision
    (OUT / "golden.json").write_text(json.dumps(golden, indent=2) + "\n")
    print("wrote", OUT / "golden.json")


if __name__ == "__main__":
    main()
