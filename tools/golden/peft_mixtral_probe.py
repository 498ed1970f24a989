"""Probe: does peft (0.21.x) + transformers (5.x) load classic (v4-style) Mixtral expert LoRA adapters?

Usage: /tmp/refenv/bin/python tools/golden/peft_mixtral_probe.py [--keep DIR]

1. Writes a classic adapter (keys ...block_sparse_moe.experts.E.w{1,2,3}.lora_{A,B}.weight, plus q_proj/v_proj)
   with random nonzero A/B, loads it with PeftModel.from_pretrained and with model.load_adapter, and compares
   logits against a manual merge W + (alpha/r) B A into the fused gate_up_proj / down_proj.
2. Creates a native v5 adapter via get_peft_model(target_parameters=[...]) and dumps keys/shapes/config, and
   checks the per-expert layout math against the forward pass.
3. Llama classic adapter via get_peft_model + save_pretrained: dump keys/config.
"""

import copy
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import peft
from peft import LoraConfig, PeftModel, get_peft_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIXTRAL = os.path.join(ROOT, "tests/fixtures/models/mixtral")
LLAMA = os.path.join(ROOT, "tests/fixtures/models/llama2")

torch.manual_seed(0)
R = int(os.environ.get("PROBE_R", "4"))
ALPHA = float(os.environ.get("PROBE_ALPHA", "8.0"))
RSLORA = os.environ.get("PROBE_RSLORA", "0") == "1"
SCALE = ALPHA / (R ** 0.5) if RSLORA else ALPHA / R


def load_base(path):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.eval()
    return m


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def dump_dir(d, title):
    print(f"\n=== {title}: {d}")
    print(sorted(os.listdir(d)))
    cfg = json.load(open(os.path.join(d, "adapter_config.json")))
    print("adapter_config.json:", json.dumps(cfg, indent=1, sort_keys=True))
    sd = load_file(os.path.join(d, "adapter_model.safetensors"))
    for k in sorted(sd):
        print(f"  {k} {list(sd[k].shape)} {sd[k].dtype}")
    return cfg, sd


