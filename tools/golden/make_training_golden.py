#!/usr/bin/env python3
"""Generate the Mistral sliding-window fixture and the training goldens for tidemill.

Run from anywhere, AFTER tools/golden/make_fixtures.py (it reads the llama2 model and the
token data that script writes):

    python tools/golden/make_training_golden.py

Requires torch, transformers (5.x), safetensors; peft only for the version stamp.
Deterministic: fixed seeds, float32, eager attention, CPU, 2 threads (set by make_fixtures).

Output (relative to the repository root):
  tests/fixtures/models/mistral/      tiny MistralForCausalLM, sliding_window 4, F32 single file
  tests/fixtures/training_golden.json
    "mistral_window4"               golden eval loss (golden.json definition) with window 4, plus the
                                    loss of the same weights with sliding_window None
    "sft_llama2_trajectory"         3 AdamW steps of full fine-tuning, cosine schedule, 1 warm-up step
    "sft_llama2_trajectory_linear"  same, linear schedule, no warm-up (so step 1 moves the weights)
    every trajectory has a "settings" object with everything needed to mirror it.

Sliding-window semantics (transformers 5.x masking_utils.sliding_window_overlay):
  key j is visible to query i  iff  j <= i  and  j > i - sliding_window   (i.e. i - j < sliding_window)
so the query attends to the last `sliding_window` positions including itself, and key j is masked
when i - j >= sliding_window.  The script checks this on the 4-D mask that eager attention really
receives, and behaviourally by perturbing single input tokens.
"""
import copy
import json
import math
import os
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)
from transformers.models.mistral import modeling_mistral

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (also sets torch.set_num_threads(2))
from make_fixtures import COMMON, DATA, MODELS, OUT, PEFT_VERSION, VOCAB, golden_for  # noqa: E402

WINDOW = 4


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- A) mistral
def expected_window_mask(n, w):
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    return (j <= i) & ((i - j) < w)


def check_mask_semantics(model, n):
    """Capture the additive mask that eager attention receives and compare with i - j < w."""
    seen = []
    orig = modeling_mistral.eager_attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append(attention_mask.detach().clone())
        return orig(module, query, key, value, attention_mask, *args, **kwargs)

    modeling_mistral.eager_attention_forward = spy
    try:
        with torch.no_grad():
            ids = torch.arange(n).unsqueeze(0) % VOCAB
            model(input_ids=ids, position_ids=torch.arange(n).unsqueeze(0))
    finally:
        modeling_mistral.eager_attention_forward = orig
    assert len(seen) == model.config.num_hidden_layers, f"spy saw {len(seen)} attention calls"
    want = expected_window_mask(n, model.config.sliding_window)
    i, j = torch.arange(n).unsqueeze(1), torch.arange(n).unsqueeze(0)
    want_le = (j <= i) & ((i - j) <= model.config.sliding_window)  # the rejected `<=` reading
    for m in seen:
        assert m.shape == (1, 1, n, n), m.shape
        allowed = m[0, 0] == 0
        blocked = m[0, 0] <= torch.finfo(m.dtype).min / 2
        assert bool((allowed | blocked).all()), "mask has values other than 0 / -inf"
        assert torch.equal(allowed, want), "eager mask != (j <= i) & (i - j < sliding_window)"
        assert not torch.equal(allowed, want_le), "mask unexpectedly equals the i - j <= w variant"
    print(f"[mistral] eager mask == (j <= i) & (i - j < {model.config.sliding_window}) on all "
          f"{len(seen)} layers (n={n}); row {n - 1}: {allowed[n - 1].int().tolist()}")


@torch.no_grad()
def check_receptive_field(model, row):
    """With L layers and window w, logits[i] depends on tokens i-L*(w-1) .. i exactly."""
    L, w = model.config.num_hidden_layers, model.config.sliding_window
    ids = torch.tensor([row["input_ids"]])
    n = ids.shape[1]
    pos = torch.arange(n).unsqueeze(0)
    base = model(input_ids=ids, position_ids=pos).logits[0]
    i = n - 1
    reach = L * (w - 1)  # 6 for L=2, w=4 (it would be L*w = 8 under an `i - j <= w` rule)
    deltas = {}
    for j in (i - reach - 2, i - reach - 1, i - reach, i - reach + 1):
        pert = ids.clone()
        pert[0, j] = (pert[0, j] + 7) % VOCAB
        d = (model(input_ids=pert, position_ids=pos).logits[0, i] - base[i]).abs().max().item()
        deltas[i - j] = d
    print(f"[mistral] max |dlogits[{i}]| when perturbing token i-d: "
          + ", ".join(f"d={d}: {v:.3e}" for d, v in sorted(deltas.items())))
    assert deltas[reach + 2] == 0.0 and deltas[reach + 1] == 0.0, deltas
    assert deltas[reach] > 1e-6 and deltas[reach - 1] > 1e-6, deltas


