#!/usr/bin/env python3
"""bf16-autocast vs float32 training goldens (full fine-tuning and LoRA) for tidemill.

Run from anywhere, AFTER tools/golden/make_fixtures.py (it reads the llama2 / qwen2 models and the
token data that script writes):

    python tools/golden/make_bf16_golden.py            # e.g. /tmp/refenv/bin/python

Requires torch, transformers (5.x), peft, safetensors.
Deterministic: fixed seeds, float32 master weights, eager attention, CPU, 2 threads (set by
make_fixtures), torch.use_deterministic_algorithms(True).  Running it twice gives identical files.

Output (relative to the repository root):
  tests/fixtures/bf16/lora_init_{llama2,qwen2}/   the initial (untrained) PEFT LoRA adapters the LoRA
                                                 runs start from (peft save_pretrained:
                                                 adapter_config.json + adapter_model.safetensors, F32)
  tests/fixtures/bf16_golden.json
    "settings"                    everything needed to mirror the runs (in words)
    "autocast_dtypes"             dtype at each point of a llama2 decoder layer / peft LoRA linear
                                  during one torch.autocast("cpu", bfloat16) forward
    "<model>_<mode>"              model in (llama2, qwen2), mode in (full, lora):
        "f32"  / "bf16":          {"steps": [{"step", "loss", "grad_norm", "lr", "tokens"} x 20],
                                   "initial_eval_loss", "final_eval_loss"}
        "max_abs_diff_bf16_vs_f32": {"loss": max_k |loss_bf16[k] - loss_f32[k]|,
                                     "final_eval_loss": |eval_bf16 - eval_f32|,
                                     "loss_step1", "initial_eval_loss": the same before any update}

Runs: 20 AdamW steps; the same model / data / optimizer in both precisions, only the compute differs.
  data        tests/fixtures/data/train_tokens.jsonl (16 rows) in file order, no shuffle, no packing;
              step k (1-based) uses rows (4(k-1)+j) mod 16, j = 0..3 (global batch 4 samples), as two
              micro-batches of 2 samples (gradient accumulation 2).
  forward     per sample: batch 1, no padding, position_ids 0..n-1, eager attention, model loaded in
              float32 (master weights stay float32 in both precisions).
  f32         no autocast.
  bf16        `with torch.autocast("cpu", dtype=torch.bfloat16):` around the forward AND the loss
              (logits upcast with .float() before the cross-entropy, as transformers' ForCausalLMLoss
              does); backward, grad clipping and the optimizer step run outside autocast; gradients
              of the float32 parameters are float32.
  loss        labels = labels or input_ids; CE(logits[t], labels[t+1]) summed over t in 0..n-2 with
              labels[t+1] != -100; each micro-batch backwards (its summed CE / supervised tokens of the
              whole step); recorded step loss = float64 CE (from the float32-upcast logits) summed over
              the step's 4 samples / the step's supervised tokens.
  clip        torch.nn.utils.clip_grad_norm_(trainable params, max_norm 1.0); recorded norm is before clipping.
  optimizer   torch.optim.AdamW(lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01), one param group
              with all trainable parameters; constant lr (no scheduler, no warm-up).
  full        all parameters train.
  lora        peft LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, q/k/v/o/gate/up/down_proj, bias="none",
              task_type CAUSAL_LM), default init (lora_A kaiming-uniform, lora_B zeros) drawn with
              torch.manual_seed(0) immediately before get_peft_model; saved before any step; both
              precisions load that saved adapter (PeftModel.from_pretrained(..., is_trainable=True)) onto
              a fresh float32 base; only lora_A / lora_B train (scaling alpha/r = 2).
  eval        tests/fixtures/golden.json loss definition on tests/fixtures/data/eval_tokens.jsonl (per
              sample, summed CE in float64 / total supervised tokens), computed in the run's precision
              (autocast for bf16), before step 1 and after step 20.
"""
import contextlib
import json
import shutil
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (also sets torch.set_num_threads(2))
from make_fixtures import DATA, MODELS, OUT, ROOT  # noqa: E402

