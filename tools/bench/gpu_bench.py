#!/usr/bin/env python3
"""The GPU check of tidemill, run by tools/bench/gpu.sh (standard library only; the PyTorch
side runs in --python, which has torch, transformers and peft).

In order, each result written to OUT/summary.json as soon as it is known (a run cut off by
its time limit still tells what it reached):
  1. probe: `launch probe` (driver, GPUs, CUDA headers, NVRTC, NCCL), nvidia-smi, versions.
  2. parity: the quick-start job, 10 steps, LoRA (dropout 0), on DEVICE in f32 and bf16
     against the CPU in f32: the largest loss difference per step (full SFT after 3).
  3. throughput: LoRA (r 16, all linears) and full SFT of random Qwen2-0.5B- and
     Llama-1B-shaped models at sequence 2048 (bf16, activation recomputation): tidemill
     at the largest micro-batch that fits (tried from the largest down), then transformers
     (+peft) with bf16 autocast and SDPA at the same micro-batch (with gradient
     checkpointing only if it does not fit without); tokens/s, MFU, peak memory, the first
     step's time (kernel compilation and autotuning), and the ratio.
  4. full-SFT parity, then `launch plan --calibrate --device DEVICE` (the measured hardware
     profile), if time is left.
  5. fusion: the throughput runs again under burn's kernel fusion (`job.fusion = true`),
     full SFT of the largest shape first, each at the micro-batch step 3 found, while time
     is left. (After step 2, the data plane at world 1: `launch comm-check`, and a
     `launch train` over NCCL, plain and fused.)
--small runs the same on tiny shapes (sequence 128) for a dry run on a CPU.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
import flops  # noqa: E402

ALL_LINEAR = '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--launch", required=True, help="the launch binary")
    p.add_argument("--python", default=sys.executable, help="a Python with torch, transformers, peft")
    p.add_argument("--small", action="store_true", help="tiny shapes (a dry run)")
    p.add_argument("--budget", type=float, default=400, help="seconds; no new item starts after")
    p.add_argument("--steps", type=int, default=6, help="steps per throughput run (the first is compile)")
    return p.parse_args()


class Summary:
    def __init__(self, path):
        self.path = path
        self.data = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "items": {}}
        self.save()

    def put(self, key, value):
        self.data["items"][key] = value
        self.save()

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def run(cmd, timeout, env=None):
    """(rc, stdout, stderr tail, seconds); rc None when it ran out of time."""
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
        return p.returncode, p.stdout, p.stderr[-3000:], time.perf_counter() - start
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, "", err[-3000:], time.perf_counter() - start


def job_file(work, name, model, train, device, dtype, steps, batch, seq, lr, lora, recompute,
             data_plane="auto", fusion=False):
    run_dir = work / name
    text = f"""[job]