def build_mistral(rows):
    cfg = MistralConfig(
        **COMMON,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=WINDOW,
        tie_word_embeddings=False,
    )
    m = mf.new_model(MistralForCausalLM, cfg, 505)
    mf.randomize_norms(m)
    assert m.config.sliding_window == WINDOW
    d = mf.fresh_dir("mistral")
    m.save_pretrained(d, safe_serialization=True)
    gc = d / "generation_config.json"
    if gc.exists():
        gc.unlink()
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"], os.listdir(d)
    cj = json.loads((d / "config.json").read_text())
    assert cj["model_type"] == "mistral" and cj["sliding_window"] == WINDOW, cj
    assert cj["tie_word_embeddings"] is False and cj["num_key_value_heads"] == 2, cj
    with safe_open(d / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all(f.get_slice(k).get_dtype() == "F32" for k in keys)
        assert "lm_head.weight" in keys
    loaded = mf.check_reload("mistral", m, rows)
    assert loaded.config.sliding_window == WINDOW
    return loaded


def mistral_golden(eval_rows):
    m = build_mistral(eval_rows)
    longest = max(len(r["input_ids"]) for r in eval_rows)
    check_mask_semantics(m, longest)
    check_receptive_field(m, max(eval_rows, key=lambda r: len(r["input_ids"])))
    g = golden_for(m, eval_rows)

    full = copy.deepcopy(m)
    full.config.sliding_window = None
    assert full.model.config.sliding_window is None
    g_full = golden_for(full, eval_rows)
    diff = abs(g["loss"] - g_full["loss"])
    print(f"[mistral] golden loss window {WINDOW}: {g['loss']!r}, no window: {g_full['loss']!r}, |diff| = {diff:.3e}")
    assert diff > 1e-3, "sliding_window=4 does not change the loss"
    assert abs(g["loss"] - math.log(VOCAB)) > 0.25, g["loss"]
    assert g["tokens"] == g_full["tokens"]
    return {
        "model": "tests/fixtures/models/mistral",
        "sliding_window": WINDOW,
        "mask_rule": "key j visible to query i iff j <= i and i - j < sliding_window "
                     "(masked when i - j >= sliding_window); transformers masking_utils.sliding_window_overlay: "
                     "kv_idx > q_idx - sliding_window",
        "loss": g["loss"],
        "tokens": g["tokens"],
        "samples": g["samples"],
        "loss_no_window": g_full["loss"],
        "per_sample": g["per_sample"],
    }


# --------------------------------------------------------------------------- B) trajectories
LR = 1e-2
BETAS = (0.9, 0.999)
EPS = 1e-8
WD = 0.01
MAX_GRAD_NORM = 1.0
STEPS = 3
GLOBAL_BATCH = 4
MICRO_BATCH = 2


def sample_ce(model, row):
    """(summed CE float32 tensor for backward, summed CE float64 value, supervised tokens)."""
    ids = torch.tensor([row["input_ids"]])
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    logits = model(input_ids=ids, position_ids=pos).logits[0]
    labels = torch.tensor(row.get("labels", row["input_ids"]))
    tgt = labels[1:]
    mask = tgt != -100
    lg = logits[:-1][mask]
    ce32 = torch.nn.functional.cross_entropy(lg, tgt[mask], reduction="sum")
    ce64 = torch.nn.functional.cross_entropy(lg.detach().double(), tgt[mask], reduction="sum").item()
    return ce32, ce64, int(mask.sum())


def trajectory(train_rows, eval_rows, schedule):
    model = AutoModelForCausalLM.from_pretrained(
        MODELS / "llama2", dtype=torch.float32, attn_implementation="eager"
    )
    model.train()
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    if schedule == "cosine":
        warmup = 1
        sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=STEPS)
    elif schedule == "linear":
        warmup = 0
        sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=STEPS)
    else:
        raise ValueError(schedule)

    initial_eval = golden_for(model, eval_rows)["loss"]
    model.train()
    steps = []
    for s in range(STEPS):
        batch = train_rows[s * GLOBAL_BATCH:(s + 1) * GLOBAL_BATCH]
        assert len(batch) == GLOBAL_BATCH
        n_tok = sum(sum(1 for t in r.get("labels", r["input_ids"])[1:] if t != -100) for r in batch)
        assert n_tok > 0
        opt.zero_grad(set_to_none=True)
        loss64 = 0.0
        for mb in range(GLOBAL_BATCH // MICRO_BATCH):
            mb_rows = batch[mb * MICRO_BATCH:(mb + 1) * MICRO_BATCH]
            mb_loss = None
            for r in mb_rows:
                ce32, ce64, n = sample_ce(model, r)
                loss64 += ce64
                mb_loss = ce32 if mb_loss is None else mb_loss + ce32
            (mb_loss / n_tok).backward()
        loss64 /= n_tok
        grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM).item()
        lr = opt.param_groups[0]["lr"]
        assert lr == sched.get_last_lr()[0]
        opt.step()
        sched.step()
        steps.append({"step": s + 1, "loss": loss64, "grad_norm": grad_norm, "lr": lr, "tokens": n_tok,
                      "samples": [s * GLOBAL_BATCH + k for k in range(GLOBAL_BATCH)]})
        print(f"[sft/{schedule}] step {s + 1}: loss {loss64!r} grad_norm {grad_norm!r} lr {lr!r} tokens {n_tok}")

    final = golden_for(model, eval_rows)
    print(f"[sft/{schedule}] eval loss before {initial_eval!r} after {final['loss']!r}")
    settings = {
        "model": "tests/fixtures/models/llama2",
        "dtype": "float32",
        "attention": "eager",
        "trainable": f"all parameters ({len(params)} tensors, {n_params} elements, norms included, "
                     "embed_tokens and lm_head untied), full fine-tuning",
        "data": "tests/fixtures/data/train_tokens.jsonl in file order, no shuffle, no packing; "
                "step k uses samples 4(k-1) .. 4(k-1)+3",
        "labels": "labels if present else input_ids; CE(logits[t], labels[t+1]) for t in 0..n-2, -100 ignored",
        "steps": STEPS,
        "global_batch_samples": GLOBAL_BATCH,
        "micro_batch_samples": MICRO_BATCH,
        "grad_accumulation_steps": GLOBAL_BATCH // MICRO_BATCH,
        "per_sample_forward": "batch 1, no padding, position_ids 0..n-1 (== padded batch with proper mask)",
        "step_loss": "sum over the step's 4 samples of summed token CE / total supervised tokens of those 4 "
                     "samples; each micro-batch backwards (its summed CE / step total tokens), grads accumulate; "
                     "recorded loss is float64 CE from the float32 logits",
        "grad_clip": {"fn": "torch.nn.utils.clip_grad_norm_", "max_norm": MAX_GRAD_NORM, "norm_type": 2.0,
                      "clip": "grads *= min(1, max_norm / (total_norm + 1e-6))",
                      "recorded": "returned total norm over all parameters, before clipping"},
        "optimizer": {"type": "torch.optim.AdamW", "lr": LR, "betas": list(BETAS), "eps": EPS,
                      "weight_decay": WD, "amsgrad": False, "maximize": False,
                      "param_groups": "one group with all parameters (decay applied to norms/embeddings too)",
                      "update": "p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; "
                                "p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps); t counts every "
                                "optimizer.step(), also those with lr 0"},
        "schedule": {
            "fn": "transformers.get_cosine_schedule_with_warmup" if schedule == "cosine"
            else "transformers.get_linear_schedule_with_warmup",
            "num_warmup_steps": warmup,
            "num_training_steps": STEPS,
            "num_cycles": 0.5 if schedule == "cosine" else None,
            "recorded_lr": "optimizer lr used by step k (scheduler.step() is called after each optimizer.step())",
        },
        "final_eval": "golden.json loss definition on tests/fixtures/data/eval_tokens.jsonl after the last step",
    }
    return {
        "settings": settings,
        "initial_eval_loss": initial_eval,
        "steps": steps,
        "final_eval_loss": final["loss"],
        "final_eval_tokens": final["tokens"],
    }


