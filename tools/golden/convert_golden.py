#!/usr/bin/env python3
"""Golden values for `launch convert`: does transformers load what it writes?

For each fixture (llama3 in bf16, qwen2 in f16, mixtral in f32, llama-deep), converts the HF
model to a sharded checkpoint at tp2 × pp2 (× ep2 for Mixtral) and back to HF with a
20KB shard limit (so the output has several shards and an index), loads the result with
transformers' AutoModelForCausalLM and compares it with the original: every tensor equal
in value and dtype, and the logits of a fixed input identical. Records the SHA-256 of each
file written; `tests/it/convert.rs` checks that every layout's round trip writes exactly those
bytes, so CI (without Python) knows its output is what transformers loaded here.

    cargo build --bin launch && /tmp/refenv/bin/python tools/golden/convert_golden.py
"""
import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "target" / "debug" / "launch"
OUT = ROOT / "tests" / "fixtures" / "convert_golden.json"
MODELS = {"llama3": [], "qwen2": [], "mixtral": ["--ep", "2"], "llama-deep": []}
MAX_SHARD = "20KB"


def convert(src, dst, *extra):
    subprocess.run([str(LAUNCH), "convert", "--from", src, "--to", dst, *extra], check=True)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


golden = {"transformers": transformers.__version__, "max_shard_size": MAX_SHARD, "models": {}}
torch.manual_seed(0)
ids = torch.randint(0, 96, (2, 9))
for name, extra in MODELS.items():
    src = ROOT / "tests" / "fixtures" / "models" / name
    with tempfile.TemporaryDirectory() as tmp:
        sharded = Path(tmp) / "sharded"
        hf = Path(tmp) / "hf"
        convert(f"hf:{src}", f"sharded:{sharded}", "--tp", "2", "--pp", "2", *extra)
        convert(f"sharded:{sharded}", f"hf:{hf}", "--max-shard-size", MAX_SHARD)
        a = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
        b = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys(), (name, sa.keys() ^ sb.keys())
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (name, k)
        with torch.no_grad():
            diff = (a(ids).logits.float() - b(ids).logits.float()).abs().max().item()
        assert diff == 0.0, (name, diff)
        files = {p.name: sha256(p) for p in sorted(hf.iterdir())}
        golden["models"][name] = {
            "dtype": str(b.dtype),
            "tensors": len(sb),
            "logits_max_abs_diff": diff,
            "files": files,
        }
        print(name, len(files), "files, logits identical, dtype", b.dtype)
OUT.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")
print("wrote", OUT)
