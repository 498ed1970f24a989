#!/usr/bin/env python3
"""Training FLOPs per token and MFU for decoder-only LLMs (Llama / Qwen2 configs).

Convention of PaLM (Chowdhery et al. 2022, appendix B) and Megatron-LM (Narayanan et al.,
"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", SC 2021):
only matrix multiplications count; norms, activations, softmax, RoPE, the loss and the
optimizer are ignored; causal masking is not discounted (the full s×s score matrix counts).

  N       matmul weights of the decoder layers (q, k, v, o, gate, up, down) plus the LM head
          (counted even when tied: the head is still a matmul); the embedding lookup is not
  L, s    layers, sequence length;  h_a = heads · head_dim (attention width)
  attn    per token and layer, forward: QKᵀ 2·s·h_a + PV 2·s·h_a = 4·s·h_a FLOPs

  full SFT  6·N + 12·L·h_a·s
            forward 2N, backward 4N (input gradients 2N + weight gradients 2N);
            attention forward 4·L·h_a·s, backward twice that (it has no weights, but both
            operands of QKᵀ and PV are activations that need gradients).
  LoRA      4·N + 12·L·h_a·s + 6·N_lora
            frozen base: forward 2N + input gradients 2N, no weight gradients; attention
            as above (no weights, so unchanged); the adapters train fully: 6·N_lora with
            N_lora = Σ r·(d_in + d_out) over the adapted linears (default: all seven, r 16).

  MFU = tokens/s · FLOPs/token / peak FLOP/s   (peak: dense bf16 tensor-core throughput)

    python tools/bench/flops.py MODEL/config.json --seq 2048 --mode lora
"""
import argparse
import json

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s. H200 has H100 SXM's compute.
PEAKS = (("H100 PCIE", 756e12), ("H100", 989e12), ("H200", 989e12))


def linear_shapes(cfg):
    """(d_in, d_out) of each of the seven per-layer linears."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
            "o_proj": (heads * hd, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def matmul_params(cfg):
    """N: decoder-layer linear weights plus the LM head (embedding lookup excluded)."""
    per_layer = sum(a * b for a, b in linear_shapes(cfg).values())
    return cfg["num_hidden_layers"] * per_layer + cfg["vocab_size"] * cfg["hidden_size"]


def lora_params(cfg, rank=16, targets=LINEARS):
    """Trainable adapter weights: r·(d_in + d_out) per adapted linear per layer."""
    shapes = linear_shapes(cfg)
    return cfg["num_hidden_layers"] * sum(rank * sum(shapes[t]) for t in targets)


def model_flops_per_token(cfg, seq, mode, rank=16, targets=LINEARS):
    """Training FLOPs per token (forward + backward) for mode "full" or "lora"."""
    heads = cfg["num_attention_heads"]
    attn_width = heads * (cfg.get("head_dim") or cfg["hidden_size"] // heads)
    attn = 12 * cfg["num_hidden_layers"] * attn_width * seq
    n = matmul_params(cfg)
    if mode == "full":
        return 6 * n + attn
    if mode == "lora":
        return 4 * n + attn + 6 * lora_params(cfg, rank, targets)
    raise ValueError(f"mode must be 'full' or 'lora', not {mode!r}")


def mfu(tokens_per_s, flops_per_token, peak_flops):
    """Model FLOPs utilisation, a fraction of peak (None when the peak is unknown)."""
    return None if not peak_flops else tokens_per_s * flops_per_token / peak_flops


def peak_flops(device_name):
    """Dense bf16 peak FLOP/s of a GPU recognised by name (H100, H200), else None."""
    name = (device_name or "").upper()
    return next((p for key, p in PEAKS if key in name), None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a HF config.json")
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--mode", choices=["lora", "full"], required=True)
    p.add_argument("--rank", type=int, default=16)
    a = p.parse_args()
    with open(a.config) as f:
        cfg = json.load(f)
    fpt = model_flops_per_token(cfg, a.seq, a.mode, a.rank)
    print(json.dumps({"flops_per_token": fpt, "matmul_params": matmul_params(cfg),
                      "lora_params": lora_params(cfg, a.rank) if a.mode == "lora" else 0,
                      "seq": a.seq, "mode": a.mode}))


if __name__ == "__main__":
    main()