LR = 1e-4
BETAS = (0.9, 0.999)
EPS = 1e-8
WD = 0.01
MAX_GRAD_NORM = 1.0
STEPS = 20
GLOBAL_BATCH = 4
MICRO_BATCH = 2
LORA_R = 8
LORA_ALPHA = 16
LORA_SEED = 0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_NAMES = ["llama2", "qwen2"]
MODES = ["full", "lora"]
PRECISIONS = ["f32", "bf16"]
BF16_DIR = OUT / "bf16"


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rel(path):
    return str(Path(path).relative_to(ROOT))


def precision_ctx(precision):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    assert precision == "f32", precision
    return contextlib.nullcontext()


def load_base(name):
    m = AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32, attn_implementation="eager")
    # recorded as base_model_name_or_path in adapter_config.json (repo-relative, like tests/fixtures/roundtrip)
    m.name_or_path = rel(MODELS / name)
    return m


def lora_config():
    return LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        bias="none",
        task_type="CAUSAL_LM",
    )


# --------------------------------------------------------------------------- loss
def supervised(row):
    return sum(1 for t in row.get("labels", row["input_ids"])[1:] if t != -100)


def sample_ce(model, row, precision):
    """(summed CE float32 tensor for backward, summed CE float64 value, supervised tokens)."""
    ids = torch.tensor([row["input_ids"]])
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    labels = torch.tensor(row.get("labels", row["input_ids"]))
    tgt = labels[1:]
    mask = tgt != -100
    with precision_ctx(precision):
        logits = model(input_ids=ids, position_ids=pos).logits[0]
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert logits.dtype == want, (precision, logits.dtype)
        lg = logits.float()[:-1][mask]  # ForCausalLMLoss: logits.float()
        ce32 = torch.nn.functional.cross_entropy(lg, tgt[mask], reduction="sum")
        assert ce32.dtype == torch.float32
    ce64 = torch.nn.functional.cross_entropy(lg.detach().double(), tgt[mask], reduction="sum").item()
    return ce32, ce64, int(mask.sum())


@torch.no_grad()
def eval_loss(model, rows, precision):
    was_training = model.training
    model.eval()
    tot, n = 0.0, 0
    for r in rows:
        _, ce64, k = sample_ce(model, r, precision)
        tot += ce64
        n += k
    model.train(was_training)
    return tot / n


# --------------------------------------------------------------------------- LoRA init
def make_lora_init(name):
    """Draw the initial adapter (seed 0), save it with peft, and check it reloads bit-exactly."""
    base = load_base(name)
    torch.manual_seed(LORA_SEED)
    pm = get_peft_model(base, lora_config())
    init = {k: v.detach().clone() for k, v in pm.named_parameters() if v.requires_grad}
    d = BF16_DIR / f"lora_init_{name}"
    if d.exists():
        shutil.rmtree(d)
    pm.save_pretrained(d, safe_serialization=True)
    readme = d / "README.md"
    if readme.exists():  # peft writes a model card; the Rust loader needs only the two files
        readme.unlink()
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"], list(d.iterdir())
    cfg = json.loads((d / "adapter_config.json").read_text())
    # peft stores target_modules as a set, so its saved order follows PYTHONHASHSEED; sort it (same
    # format as peft's own writer: indent 2, sorted keys) so the file is byte-for-byte reproducible
    assert sorted(cfg["target_modules"]) == sorted(TARGETS), cfg["target_modules"]
    cfg["target_modules"] = sorted(TARGETS)
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    assert cfg["base_model_name_or_path"] == rel(MODELS / name), cfg["base_model_name_or_path"]
    assert cfg["r"] == LORA_R and cfg["lora_alpha"] == LORA_ALPHA and cfg["lora_dropout"] == 0.0
    with safe_open(d / "adapter_model.safetensors", "pt") as f:
        keys = sorted(f.keys())
        for k in keys:
            assert f.get_slice(k).get_dtype() == "F32", k
            t = f.get_tensor(k)
            if k.endswith("lora_B.weight"):
                assert bool((t == 0).all()), k
            else:
                assert k.endswith("lora_A.weight") and t.abs().max() > 0, k
    n_layers = base.config.num_hidden_layers
    assert len(keys) == 2 * len(TARGETS) * n_layers, keys
    n_el = sum(v.numel() for v in init.values())
    print(f"[{name}] LoRA init: {len(keys)} tensors, {n_el} elements -> {rel(d)}")
    return d, init


