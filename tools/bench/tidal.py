#!/usr/bin/env python3
"""Tidal jobs' hand-back, measured (a benchmark, not a test; standard library only).

  tools/bench/tidal.sh [PAIRS]      (LAUNCH=path/to/launch, default target/release/launch)

On the quick-start job, 2 ranks, interleaved pairs:
  - preempt: a tidal job (`--until` far away, grace 30 s) gets SIGTERM at step >= 6: the
    time from the signal to `launch` exiting (75) and to `gpus_released`, the steps lost,
    whether it saved;
  - baseline: the same job without [tidal] gets SIGTERM at the same step: `launch` kills
    its workers at once (what torchrun does at its grace's end).
and then windows that end by themselves (`--until` 12 s away): the GPUs' margin before the
hand-back (end - margin) and the drain (rank 0's `yield`, after its final checkpoint, to
`gpus_released`). Prints medians with min-max, and the ratio of the graceful stop to the
immediate kill.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.environ.get("LAUNCH", os.path.join(ROOT, "target/release/launch"))
PAIRS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
BASE = ["--set", "training.max_steps=400", "--set", "training.eval_every=0",
        "--set", "checkpoint.every=5", "--nproc-per-node", "2"]
TIDAL = ["--set", "tidal.grace_s=30", "--set", "tidal.handback_margin_s=2",
         "--set", "tidal.timezone=UTC", "--set", "tidal.safety_factor=1"]


def events(run):
    path = os.path.join(run, "events.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def until(secs):
    t = datetime.now(timezone.utc) + timedelta(seconds=secs)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def start(run, tidal, extra=()):
    args = [LAUNCH, "train", os.path.join(ROOT, "configs/quickstart.toml"),
            "--set", f"job.run_dir=\"{run}\""] + BASE + list(extra)
    if tidal:
        args += TIDAL + ["--until", until(300)]
    env = dict(os.environ, RUST_LOG="warn", RAYON_NUM_THREADS="1")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def wait_step(run, step, proc, limit=300):
    t0 = time.time()
    while time.time() - t0 < limit:
        if any(e.get("event") == "step" and e.get("rank") == 0 and e.get("step", 0) >= step
               for e in events(run)):
            return
        if proc.poll() is not None:
            raise SystemExit(f"launch ended early: {proc.stderr.read().decode()}")
        time.sleep(0.02)
    raise SystemExit("no progress")


def sigterm(tidal, root):
    run = tempfile.mkdtemp(dir=root)
    p = start(run, tidal)
    wait_step(run, 6, p)
    sent = time.time()
    p.send_signal(signal.SIGTERM)
    code = p.wait()
    gone = time.time() - sent
    ev = events(run)
    rel = [e["at"] for e in ev if e.get("event") == "gpus_released"]
    close = [e for e in ev if e.get("event") == "window_close"]
    y = [e for e in ev if e.get("event") == "yield"]
    return {
        "code": code,
        "exit_s": gone,
        "released_s": (max(rel) - sent) if rel else None,
        "lost": close[0]["lost_steps"] if close else None,
        "saved": bool(y and y[0]["checkpointed"]),
    }


def window_end(root):
    run = tempfile.mkdtemp(dir=root)
    args = [LAUNCH, "train", os.path.join(ROOT, "configs/quickstart.toml"),
            "--set", f"job.run_dir=\"{run}\""] + BASE + TIDAL + ["--until", until(12)]
    env = dict(os.environ, RUST_LOG="warn", RAYON_NUM_THREADS="1")
    code = subprocess.run(args, cwd=ROOT, env=env, capture_output=True).returncode
    ev = events(run)
    opened = [e for e in ev if e.get("event") == "window_open"][0]
    rel = max(e["at"] for e in ev if e.get("event") == "gpus_released")
    y = [e for e in ev if e.get("event") == "yield"]
    return {
        "code": code,
        "margin_s": opened["handback"] - rel,
        "drain_s": (rel - y[0]["at"]) if y else None,
        "lost": [e for e in ev if e.get("event") == "window_close"][0]["lost_steps"],
    }


def summary(name, xs, unit="s"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return f"{name}: none"
    return (f"{name}: median {statistics.median(xs):.3f} {unit} "
            f"(min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})")


def main():
    if not os.path.exists(LAUNCH):
        raise SystemExit(f"{LAUNCH}: build it first (cargo build --release --bin launch)")
    root = tempfile.mkdtemp(prefix="tidal-bench-")
    tidal, plain = [], []
    for i in range(PAIRS):
        for kind in (("tidal", "plain") if i % 2 == 0 else ("plain", "tidal")):
            r = sigterm(kind == "tidal", root)
            (tidal if kind == "tidal" else plain).append(r)
            print(kind, json.dumps(r), flush=True)
    ends = []
    for _ in range(3):
        r = window_end(root)
        ends.append(r)
        print("window end", json.dumps(r), flush=True)
    print()
    print(summary("tidal SIGTERM -> launch exited (75)", [r["exit_s"] for r in tidal]))
    print(summary("tidal SIGTERM -> gpus_released", [r["released_s"] for r in tidal]))
    print(summary("baseline SIGTERM -> launch exited (workers killed at once)",
                  [r["exit_s"] for r in plain]))
    ratios = [t["exit_s"] / p["exit_s"] for t, p in zip(tidal, plain)]
    print(summary("graceful / immediate, per pair", ratios, unit="x"))
    print(summary("steps lost per preemption", [r["lost"] for r in tidal], unit="steps"))
    print(f"preemptions that saved at the next step: {sum(r['saved'] for r in tidal)}/{len(tidal)}")
    print(summary("window end: GPUs released before the hand-back", [r["margin_s"] for r in ends]))
    print(summary("window end: drain (final checkpoint committed -> gpus_released)",
                  [r["drain_s"] for r in ends]))
    print(summary("window end: steps lost", [r["lost"] for r in ends], unit="steps"))


if __name__ == "__main__":
    main()
