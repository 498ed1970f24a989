#!/usr/bin/env python3
"""Helpers of tools/bench/convert.sh (run with the reference venv's python).

  convert_ref.py make DIR LAYERS          a random bf16 Llama (h 2048, GQA 16/4 heads,
                                          vocab 32000) saved as HF shards of 1 GB + index
  convert_ref.py to-sharded HF PLAN OUT   what `launch convert --to sharded` does, with the
                                          safetensors library: the boxes our manifest PLAN
                                          lists, file by file (get_slice + save_file), each
                                          file's SHA-256, a manifest
  convert_ref.py to-hf SHARDED OUT        what `launch convert --to hf` does: each tensor
                                          assembled from its pieces, 5 GB shards + index
  convert_ref.py medium DIR               an f32 Llama (h 512, 4 layers) for the save bench
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def config(hidden, layers, inter, heads, kv, dtype):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "dtype": dtype,
    }


def llama(out, layers, hidden, inter, heads, kv, dtype, max_shard):
    out = Path(out)
    out.mkdir(parents=True)
    c = config(hidden, layers, inter, heads, kv, str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(c, indent=2))
    d, kvd = hidden, hidden // heads * kv
    shapes = {"model.embed_tokens.weight": (32000, d), "model.norm.weight": (d,),
              "lm_head.weight": (32000, d)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.self_attn.q_proj.weight": (d, d), f"{p}.self_attn.k_proj.weight": (kvd, d),
                   f"{p}.self_attn.v_proj.weight": (kvd, d), f"{p}.self_attn.o_proj.weight": (d, d),
                   f"{p}.mlp.gate_proj.weight": (inter, d), f"{p}.mlp.up_proj.weight": (inter, d),
                   f"{p}.mlp.down_proj.weight": (d, inter),
                   f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,)}
    g = torch.Generator().manual_seed(0)
    shards, cur, size = [], {}, 0
    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        n = t.numel() * t.element_size()
        if cur and size + n > max_shard:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, s in enumerate(shards, 1):
        f = f"model-{i:05}-of-{len(shards):05}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(s, out / f, metadata={"format": "pt"})
        for k, t in s.items():
            weight_map[k] = f
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        idx = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def hf_files(hf):
    hf = Path(hf)
    index = hf / "model.safetensors.index.json"
    if index.exists():
        return {k: hf / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(hf / "model.safetensors", "pt") as f:
        return {k: hf / "model.safetensors" for k in f.keys()}


def to_sharded(hf, plan, out):
    plan = json.loads(Path(plan).read_text())
    out = Path(out)
    out.mkdir(parents=True)
    where = hf_files(hf)
    handles = {}
    by_file = {}
    for name, t in plan["tensors"].items():
        for p in t["pieces"]:
            by_file.setdefault(p["file"], []).append((name, p["start"], p["len"]))
    files = {}
    for file, pieces in sorted(by_file.items()):
        tensors = {}
        for name, start, length in pieces:
            src = where[name]
            f = handles.setdefault(src, safe_open(src, "pt"))
            box = tuple(slice(s, s + n) for s, n in zip(start, length))
            tensors[name] = (f.get_slice(name)[box] if box else f.get_tensor(name)).contiguous()
        save_file(tensors, out / file, metadata={"format": "pt"})
        fsync(out / file)
        files[file] = {"bytes": (out / file).stat().st_size, "sha256": sha256(out / file)}
    manifest = dict(plan, files=files)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def to_hf(sharded, out, max_shard=5_000_000_000):
    sharded, out = Path(sharded), Path(out)
    out.mkdir(parents=True)
    m = json.loads((sharded / "manifest.json").read_text())
    handles = {f: safe_open(sharded / f, "pt") for f in m["files"]}
    names = sorted(n for n in m["tensors"] if not n.startswith("optimizer."))
    shards, cur, size = [], [], 0
    for n in names:
        t = m["tensors"][n]
        nbytes = {"F32": 4, "BF16": 2, "F16": 2}[t["dtype"].upper()]
        for d in t["shape"]:
            nbytes *= d
        if cur and size + nbytes > max_shard:
            shards.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        f = f"model-{i:05}-of-{len(shards):05}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        for n in shard:
            t = m["tensors"][n]
            parts = [(p, handles[p["file"]].get_tensor(n)) for p in t["pieces"]]
            whole = torch.empty(t["shape"], dtype=parts[0][1].dtype)
            for p, v in parts:
                whole[tuple(slice(s, s + k) for s, k in zip(p["start"], p["len"]))] = v
            tensors[n] = whole
            weight_map[n] = f
            total += whole.numel() * whole.element_size()
        save_file(tensors, out / f, metadata={"format": "pt"})
        fsync(out / f)
    if len(shards) > 1:
        idx = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "make":
        llama(args[0], int(args[1]), 2048, 5632, 16, 4, torch.bfloat16, 1 << 30)
    elif cmd == "medium":
        llama(args[0], 4, 512, 1408, 8, 8, torch.float32, 5_000_000_000)
    elif cmd == "to-sharded":
        to_sharded(*args)
    elif cmd == "to-hf":
        to_hf(*args)
    else:
        sys.exit(__doc__)