def load_lora(name, adapter_dir, init):
    pm = PeftModel.from_pretrained(load_base(name), adapter_dir, is_trainable=True)
    got = {k: v for k, v in pm.named_parameters() if v.requires_grad}
    assert sorted(got) == sorted(init), (sorted(got)[:3], sorted(init)[:3])
    for k, v in got.items():
        assert v.dtype == torch.float32 and torch.equal(v.detach(), init[k]), k
    return pm


# --------------------------------------------------------------------------- one run
def run(name, mode, precision, train_rows, eval_rows, lora_init=None):
    if mode == "full":
        model = load_base(name)
    else:
        model = load_lora(name, *lora_init)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if mode == "full":
        assert len(params) == len(list(model.parameters()))
    else:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(".lora_A." in n or ".lora_B." in n for n in names), names
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    initial_eval = eval_loss(model, eval_rows, precision)
    steps = []
    for s in range(STEPS):
        idx = [(s * GLOBAL_BATCH + j) % len(train_rows) for j in range(GLOBAL_BATCH)]
        batch = [train_rows[i] for i in idx]
        n_tok = sum(supervised(r) for r in batch)
        assert n_tok > 0
        opt.zero_grad(set_to_none=True)
        loss64 = 0.0
        for mb in range(GLOBAL_BATCH // MICRO_BATCH):
            mb_loss = None
            for r in batch[mb * MICRO_BATCH:(mb + 1) * MICRO_BATCH]:
                ce32, ce64, _ = sample_ce(model, r, precision)
                loss64 += ce64
                mb_loss = ce32 if mb_loss is None else mb_loss + ce32
            (mb_loss / n_tok).backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        loss64 /= n_tok
        grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM).item()
        lr = opt.param_groups[0]["lr"]
        assert lr == LR
        opt.step()
        steps.append({"step": s + 1, "loss": loss64, "grad_norm": grad_norm, "lr": lr, "tokens": n_tok})
    final_eval = eval_loss(model, eval_rows, precision)
    print(f"[{name}_{mode}/{precision}] loss step1 {steps[0]['loss']:.6f} step{STEPS} {steps[-1]['loss']:.6f} "
          f"grad_norm step1 {steps[0]['grad_norm']:.4f}; eval {initial_eval:.6f} -> {final_eval:.6f}")
    return {"steps": steps, "initial_eval_loss": initial_eval, "final_eval_loss": final_eval}


