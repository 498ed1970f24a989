#!/usr/bin/env python3
"""A random-init HF model and a pre-tokenized data set for throughput benchmarks.

Writes DIR/config.json + DIR/model.safetensors (bfloat16, one file, seed 0, created with
`AutoModelForCausalLM.from_config`: real random values, no hub access) and
DIR/train.jsonl: N lines `{"input_ids": [...]}` of exactly S token ids drawn uniformly
from [0, vocab) (seed 0). No tokenizer is written: tidemill and gpu_torch.py read the
ids directly.

  shape        family   hidden layers heads kv  ffn    vocab   like
  qwen2-0.5b   Qwen2    896    24     14    2   4864   151936  Qwen2.5-0.5B (tied)
  llama-1b     Llama    2048   16     32    8   8192   128256  Llama-3.2-1B (tied, llama3 RoPE)
  tiny-qwen2   Qwen2    64     2      4     2   128    512     CPU dry runs
  tiny-llama   Llama    64     2      4     2   128    512     CPU dry runs

    python tools/bench/make_bench_model.py --shape llama-1b --out /tmp/llama-1b
    python tools/bench/make_bench_model.py --shape tiny-llama --out /tmp/tiny --seq 128 --samples 16
"""
import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config  # noqa: E402
from transformers.utils import logging  # noqa: E402

QWEN2 = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
             use_sliding_window=False)
LLAMA = dict(rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True,
             rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512)
SHAPES = {
    "qwen2-0.5b": (Qwen2Config, QWEN2 | dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                             num_key_value_heads=2, intermediate_size=4864, vocab_size=151936)),
    "llama-1b": (LlamaConfig, LLAMA | dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                           num_key_value_heads=8, intermediate_size=8192, vocab_size=128256)),
    "tiny-qwen2": (Qwen2Config, QWEN2 | TINY),
    "tiny-llama": (LlamaConfig, LLAMA | TINY),
    # The CPU step-time benchmark's larger model (tools/bench/step_time.sh).
    "cpu-wide": (LlamaConfig, LLAMA | dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                           num_key_value_heads=4, intermediate_size=688, vocab_size=512)),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=SHAPES)
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq", type=int, default=2048)
    a = p.parse_args()
    logging.disable_progress_bar()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    cls, kw = SHAPES[a.shape]
    cfg = cls(**kw)
    torch.manual_seed(0)
    # Created directly in bf16: half the RAM and init time of f32, same file.
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    n_params = sum(t.numel() for t in model.parameters())
    t_init = time.perf_counter()
    model.save_pretrained(out, max_shard_size="100GB")  # one model.safetensors
    del model
    t1 = time.perf_counter()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (a.samples, a.seq), generator=g)
    with open(out / "train.jsonl", "w") as f:
        for row in ids.tolist():
            f.write(json.dumps({"input_ids": row}) + "\n")
    t2 = time.perf_counter()

    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"shape": a.shape, "out": str(out), "params": n_params, "safetensors_bytes": size,
                      "samples": a.samples, "seq": a.seq, "init_s": round(t_init - t0, 2),
                      "save_s": round(t1 - t_init, 2),
                      "data_s": round(t2 - t1, 2)}))


if __name__ == "__main__":
    main()
