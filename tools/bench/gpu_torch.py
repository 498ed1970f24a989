#!/usr/bin/env python3
"""Training throughput of transformers (+ peft) on one device: the baseline tidemill's GPU
numbers are compared with.

Model from a local HF directory (e.g. made by make_bench_model.py), SDPA attention, f32
master weights; with --dtype bf16 the forward and loss run under
`torch.autocast(device, torch.bfloat16)`. LoRA (peft): r 16, alpha 32, dropout 0 on all
seven linears (q, k, v, o, gate, up, down); full: every parameter. AdamW (lr 1e-4,
weight decay 0.01, fused on cuda), gradient clipping at norm 1.0, one optimizer step per
micro-batch of MB rows of S tokens (labels = input_ids, no padding, rows taken in file
order, wrapping around).

Timing: step 1 (allocation, kernel selection, lazy init) is reported on its own, then W
warm-up steps, then N timed steps, each ended by torch.cuda.synchronize() on cuda.
tokens/s = MB·S·N / time of the N steps. MFU from flops.py when the GPU's peak is known.
--find-max-batch (cuda): tries MB = 1, 2, 4, ... 32 for 2 steps each, stops at the first
OOM, and measures the largest that fit on a freshly loaded model.

    python tools/bench/gpu_torch.py --model /tmp/llama-1b --data /tmp/llama-1b/train.jsonl \\
        --seq 2048 --micro-batch 4 --steps 20 --warmup 3 --mode lora --device cuda --out r.json

The last stdout line is a JSON object (also written to --out).
"""
import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops  # noqa: E402

LINEARS = list(flops.LINEARS)
TRY_BATCHES = (1, 2, 4, 8, 16, 32)


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--data", required=True, help='JSONL of {"input_ids": [...]} rows of >= S ids')
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--mode", choices=["lora", "full"], required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="autocast dtype")
    p.add_argument("--recompute", action="store_true", help="activation (gradient) checkpointing")
    p.add_argument("--find-max-batch", action="store_true", help="cuda: measure the largest MB that fits")
    p.add_argument("--out", help="also write the JSON result here")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    return p.parse_args()


def load_data(path, seq, vocab, device):
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                ids = json.loads(line)["input_ids"]
                if len(ids) < seq:
                    sys.exit(f"{path}:{i + 1}: {len(ids)} ids < --seq {seq}")
                rows.append(ids[:seq])
    data = torch.tensor(rows, dtype=torch.long)
    assert 0 <= int(data.min()) and int(data.max()) < vocab, "token id out of the vocabulary"
    return data.to(device)


def build(a):
    """Model (f32, train mode) with optional LoRA and recompute, its AdamW and trainable params."""
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    if a.recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.mode == "lora":
        from peft import LoraConfig, get_peft_model

        if a.recompute:
            model.enable_input_require_grads()
        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEARS, bias="none",
                         task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    model.to(a.device).train()  # train(): HF checkpoints layers only in training mode
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=a.device == "cuda")
    return model, opt, params


def make_step(a, model, opt, params, data):
    """step(k, mb): one optimizer step on micro-batch k of mb rows; returns the loss tensor."""
    n = data.shape[0]

    def step(k, mb):
        idx = torch.arange(k * mb, (k + 1) * mb, device=data.device) % n
        ids = data.index_select(0, idx)
        with torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def sync(a):
    if a.device == "cuda":
        torch.cuda.synchronize()


def free(a):
    gc.collect()
    if a.device == "cuda":
        torch.cuda.empty_cache()


def find_max_batch(a, data):
    """Largest MB of TRY_BATCHES that runs 2 steps without CUDA OOM, and each try's outcome."""
    model, opt, params = build(a)
    step = make_step(a, model, opt, params, data)
    best, tried = None, {}
    for mb in TRY_BATCHES:
        try:
            for k in range(2):
                step(k, mb)
            sync(a)
            ok = True
        except torch.cuda.OutOfMemoryError:
            ok = False
        opt.zero_grad(set_to_none=True)
        free(a)  # outside `except`: the traceback holding the activations is gone
        tried[mb] = "ok" if ok else "oom"
        print(f"find-max-batch: micro-batch {mb}: {tried[mb]}", file=sys.stderr)
        if not ok:
            break
        best = mb
    del model, opt, params, step
    free(a)
    if best is None:
        sys.exit("find-max-batch: micro-batch 1 does not fit")
    return best, tried


def device_name(a):
    if a.device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def main():
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.disable_progress_bar()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch sees no CUDA device")
    with open(Path(a.model) / "config.json") as f:
        cfg = json.load(f)
    data = load_data(a.data, a.seq, cfg["vocab_size"], a.device)
    torch.manual_seed(0)

    search = None
    if a.find_max_batch:
        if a.device == "cuda":
            a.micro_batch, tried = find_max_batch(a, data)
            search = {"tried": tried, "max_micro_batch": a.micro_batch}
        else:
            print("find-max-batch: cuda only, ignored", file=sys.stderr)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    t_load = time.perf_counter()
    model, opt, params = build(a)
    load_s = time.perf_counter() - t_load
    step = make_step(a, model, opt, params, data)
    mb = a.micro_batch

    sync(a)
    t0 = time.perf_counter()
    losses = [step(0, mb)]
    sync(a)
    first_s = time.perf_counter() - t0
    for k in range(1, 1 + a.warmup):
        losses.append(step(k, mb))
    times = []
    sync(a)
    t_start = time.perf_counter()
    for k in range(1 + a.warmup, 1 + a.warmup + a.steps):
        ts = time.perf_counter()
        losses.append(step(k, mb))
        sync(a)
        times.append(time.perf_counter() - ts)
    total = time.perf_counter() - t_start

    tokens_per_s = mb * a.seq * a.steps / total if a.steps else None
    name = device_name(a)
    fpt = flops.model_flops_per_token(cfg, a.seq, a.mode)
    peak = flops.peak_flops(name) if a.device == "cuda" else None
    if a.device == "cuda":
        mem = {"max_memory_allocated": torch.cuda.max_memory_allocated(),
               "max_memory_reserved": torch.cuda.max_memory_reserved()}
    else:
        mem = {"max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    import peft

    result = {
        "framework": "transformers" + ("+peft" if a.mode == "lora" else ""),
        "model": a.model, "model_type": cfg.get("model_type"), "mode": a.mode, "dtype": a.dtype,
        "recompute": a.recompute, "device": a.device, "device_name": name,
        "seq": a.seq, "micro_batch": mb, "tokens_per_step": mb * a.seq, "warmup": a.warmup, "steps": a.steps,
        "params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for p in params),
        "load_s": load_s, "first_step_s": first_s, "timed_s": total, "tokens_per_s": tokens_per_s,
        "step_s_median": statistics.median(times) if times else None,
        "step_s_min": min(times, default=None), "step_s_max": max(times, default=None),
        "step_s_stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "peak_memory_bytes": mem,
        "losses": [float(l) for l in losses],  # step 1, the warm-up steps, then the timed steps
        "flops_per_token": fpt, "peak_flops": peak,
        "mfu": flops.mfu(tokens_per_s, fpt, peak) if tokens_per_s else None,
        "find_max_batch": search,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda if a.device == "cuda" else None},
    }
    line = json.dumps(result)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(line)


if __name__ == "__main__":
    main()