name = "{name}"
run_dir = "{run_dir}"
device = "{device}"
{"fusion = true" if fusion else "# job.fusion unset: off (a binary older than the key refuses it)"}
[model]
path = "{model}"
dtype = "{dtype}"
[data]
train = "{train}"
max_seq_len = {seq}
packing = false
shuffle = false
[training]
max_steps = {steps}
global_batch = {batch}
micro_batch = {batch}
lr = {lr}
schedule = "constant"
weight_decay = 0.01
max_grad_norm = 1.0
recompute = {str(recompute).lower()}
[export]
dtype = "bf16"
[launch]
max_restarts = 0
data_plane = "{data_plane}"
"""
    if lora:
        text += f"[lora]\nr = {lora[0]}\nalpha = {lora[1]}\ndropout = 0.0\ntargets = {ALL_LINEAR}\n"
    path = work / f"{name}.toml"
    path.write_text(text)
    return path, run_dir


def steps_of(run_dir):
    events = run_dir / "events.jsonl"
    if not events.exists():
        return []
    out = []
    for line in events.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:  # the line being written
            continue
        if e.get("event") == "step":
            out.append(e)
    return out


LIVE = set()  # process groups of running jobs, stopped when this script is


def stop_live(*_):
    for pid in list(LIVE):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(124)


def train(a, work, name, timeout, stop_at_last_step=False, **job):
    """`launch train` of a job; with `stop_at_last_step`, its process group is stopped once
    the last step's event is written (the final checkpoint and export are not measured and
    of a 1B model take long). rc 0 then."""
    path, run_dir = job_file(work, name, **job)
    start = time.perf_counter()
    errf = tempfile.TemporaryFile()
    p = subprocess.Popen([a.launch, "train", str(path)], stdout=subprocess.DEVNULL, stderr=errf,
                         env={**os.environ, "RUST_LOG": "warn"}, start_new_session=True)
    LIVE.add(p.pid)
    rc = None
    while time.perf_counter() - start < timeout:
        rc = p.poll()
        if rc is not None:
            break
        if stop_at_last_step and len(steps_of(run_dir)) >= job["steps"]:
            os.killpg(p.pid, 15)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
            rc = 0
            break
        time.sleep(0.5)
    if rc is None:
        os.killpg(p.pid, 9)
        p.wait()
    LIVE.discard(p.pid)
    errf.seek(0)
    err = errf.read().decode(errors="replace")[-3000:]
    return {"rc": rc, "seconds": time.perf_counter() - start, "steps": steps_of(run_dir),
            "stderr": err if rc != 0 else ""}


def parity(a, work, summary, deadline, modes):
    qs = ROOT / "assets" / "quickstart"
    for mode in modes:
        if time.time() > deadline:
            summary.put("stopped", f"time budget spent before parity {mode}")
            return
        common = dict(model=qs / "model", train=qs / "data" / "train.jsonl", steps=10, batch=8, seq=512,
                      lr=2e-3 if mode == "lora" else 1e-3, lora=(8, 16) if mode == "lora" else None,
                      recompute=False)
        ref = train(a, work, f"parity-{mode}-cpu", 120, device="cpu", dtype="f32", **common)
        result = {"cpu_f32_losses": [s["loss"] for s in ref["steps"]]}
        for dtype in ["f32", "bf16"]:
            got = train(a, work, f"parity-{mode}-{a.device}-{dtype}", 240, device=a.device, dtype=dtype, **common)
            losses = [s["loss"] for s in got["steps"]]
            pairs = list(zip(losses, result["cpu_f32_losses"]))
            result[f"{a.device}_{dtype}"] = {
                "rc": got["rc"], "losses": losses,
                "max_abs_diff_vs_cpu_f32": max((abs(x - y) for x, y in pairs), default=None),
                "first_step_s": got["steps"][0]["step_time"] if got["steps"] else None,
                "stderr": got["stderr"],
            }
        summary.put(f"parity_{mode}", result)


def nccl(a, work, summary):
    """The data plane at world 1 (one GPU: NCCL refuses two ranks on it): the communicator
    contract through NCCL and a 256 MiB all-reduce through NCCL vs through host memory
    (`launch comm-check`), then a `launch train` with `launch.data_plane = "nccl"`."""
    mb = "16" if a.small else "256"
    rc, stdout, err, secs = run([a.launch, "comm-check", "--device", a.device, "--bench-mb", mb,
                                 "--repeats", "5"], 180)
    item = {"rc": rc, "seconds": secs, "stderr": err if rc else ""}
    try:
        item.update(json.loads(stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        item["stdout"] = stdout[-2000:]
    summary.put("comm_check", item)
    qs = ROOT / "assets" / "quickstart"
    got = train(a, work, "nccl-world1", 180, model=qs / "model", train=qs / "data" / "train.jsonl",
                device=a.device, dtype="f32", steps=3, batch=8, seq=512, lr=1e-3, lora=None,
                recompute=False, data_plane="nccl" if a.device == "cuda" else "tcp")
    summary.put("train_data_plane_nccl", {"rc": got["rc"], "seconds": got["seconds"],
                                          "losses": [s["loss"] for s in got["steps"]],
                                          "stderr": got["stderr"]})
    if a.device == "cuda":
        # The same under kernel fusion: a fused tensor's device buffer through NCCL.
        got = train(a, work, "nccl-world1-fused", 180, model=qs / "model",
                    train=qs / "data" / "train.jsonl", device=a.device, dtype="f32", steps=3,
                    batch=8, seq=512, lr=1e-3, lora=None, recompute=False, data_plane="nccl",
                    fusion=True)
        summary.put("train_data_plane_nccl_fused", {"rc": got["rc"], "seconds": got["seconds"],
                                                    "losses": [s["loss"] for s in got["steps"]],
                                                    "stderr": got["stderr"]})


def ours(a, work, shape, mode, model, seq, candidates, fusion=False, timeout=240):
    tried = []
    for mb in candidates:
        name = f"ours-{shape}-{mode}-mb{mb}" + ("-fused" if fusion else "")
        got = train(a, work, name, timeout, True, device=a.device, dtype="bf16",
                    model=model, train=model / "train.jsonl", steps=a.steps, batch=mb, seq=seq, lr=1e-4,
                    lora=(16, 32) if mode == "lora" else None, recompute=True, fusion=fusion)
        steps = got["steps"]
        if got["rc"] == 0 and len(steps) == a.steps:
            steady = [s["step_time"] for s in steps[1:]] or [steps[0]["step_time"]]
            step_s = statistics.median(steady)
            return {"micro_batch": mb, "tokens_per_s": mb * seq / step_s, "step_s_median": step_s,
                    "step_s_range": [min(steady), max(steady)], "first_step_s": steps[0]["step_time"],
                    "compile_s": steps[0]["step_time"] - step_s,
                    "peak_memory_bytes": max((s.get("peak_mem_bytes") or 0) for s in steps),
                    "losses": [s["loss"] for s in steps], "tried": tried}
        tried.append({"micro_batch": mb, "rc": got["rc"], "stderr": got["stderr"][-600:]})
    return {"micro_batch": None, "tried": tried}


def theirs(a, work, mode, model, seq, mb):
    out = work / f"torch-{model.name}-{mode}-{mb}.json"
    base = [a.python, str(ROOT / "tools/bench/gpu_torch.py"), "--model", str(model),
            "--data", str(model / "train.jsonl"), "--seq", str(seq), "--micro-batch", str(mb),
            "--steps", str(max(a.steps - 2, 2)), "--warmup", "1", "--mode", mode, "--device", a.device,
            "--dtype", "bf16", "--out", str(out)]
    for extra in [[], ["--recompute"]]:
        rc, _, err, _ = run(base + extra, 300)
        if rc == 0 and out.exists():
            return json.loads(out.read_text())
        if a.device != "cuda":
            break
    return {"rc": rc, "stderr": err[-600:]}


def throughput(a, work, summary, deadline):
    shapes = [("tiny-qwen2", 128), ("tiny-llama", 128)] if a.small else [("qwen2-0.5b", 2048), ("llama-1b", 2048)]
    for shape, seq in shapes:
        model = work / shape
        rc, _, err, secs = run([a.python, str(ROOT / "tools/bench/make_bench_model.py"), "--shape", shape,
                                "--out", str(model), "--seq", str(seq), "--samples", "64"], 300)
        if rc != 0:
            summary.put(f"model_{shape}", {"rc": rc, "stderr": err})
            continue
        config = json.loads((model / "config.json").read_text())
        for mode in ["lora", "full"]:
            if time.time() > deadline:
                summary.put("stopped", f"time budget spent before {shape} {mode}")
                return
            candidates = [2] if a.small else ([8, 4, 2, 1] if mode == "lora" else [4, 2, 1])
            us = ours(a, work, shape, mode, model, seq, candidates)
            mb = us.get("micro_batch")
            them = theirs(a, work, mode, model, seq, mb) if mb else {}
            fpt = flops.model_flops_per_token(config, seq, mode)
            peak = them.get("peak_flops")
            item = {"shape": shape, "seq": seq, "mode": mode, "flops_per_token": fpt, "tidemill": us,
                    "transformers": them}
            if us.get("tokens_per_s") and peak:
                us["mfu"] = flops.mfu(us["tokens_per_s"], fpt, peak)
            if us.get("tokens_per_s") and them.get("tokens_per_s"):
                item["ratio_tokens_per_s"] = us["tokens_per_s"] / them["tokens_per_s"]
            summary.put(f"throughput_{shape}_{mode}", item)


def fusion(a, work, summary, deadline):
    """burn's kernel fusion (`job.fusion = true`) against the same run without it, for each
    shape and mode the throughput step measured (full SFT of the largest shape first), at
    the micro-batch it found: whether fusion measures faster, and its compile time. Each
    run gets what is left of the budget plus 80 s (gpu.sh's LIMIT is the budget plus 90)."""
    if a.device != "cuda":
        summary.put("fusion", {"skipped": "kernel fusion is burn's GPU path (device = cuda)"})
        return
    items = [i for k, i in summary.data["items"].items() if k.startswith("throughput_")]
    for item in sorted(items, key=lambda i: (i["mode"] != "full", -i["flops_per_token"])):
        plain = item["tidemill"]
        if not plain.get("micro_batch"):
            continue
        left = min(240.0, deadline + 80 - time.time())
        if left < 60:
            summary.put("stopped_fusion", f"time budget spent before {item['shape']} {item['mode']}")
            return
        fused = ours(a, work, item["shape"], item["mode"], work / item["shape"], item["seq"],
                     [plain["micro_batch"]], fusion=True, timeout=left)
        entry = {"shape": item["shape"], "mode": item["mode"], "micro_batch": plain["micro_batch"],
                 "unfused_tokens_per_s": plain["tokens_per_s"], "fused": fused}
        if fused.get("tokens_per_s"):
            entry["ratio_fused_over_unfused"] = fused["tokens_per_s"] / plain["tokens_per_s"]
        summary.put(f"fusion_{item['shape']}_{item['mode']}", entry)


def main():
    a = parse()
    signal.signal(signal.SIGTERM, stop_live)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + a.budget
    summary = Summary(out / "summary.json")
    work = Path(tempfile.mkdtemp(prefix="tidemill-gpu-"))
    rc, stdout, err, _ = run([a.launch, "probe"], 60)
    probe = {"rc": rc, "stderr": err}
    try:
        probe.update(json.loads(stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        probe["stdout"] = stdout
    smi = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], 30) \
        if a.device == "cuda" else (None, "", "", 0)
    probe["nvidia_smi"] = smi[1].strip()
    rc, stdout, err, _ = run([a.python, "-c", "import torch, transformers, peft; print(torch.__version__, "
                              "transformers.__version__, peft.__version__, torch.version.cuda)"], 60)
    probe["python"] = stdout.strip() or err[-300:]
    summary.put("probe", probe)
    if a.device == "cuda" and probe.get("rc") != 0:
        summary.put("stopped", "the probe found the GPU path cannot run here")
        return
    parity(a, work, summary, deadline, ["lora"])
    nccl(a, work, summary)
    throughput(a, work, summary, deadline)
    parity(a, work, summary, deadline + 40, ["full"])
    if time.time() < deadline + 40:
        rc, stdout, err, secs = run([a.launch, "plan", "--calibrate", "--device", a.device], 60)
        summary.put("calibrate", {"rc": rc, "seconds": secs, "profile": stdout, "stderr": err if rc else ""})
    fusion(a, work, summary, deadline)
    summary.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    summary.save()
    table(summary.data)


def table(data):
    """The summary as a table (also what the note quotes)."""
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
    gib = lambda b: b / 2**30 if b else None  # noqa: E731
    print(f"{'shape':<12}{'mode':<6}{'mb':>4}{'ours tok/s':>12}{'torch tok/s':>13}{'ratio':>7}"
          f"{'ours MFU':>10}{'torch MFU':>11}{'ours GiB':>10}{'torch GiB':>11}{'compile s':>11}")
    for key, item in data["items"].items():
        if not key.startswith("throughput_"):
            continue
        us, them = item["tidemill"], item["transformers"]
        mem = them.get("peak_memory_bytes") or {}
        torch_mem = mem.get("max_memory_reserved") or mem.get("max_rss")
        print(f"{item['shape']:<12}{item['mode']:<6}{fmt(us.get('micro_batch'), 'd'):>4}"
              f"{fmt(us.get('tokens_per_s'), '.0f'):>12}{fmt(them.get('tokens_per_s'), '.0f'):>13}"
              f"{fmt(item.get('ratio_tokens_per_s'), '.2f'):>7}{fmt(us.get('mfu'), '.1%'):>10}"
              f"{fmt(them.get('mfu'), '.1%'):>11}{fmt(gib(us.get('peak_memory_bytes')), '.1f'):>10}"
              f"{fmt(gib(torch_mem), '.1f'):>11}{fmt(us.get('compile_s'), '.1f'):>11}")
    for key, item in data["items"].items():
        if key.startswith("fusion_"):
            fused = item["fused"]
            print(f"fusion {item['shape']} {item['mode']} mb {item['micro_batch']}: "
                  f"{fmt(fused.get('tokens_per_s'), '.0f')} tok/s fused vs "
                  f"{fmt(item['unfused_tokens_per_s'], '.0f')} unfused "
                  f"(ratio {fmt(item.get('ratio_fused_over_unfused'), '.2f')}, "
                  f"compile {fmt(fused.get('compile_s'), '.1f')} s)")


if __name__ == "__main__":
    main()