# --------------------------------------------------------------------------- autocast dtype report
class OpLog(TorchFunctionMode):
    """Records (function name, output dtype) for every torch function call while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        if isinstance(out, torch.Tensor):
            ins = [a.dtype for a in args if isinstance(a, torch.Tensor)]
            self.ops.append((name, [str(d).replace("torch.", "") for d in ins], str(out.dtype).replace("torch.", "")))
        return out


def dt(x):
    return str(x.dtype).replace("torch.", "")


@torch.no_grad()
def autocast_dtype_report(row):
    """dtype at each point of llama2's decoder layer 0 and of a peft LoRA linear under bf16 autocast."""
    rep = {}
    model = load_base("llama2")
    model.eval()
    layer = model.model.layers[0]
    hooks = []

    def out_hook(label):
        def h(_m, _args, out):
            rep[label] = dt(out[0] if isinstance(out, tuple) else out)
        return h

    def in_hook(label):
        def h(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            rep[label] = dt(x)
        return h

    hooks.append(layer.register_forward_pre_hook(in_hook("01 decoder layer input (residual stream)"), with_kwargs=True))
    for mod, label in [
        (layer.input_layernorm, "02 input_layernorm output"),
        (layer.self_attn.q_proj, "03 q_proj output"),
        (layer.self_attn.k_proj, "04 k_proj output"),
        (layer.self_attn.v_proj, "05 v_proj output"),
        (layer.self_attn.o_proj, "15 o_proj output"),
        (layer.post_attention_layernorm, "17 post_attention_layernorm output"),
        (layer.mlp.gate_proj, "18 gate_proj output"),
        (layer.mlp.up_proj, "19 up_proj output"),
        (layer.mlp.act_fn, "20 act(gate) output"),
        (layer.mlp.down_proj, "22 down_proj output"),
        (layer, "23 decoder layer output (residual after MLP)"),
        (model.model.norm, "24 final norm output"),
        (model.lm_head, "25 logits (lm_head output)"),
    ]:
        hooks.append(mod.register_forward_hook(out_hook(label)))
    hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(in_hook("14 o_proj input (attention output reshaped)"), with_kwargs=True))
    hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(in_hook("16 residual after attention"), with_kwargs=True))
    hooks.append(layer.mlp.down_proj.register_forward_pre_hook(in_hook("21 act(gate) * up (down_proj input)"), with_kwargs=True))
    hooks.append(model.model.norm.register_forward_pre_hook(in_hook("23b final norm input"), with_kwargs=True))

    orig_rope = modeling_llama.apply_rotary_pos_emb
    orig_attn = modeling_llama.eager_attention_forward
    seen = {"rope": 0, "attn": 0}

    def rope_spy(q, k, cos, sin, *a, **kw):
        qo, ko = orig_rope(q, k, cos, sin, *a, **kw)
        if seen["rope"] == 0:
            rep["06 RoPE cos / sin"] = f"{dt(cos)} / {dt(sin)}"
            rep["07 q after RoPE"] = dt(qo)
            rep["08 k after RoPE"] = dt(ko)
        seen["rope"] += 1
        return qo, ko

    def attn_spy(module, query, key, value, attention_mask, *a, **kw):
        log = OpLog()
        with log:
            out = orig_attn(module, query, key, value, attention_mask, *a, **kw)
        if seen["attn"] == 0:
            ops = [o for o in log.ops if o[0] in ("matmul", "mul", "add", "softmax", "to", "dropout")]
            names = [o[0] for o in ops]
            assert names[:6] == ["matmul", "mul", "add", "softmax", "to", "dropout"], names
            assert names[6] == "matmul", names
            rep["09 attention scores q.kT (matmul)"] = ops[0][2]
            rep["10 scores * scaling"] = ops[1][2]
            rep["11 attention mask / scores + mask"] = \
                f"mask {dt(attention_mask) if attention_mask is not None else None}; sum {ops[2][2]}"
            rep["12 softmax(dtype=float32) -> .to(query.dtype)"] = f"softmax {ops[3][2]}, query {dt(query)} -> {ops[4][2]}"
            rep["13 probs . v (matmul)"] = f"{ops[6][2]} (inputs {'/'.join(ops[6][1])})"
        seen["attn"] += 1
        return out

    modeling_llama.apply_rotary_pos_emb = rope_spy
    modeling_llama.eager_attention_forward = attn_spy
    try:
        ids = torch.tensor([row["input_ids"]])
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, position_ids=pos)
    finally:
        modeling_llama.apply_rotary_pos_emb = orig_rope
        modeling_llama.eager_attention_forward = orig_attn
        for h in hooks:
            h.remove()
    assert seen["rope"] == model.config.num_hidden_layers and seen["attn"] == seen["rope"], seen
    layer_rep = dict(sorted(rep.items()))

    # ---- peft LoRA linear (q_proj: float32 input; o_proj: bfloat16 input)
    rep = {}
    torch.manual_seed(LORA_SEED)
    pm = get_peft_model(load_base("llama2"), lora_config())
    with torch.no_grad():  # non-zero B so the LoRA branch is not trivially zero
        for n, p in pm.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.1)
    pm.eval()
    att = pm.base_model.model.model.layers[0].self_attn
    hooks = []
    for proj_name in ("q_proj", "o_proj"):
        lin = getattr(att, proj_name)
        hooks.append(lin.register_forward_pre_hook(in_hook(f"{proj_name}: 1 LoRA linear input"), with_kwargs=True))
        hooks.append(lin.base_layer.register_forward_hook(out_hook(f"{proj_name}: 2 base_layer output")))
        hooks.append(lin.lora_A["default"].register_forward_pre_hook(
            in_hook(f"{proj_name}: 3 lora_A input (after peft _cast_input_dtype)"), with_kwargs=True))
        hooks.append(lin.lora_A["default"].register_forward_hook(out_hook(f"{proj_name}: 4 lora_A output")))
        hooks.append(lin.lora_B["default"].register_forward_hook(out_hook(f"{proj_name}: 5 lora_B output")))
        hooks.append(lin.register_forward_hook(out_hook(f"{proj_name}: 7 LoRA linear output (result.to(base dtype))")))

        def wrap(lin=lin, proj_name=proj_name):
            orig = lin.forward

            def fwd(x, *a, **kw):
                log = OpLog()
                with log:
                    out = orig(x, *a, **kw)
                ops = [o for o in log.ops if o[0] in ("mul", "add")]
                assert [o[0] for o in ops[:2]] == ["mul", "add"], ops
                rep[f"{proj_name}: 6 lora_B(..) * scaling / base + delta"] = f"{ops[0][2]} / {ops[1][2]}"
                return out
            lin.forward = fwd
            return orig
        hooks.append((lin, wrap()))
    try:
        ids = torch.tensor([row["input_ids"]])
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pm(input_ids=ids, position_ids=pos)
    finally:
        for h in hooks:
            if isinstance(h, tuple):
                h[0].forward = h[1]
            else:
                h.remove()
    lora_rep = dict(sorted(rep.items()))
    return {
        "note": "one torch.autocast('cpu', bfloat16) forward of tests/fixtures/models/llama2 loaded in float32 "
                "(eager attention), decoder layer 0; numbered in execution order",
        "llama2_layer": layer_rep,
        "peft_lora_linear": lora_rep,
    }


