#!/usr/bin/env python3
"""Reference fine-tuning run on the quick-start assets with transformers (+ peft).

Used as (a) a sanity check that the quick-start task is learnable and (b) the
baseline for tidemill's speed ratio.  CPU, float32, no packing, assistant-only loss
(the assistant content plus its closing <|end|> token are supervised), padding to the
longest sample of each batch, constant learning rate, AdamW (weight_decay 0).

    python tools/quickstart/bench_transformers.py                     # LoRA r=8 all linear, lr 2e-3
    python tools/quickstart/bench_transformers.py --targets q_proj,v_proj --lr 2e-4
    python tools/quickstart/bench_transformers.py --full --lr 1e-3

The last line printed is a JSON summary (losses at steps 1 / mid / last, sec/step).
"""
import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
QS = ROOT / "assets" / "quickstart"
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--targets", default=ALL_LINEAR, help="comma-separated LoRA target modules")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true", help="full-parameter fine-tuning instead of LoRA")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--model", default=str(QS / "model"))
    p.add_argument("--train", default=str(QS / "data" / "train.jsonl"))
    p.add_argument("--eval", default=str(QS / "data" / "eval.jsonl"))
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (f32 master weights)")
    return p.parse_args()


def encode(tok, msgs, max_len):
    """input_ids + labels with only assistant content + <|end|> supervised."""
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    labels = [-100] * len(ids)
    end_id = tok.convert_tokens_to_ids("<|end|>")
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(tok.apply_chat_template(msgs[:i], tokenize=True, return_dict=True,
                                            add_generation_prompt=True)["input_ids"])
        stop = len(tok.apply_chat_template(msgs[: i + 1], tokenize=True, return_dict=True)["input_ids"]) - 1
        assert ids[stop - 1] == end_id, "template/tokenizer prefix mismatch"
        labels[start:stop] = ids[start:stop]
    return ids[:max_len], labels[:max_len]


def load(path, tok, max_len):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    return [encode(tok, r["messages"], max_len) for r in rows]


def collate(samples, pad_id):
    n = max(len(s[0]) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    lab = torch.full((len(samples), n), -100, dtype=torch.long)
    att = torch.zeros((len(samples), n), dtype=torch.long)
    for i, (x, y) in enumerate(samples):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(x)] = 1
    return ids, att, lab


@torch.no_grad()
def eval_loss(model, data, pad_id, batch):
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(data), batch):
        ids, att, lab = collate(data[i : i + batch], pad_id)
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        tgt = lab[:, 1:]
        m = tgt != -100
        tot += torch.nn.functional.cross_entropy(logits[:, :-1][m], tgt[m], reduction="sum").item()
        n += int(m.sum())
    model.train()
    return tot / n


def main():
    a = parse()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    pad_id = tok.pad_token_id
    train = load(a.train, tok, a.max_seq_len)
    evals = load(a.eval, tok, a.max_seq_len)

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
    if a.full:
        mode = "full"
    else:
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in a.targets.split(",") if t.strip()]
        cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=targets,
                         bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        mode = f"lora r={a.rank} alpha={a.alpha:g} targets={','.join(targets)}"
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    print(f"{mode}; lr {a.lr:g}; batch {a.batch}; steps {a.steps}; seed {a.seed}; threads {a.threads}; "
          f"trainable {n_train} / {n_all} params; train {len(train)} eval {len(evals)} samples")

    ev0 = eval_loss(model, evals, pad_id, a.batch)
    print(f"eval loss before: {ev0:.4f}")

    g = torch.Generator().manual_seed(a.seed)
    order = []
    model.train()
    losses, times = [], []
    for step in range(1, a.steps + 1):
        if len(order) < a.batch:
            order += torch.randperm(len(train), generator=g).tolist()
        idx, order = order[: a.batch], order[a.batch :]
        ids, att, lab = collate([train[i] for i in idx], pad_id)
        t0 = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if a.bf16 else contextlib.nullcontext()
        with autocast:
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step == 1 or step % a.log_every == 0 or step == a.steps:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {times[-1] * 1000:.1f} ms")

    ev1 = eval_loss(model, evals, pad_id, a.batch)
    steady = times[1:] if len(times) > 1 else times
    sps = sum(steady) / len(steady)
    print(f"eval loss after: {ev1:.4f}")
    print(f"seconds/step: {sps:.5f} (mean over steps 2..{a.steps}; incl. step 1: {sum(times) / len(times):.5f})")
    mid = a.steps // 2
    print(json.dumps({
        "mode": mode, "lr": a.lr, "batch": a.batch, "steps": a.steps, "seed": a.seed, "threads": a.threads,
        "loss_step1": losses[0], f"loss_step{mid}": losses[mid - 1] if mid else None,
        f"loss_step{a.steps}": losses[-1], "eval_loss_before": ev0, "eval_loss_after": ev1,
        "seconds_per_step": sps, "median_seconds_per_step": statistics.median(steady),
        "bf16": a.bf16, "trainable_params": n_train,
    }))


if __name__ == "__main__":
    main()