# --------------------------------------------------------------------------- main
def main():
    torch.use_deterministic_algorithms(True)
    eval_rows = read_jsonl(DATA / "eval_tokens.jsonl")
    train_rows = read_jsonl(DATA / "train_tokens.jsonl")
    assert len(eval_rows) == 6 and len(train_rows) >= STEPS * GLOBAL_BATCH

    out = {
        "generated_with": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "peft": PEFT_VERSION,
            "python": sys.version.split()[0],
            "script": "tools/golden/make_training_golden.py",
        },
        "definition": (
            "eval losses use the tests/fixtures/golden.json definition: per sample (batch 1, no padding, "
            "position_ids 0..n-1, eager attention, float32); labels = labels or input_ids; sum CE(logits[t], "
            "labels[t+1]) for t in 0..n-2 where labels[t+1] != -100 (CE in float64 from float32 logits); "
            "loss = total sum / total tokens over tests/fixtures/data/eval_tokens.jsonl"
        ),
    }
    out["mistral_window4"] = mistral_golden(eval_rows)
    out["sft_llama2_trajectory"] = trajectory(train_rows, eval_rows, "cosine")
    out["sft_llama2_trajectory_linear"] = trajectory(train_rows, eval_rows, "linear")
    assert out["sft_llama2_trajectory"]["steps"][0]["lr"] == 0.0
    assert out["sft_llama2_trajectory_linear"]["steps"][0]["lr"] == LR

    print("generated_with:", json.dumps(out["generated_with"]))
    (OUT / "training_golden.json").write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", OUT / "training_golden.json")


if __name__ == "__main__":
    main()