# --------------------------------------------------------------------------- main
def settings():
    return {
        "models": {n: rel(MODELS / n) for n in MODEL_NAMES},
        "modes": {
            "full": "all parameters train (float32 master weights)",
            "lora": f"peft LoraConfig(r={LORA_R}, lora_alpha={LORA_ALPHA}, lora_dropout=0.0, target_modules="
                    f"{TARGETS}, bias='none', task_type='CAUSAL_LM'), default init (lora_A kaiming-uniform a=sqrt(5), "
                    f"lora_B zeros) drawn with torch.manual_seed({LORA_SEED}) right before get_peft_model and saved "
                    "before any step to tests/fixtures/bf16/lora_init_<model>/ (peft save_pretrained); both "
                    "precisions load that dir with PeftModel.from_pretrained(is_trainable=True) onto a fresh "
                    "float32 base; only lora_A/lora_B train; scaling lora_alpha/r = 2.0",
        },
        "precisions": {
            "f32": "float32 weights and compute, no autocast",
            "bf16": "float32 master weights; `with torch.autocast('cpu', dtype=torch.bfloat16):` around the forward "
                    "AND the loss (logits (bf16) upcast with .float() before cross_entropy, as transformers' "
                    "ForCausalLMLoss); backward, clip and optimizer step outside autocast; grads are float32. "
                    "See autocast_dtypes for the dtype of every intermediate",
        },
        "dtype_loaded": "float32 (qwen2's F16 file upcast on load)",
        "attention": "eager",
        "data": "tests/fixtures/data/train_tokens.jsonl (16 rows) in file order, no shuffle, no packing; step k "
                "(1-based) uses rows (4(k-1)+j) mod 16 for j = 0..3",
        "labels": "labels if present else input_ids; CE(logits[t], labels[t+1]) for t in 0..n-2, -100 ignored",
        "steps": STEPS,
        "global_batch_samples": GLOBAL_BATCH,
        "micro_batch_samples": MICRO_BATCH,
        "grad_accumulation_steps": GLOBAL_BATCH // MICRO_BATCH,
        "per_sample_forward": "batch 1, no padding, position_ids 0..n-1 (== padded batch with proper mask)",
        "step_loss": "sum over the step's 4 samples of summed token CE / total supervised tokens of those 4 "
                     "samples; each micro-batch backwards (its summed float32 CE / step total tokens), grads "
                     "accumulate; recorded loss is float64 CE from the float32(-upcast) logits",
        "grad_clip": {"fn": "torch.nn.utils.clip_grad_norm_", "max_norm": MAX_GRAD_NORM, "norm_type": 2.0,
                      "over": "trainable parameters only",
                      "clip": "grads *= min(1, max_norm / (total_norm + 1e-6))",
                      "recorded": "returned total norm over the trainable parameters, before clipping"},
        "optimizer": {"type": "torch.optim.AdamW", "lr": LR, "betas": list(BETAS), "eps": EPS,
                      "weight_decay": WD, "amsgrad": False, "maximize": False,
                      "param_groups": "one group with all trainable parameters (decay applied to all of them)",
                      "update": "p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; "
                                "p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)"},
        "schedule": f"constant lr {LR:g}: no scheduler, no warm-up (recorded lr is the lr used by step k)",
        "eval": "tests/fixtures/golden.json loss definition on tests/fixtures/data/eval_tokens.jsonl (per sample, "
                "summed CE in float64 from the float32(-upcast) logits / total supervised tokens), computed in the "
                "run's precision (autocast for bf16); initial_eval_loss before step 1, final_eval_loss after the "
                "last step",
        "max_abs_diff_bf16_vs_f32": "loss: max over the steps of |loss_bf16 - loss_f32|; final_eval_loss: "
                                    "|final_eval_loss_bf16 - final_eval_loss_f32|; loss_step1 and "
                                    "initial_eval_loss: the same difference before any update (forward "
                                    "precision only, no trajectory divergence)",
    }


