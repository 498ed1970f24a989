#!/usr/bin/env bash
# Conversion throughput and memory, and what a checkpoint save costs training, measured side
# by side in one run on the same disk:
#  1. a generated ~1.9 GB bf16 Llama (18 layers, h 2048, two 1 GB HF shards):
#     `cp -r` (+ sync) of the same bytes; `launch convert` hf → sharded at tp2 × pp2 and
#     back to HF; the same two conversions done with the safetensors library in Python
#     (`convert_ref.py`, placement read from our manifest, files fsynced as ours are).
#     Wall time, MB/s, and peak RSS (/usr/bin/time -v) of each. Page cache warm for all
#     (the model is read once first): this compares the copying, not the disk's reads.
#  2. training a 45M-parameter f32 Llama with a checkpoint every 2 steps, async vs
#     synchronous save: how long each save blocks training (`stall_s` of the checkpoint
#     events; the last save, which the run waits for before it ends, apart), the host copy
#     (`snapshot_s`) and the mean step time.
#   tools/bench/convert.sh [/tmp/refenv] [LAYERS]
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${1:-/tmp/refenv}/bin/python
layers=${2:-18}
cargo build --release --bin launch -q
launch=target/release/launch
tmp=$(mktemp -d -p "${BENCH_TMP:-/tmp}")
trap 'rm -rf "$tmp"' EXIT
ref=tools/bench/convert_ref.py

"$py" $ref make "$tmp/hf" "$layers"
bytes=$(du -cb "$tmp"/hf/*.safetensors | tail -1 | cut -f1)
cat "$tmp"/hf/* > /dev/null

# `measure NAME CMD...`: wall seconds, MB/s of the model's bytes and peak RSS of CMD.
measure() {
  local name=$1; shift
  /usr/bin/time -v -o "$tmp/time" "$@" > /dev/null
  python3 - "$name" "$bytes" "$tmp/time" <<'PY'
import re, sys
name, size, text = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read()
wall = text.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].split()[0]
secs = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1]) / 1024
print(f"{name:<34} {secs:7.2f} s {size / secs / 1e6:8.0f} MB/s   peak RSS {rss:7.0f} MB")
PY
}
sync
echo "model: $((bytes / 1000000)) MB of bf16 weights, $(nproc) cores"
measure "cp -r + sync" sh -c "cp -r '$tmp/hf' '$tmp/cp' && sync"
measure "launch convert hf → sharded tp2×pp2" \
  $launch convert --from "hf:$tmp/hf" --to "sharded:$tmp/ours" --tp 2 --pp 2
measure "python safetensors hf → sharded" "$py" $ref to-sharded "$tmp/hf" "$tmp/ours/manifest.json" "$tmp/theirs"
measure "launch convert sharded → hf" $launch convert --from "sharded:$tmp/ours" --to "hf:$tmp/back"
measure "python safetensors sharded → hf" "$py" $ref to-hf "$tmp/ours" "$tmp/back-py"
cmp <(cd "$tmp/ours" && sha256sum rank-*) <(cd "$tmp/theirs" && sha256sum rank-*) > /dev/null \
  && echo "(python's shards hold the same tensors: identical files)" \
  || echo "(python's shard files differ in layout from ours; compare tensors, not bytes)"
rm -rf "$tmp/cp" "$tmp/ours" "$tmp/theirs" "$tmp/back" "$tmp/back-py" "$tmp/hf"

"$py" $ref medium "$tmp/medium"
save() { # async → mean stall_s, max stall_s, mean step_time
  local run=$tmp/run-$1
  cat > "$tmp/job.toml" <<TOML
[job]
name = "save"
run_dir = "$run"
[model]
path = "$tmp/medium"
[data]
train = "tests/fixtures/data/train_tokens.jsonl"
max_seq_len = 64
packing = false
[training]
max_steps = 8
global_batch = 4
micro_batch = 1
lr = 1e-4
[checkpoint]
every = 2
keep_last = 1
async = $1
TOML
  RUST_LOG=warn $launch train "$tmp/job.toml" > /dev/null
  python3 - "$run/events.jsonl" "$1" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1])]
saves = [e for e in ev if e["event"] == "checkpoint"]
steps = [e["step_time"] for e in ev if e["event"] == "step" and e["step"] > 1]
# The last save is waited for before the run ends, async or not: count the others.
mid = saves[:-1]
stall = [e["stall_s"] for e in mid]
snap = [e["snapshot_s"] for e in mid]
kind = "async" if sys.argv[2] == "true" else "sync "
print(f"{kind} save: blocks training {1000 * sum(stall) / len(stall):7.1f} ms per save "
      f"(max {1000 * max(stall):.1f}; host copy {1000 * sum(snap) / len(snap):.1f}), "
      f"final save {1000 * saves[-1]['stall_s']:.0f} ms; mean step {1000 * sum(steps) / len(steps):.0f} ms")
PY
}
state=$(du -sb "$tmp/medium/model.safetensors" | cut -f1)
echo "checkpoint of a 45M-parameter f32 Llama: $((3 * state / 1000000)) MB (weights + AdamW moments)"
save false
save true
