#!/usr/bin/env bash
# Step time of tidemill vs transformers(+peft) on the same model, data and batch, measured
# side by side in one run: the quick-start model, 8 chat samples per step (no packing,
# padded to the longest), LoRA r=8 on every linear, AdamW, constant lr, 2 CPU threads.
#   tools/bench/step_time.sh [STEPS] [/tmp/refenv]      (full SFT: FULL=1 tools/bench/step_time.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-30}
py=${2:-/tmp/refenv}/bin/python
cargo build --release --bin launch -q
run=$(mktemp -d)
job=$run/job.toml
cat > "$job" <<TOML
[job]
name = "bench"
run_dir = "$run/run"
[model]
path = "assets/quickstart/model"
[data]
train = "assets/quickstart/data/train.jsonl"
max_seq_len = 512
packing = false
shuffle = false
[training]
max_steps = $steps
global_batch = 8
micro_batch = 8
lr = 2e-3
schedule = "constant"
max_grad_norm = 0
TOML
full_flag=""
if [ -z "${FULL:-}" ]; then
  printf '[lora]\nr = 8\nalpha = 16\ntargets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]\n' >> "$job"
else
  full_flag="--full"; sed -i 's/lr = 2e-3/lr = 1e-3/' "$job"
fi
RUST_LOG=warn RAYON_NUM_THREADS=2 target/release/launch train "$job" > /dev/null
ours=$(python3 - "$run/run/events.jsonl" <<'PY'
import json, sys
steps = [e for e in map(json.loads, open(sys.argv[1])) if e["event"] == "step"][1:]
print(sum(e["tokens"] / e["tokens_per_s"] for e in steps) / len(steps))
PY
)
theirs=$("$py" tools/quickstart/bench_transformers.py --steps "$steps" --batch 8 --threads 2 $full_flag | tail -1 \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["seconds_per_step"])')
python3 -c "print(f'tidemill {float(\"$ours\")*1000:.1f} ms/step, transformers {float(\"$theirs\")*1000:.1f} ms/step, ratio {float(\"$ours\")/float(\"$theirs\"):.2f}')"
rm -rf "$run"