def part1(tmp):
    print("\n##### PART 1: classic Mixtral expert adapter")
    base = load_base(MIXTRAL)
    cfg = base.config
    H, I, E, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_hidden_layers
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = H // nh
    print("param names (layer 0):", [n for n, _ in base.named_parameters() if ".layers.0." in n])
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    base_logits = logits(base, ids)

    sd = {}
    ref = copy.deepcopy(base)
    pref = "base_model.model.model.layers"
    for l in range(L):
        experts = ref.model.layers[l].mlp.experts
        for e in range(E):
            for name, (inp, out) in {"w1": (H, I), "w3": (H, I), "w2": (I, H)}.items():
                A = torch.randn(R, inp) * 0.3
                B = torch.randn(out, R) * 0.3
                sd[f"{pref}.{l}.block_sparse_moe.experts.{e}.{name}.lora_A.weight"] = A
                sd[f"{pref}.{l}.block_sparse_moe.experts.{e}.{name}.lora_B.weight"] = B
                d = SCALE * B @ A  # [out, in]
                with torch.no_grad():
                    if name == "w1":
                        experts.gate_up_proj[e, :I, :] += d
                    elif name == "w3":
                        experts.gate_up_proj[e, I:, :] += d
                    else:
                        experts.down_proj[e] += d
        attn = ref.model.layers[l].self_attn
        for name, (inp, out) in {"q_proj": (H, nh * hd), "v_proj": (H, nkv * hd)}.items():
            A = torch.randn(R, inp) * 0.3
            B = torch.randn(out, R) * 0.3
            sd[f"{pref}.{l}.self_attn.{name}.lora_A.weight"] = A
            sd[f"{pref}.{l}.self_attn.{name}.lora_B.weight"] = B
            with torch.no_grad():
                getattr(attn, name).weight += SCALE * B @ A
    ref_logits = logits(ref, ids)
    print("sanity |ref - base| max:", (ref_logits - base_logits).abs().max().item())

    # A minimal, hand-written adapter_config.json as a Rust trainer would write it (classic v4 style).
    adir = os.path.join(tmp, "classic_mixtral")
    os.makedirs(adir)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(adir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    json.dump({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": MIXTRAL,
        "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": ["w1", "w2", "w3", "q_proj", "v_proj"], "inference_mode": True,
        "use_rslora": RSLORA, "init_lora_weights": True,
    }, open(os.path.join(adir, "adapter_config.json"), "w"), indent=1)

    # (a) PeftModel.from_pretrained
    pm = PeftModel.from_pretrained(load_base(MIXTRAL), adir)
    pm.eval()
    print("loaded peft_config:", pm.peft_config["default"].target_modules, "target_parameters=",
          pm.peft_config["default"].target_parameters, "rank_pattern=", pm.peft_config["default"].rank_pattern,
          "alpha_pattern=", pm.peft_config["default"].alpha_pattern)
    names = [(n, tuple(p.shape)) for n, p in pm.named_parameters() if "lora" in n and ".layers.0." in n]
    print("lora params layer 0:", names)
    pl = logits(pm, ids)
    print("PeftModel.from_pretrained  max|peft - ref| =", (pl - ref_logits).abs().max().item(),
          " max|peft - base| =", (pl - base_logits).abs().max().item())
    merged = pm.merge_and_unload()
    ml = logits(merged, ids)
    print("merge_and_unload           max|merged - ref| =", (ml - ref_logits).abs().max().item())
    # also compare merged weights directly
    wdiff = max((merged.state_dict()[k] - ref.state_dict()[k]).abs().max().item() for k in ref.state_dict())
    print("merged vs ref max weight diff:", wdiff)

    # (b) transformers-native model.load_adapter
    try:
        m2 = load_base(MIXTRAL)
        m2.load_adapter(adir)
        l2 = logits(m2, ids)
        print("model.load_adapter         max|tf - ref| =", (l2 - ref_logits).abs().max().item())
    except Exception as ex:  # noqa
        print("model.load_adapter FAILED:", type(ex).__name__, ex)

    # (c) experts only (no attention targets) to check the pure-expert config path
    adir2 = os.path.join(tmp, "classic_mixtral_experts_only")
    os.makedirs(adir2)
    sd2 = {k: v for k, v in sd.items() if "block_sparse_moe" in k}
    save_file(sd2, os.path.join(adir2, "adapter_model.safetensors"), metadata={"format": "pt"})
    c = json.load(open(os.path.join(adir, "adapter_config.json")))
    c["target_modules"] = ["w1", "w2", "w3"]
    json.dump(c, open(os.path.join(adir2, "adapter_config.json"), "w"))
    ref2 = copy.deepcopy(base)
    for l in range(L):
        ref2.model.layers[l].mlp.experts.load_state_dict(ref.model.layers[l].mlp.experts.state_dict())
    pm2 = PeftModel.from_pretrained(load_base(MIXTRAL), adir2)
    print("experts-only from_pretrained max|peft - ref| =", (logits(pm2, ids) - logits(ref2, ids)).abs().max().item())

    # (d) round trip: re-save the loaded classic adapter; what format comes out?
    out = os.path.join(tmp, "classic_resaved")
    pm3 = PeftModel.from_pretrained(load_base(MIXTRAL), adir2)
    pm3.save_pretrained(out)
    dump_dir(out, "classic adapter re-saved by peft after loading")
    return ids


def part2(tmp, ids):
    print("\n##### PART 2: native v5 adapter with target_parameters")
    base = load_base(MIXTRAL)
    I = base.config.intermediate_size
    lc = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                    init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(base), lc)
    pm.eval()
    print(pm.base_model.model.model.layers[0].mlp.experts)
    out = os.path.join(tmp, "native_v5")
    pm.save_pretrained(out)
    cfg, sd = dump_dir(out, "native v5 adapter")

    # Verify math: reconstruct per-expert deltas from the saved tensors and compare logits.
    E = base.config.num_local_experts
    ref = copy.deepcopy(base)
    for l in range(base.config.num_hidden_layers):
        ex = ref.model.layers[l].mlp.experts
        for pname in ["gate_up_proj", "down_proj"]:
            # nesting: outer ParamWrapper = down_proj (last in target_parameters), inner = gate_up_proj
            cands = [k for k in sd if f"layers.{l}.mlp.experts" in k and "lora_A" in k]
            key = [k for k in cands if ("base_layer" in k) == (pname == "gate_up_proj")][0]
            A = sd[key]  # [E*r, in]
            B = sd[key.replace("lora_A", "lora_B")]  # [out, r*E]
            A3 = A.reshape(E, R, A.shape[-1])  # rows expert-major: row = e*r + k
            B3 = B.reshape(B.shape[0], R, E).permute(2, 0, 1)  # cols rank-major: col = k*E + e
            with torch.no_grad():
                getattr(ex, pname).add_(SCALE * B3 @ A3)
        attn = ref.model.layers[l].self_attn
        A = sd[f"base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight"]
        B = sd[f"base_model.model.model.layers.{l}.self_attn.q_proj.lora_B.weight"]
        with torch.no_grad():
            attn.q_proj.weight += SCALE * B @ A
    print("native v5: max|peft - manual(A3=A.reshape(E,r,in), B3=B.reshape(out,r,E).permute(2,0,1))| =",
          (logits(pm, ids) - logits(ref, ids)).abs().max().item())
    rl = PeftModel.from_pretrained(load_base(MIXTRAL), out)
    print("native v5 reload max|reload - manual| =", (logits(rl, ids) - logits(ref, ids)).abs().max().item())
    return out


def part3(tmp):
    print("\n##### PART 3: Llama classic adapter via get_peft_model")
    base = load_base(LLAMA)
    lc = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "gate_proj"], task_type="CAUSAL_LM")
    pm = get_peft_model(base, lc)
    out = os.path.join(tmp, "llama_classic")
    pm.save_pretrained(out)
    dump_dir(out, "llama classic")

    print("\n##### PART 3b: Mixtral get_peft_model(target_modules=[w1,w2,w3]) in v5 -- what does it save?")
    m = load_base(MIXTRAL)
    lc = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["w1", "w2", "w3"], task_type="CAUSAL_LM")
    try:
        pm = get_peft_model(m, lc)
        out = os.path.join(tmp, "mixtral_v4names_v5save")
        pm.save_pretrained(out)
        dump_dir(out, "mixtral target_modules=[w1,w2,w3] saved by peft 0.21 on tf5")
    except Exception as ex:  # noqa
        print("FAILED:", type(ex).__name__, ex)


if __name__ == "__main__":
    print("torch", torch.__version__, "peft", peft.__version__, "transformers", __import__("transformers").__version__)
    keep = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--keep" else None
    tmp = keep or tempfile.mkdtemp()
    os.makedirs(tmp, exist_ok=True)
    ids = part1(tmp)
    part2(tmp, ids)
    part3(tmp)