def main():
    torch.use_deterministic_algorithms(True)
    eval_rows = read_jsonl(DATA / "eval_tokens.jsonl")
    train_rows = read_jsonl(DATA / "train_tokens.jsonl")
    assert len(eval_rows) == 6 and len(train_rows) == 16
    golden = json.loads((OUT / "golden.json").read_text())
    training = json.loads((OUT / "training_golden.json").read_text())

    out = {
        "generated_with": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "peft": peft.__version__,
            "python": sys.version.split()[0],
            "script": "tools/golden/make_bf16_golden.py",
        },
        "settings": settings(),
        "autocast_dtypes": autocast_dtype_report(eval_rows[2]),
    }
    for section, table in out["autocast_dtypes"].items():
        if isinstance(table, dict):
            print(f"[autocast dtypes] {section}")
            for k, v in table.items():
                print(f"    {k:55s} {v}")

    BF16_DIR.mkdir(parents=True, exist_ok=True)
    for name in MODEL_NAMES:
        lora_init = make_lora_init(name)
        for mode in MODES:
            res = {}
            for precision in PRECISIONS:
                res[precision] = run(name, mode, precision, train_rows, eval_rows,
                                     lora_init if mode == "lora" else None)
            f, b = res["f32"], res["bf16"]
            assert [s["tokens"] for s in f["steps"]] == [s["tokens"] for s in b["steps"]]
            res["max_abs_diff_bf16_vs_f32"] = {
                "loss": max(abs(x["loss"] - y["loss"]) for x, y in zip(f["steps"], b["steps"])),
                "final_eval_loss": abs(f["final_eval_loss"] - b["final_eval_loss"]),
                "loss_step1": abs(f["steps"][0]["loss"] - b["steps"][0]["loss"]),
                "initial_eval_loss": abs(f["initial_eval_loss"] - b["initial_eval_loss"]),
            }
            # training must really move the model, in both precisions: step 17 sees step 1's rows again
            for p in PRECISIONS:
                st = res[p]["steps"]
                assert st[16]["loss"] < st[0]["loss"], (name, mode, p, st[0]["loss"], st[16]["loss"])
                assert abs(res[p]["final_eval_loss"] - res[p]["initial_eval_loss"]) > 1e-3, (name, mode, p)
            # the float32 runs start where the existing goldens are
            f32_init = res["f32"]["initial_eval_loss"]
            assert abs(f32_init - golden[name]["loss"]) < 1e-5, (name, f32_init, golden[name]["loss"])
            if name == "llama2" and mode == "full":
                ref = training["sft_llama2_trajectory_linear"]["steps"][0]  # step 1 (before any update), same rows
                got = res["f32"]["steps"][0]
                assert ref["tokens"] == got["tokens"]
                assert abs(ref["loss"] - got["loss"]) < 1e-5 and abs(ref["grad_norm"] - got["grad_norm"]) < 1e-4, \
                    (ref, got)
            out[f"{name}_{mode}"] = res

    print("max |bf16 - f32| per run:")
    for name in MODEL_NAMES:
        for mode in MODES:
            d = out[f"{name}_{mode}"]["max_abs_diff_bf16_vs_f32"]
            print(f"    {name}_{mode:5s} step loss {d['loss']:.6e}   final eval loss {d['final_eval_loss']:.6e}   "
                  f"(step 1 {d['loss_step1']:.3e}, initial eval {d['initial_eval_loss']:.3e})")
    print("generated_with:", json.dumps(out["generated_with"]))
    (OUT / "bf16_golden.json").write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", OUT / "bf16_golden.json")


if __name__ == "__main__":
    main()
