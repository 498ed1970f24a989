#!/usr/bin/env bash
# Step time of tidemill vs transformers(+peft) on the same model, data and batch, on the
# CPU, interleaved: tidemill, transformers, tidemill, transformers … PAIRS times, each run
# STEPS steps; each run's figure is its median step time over steps 2..STEPS; the result
# is the median of the PAIRS ratios, with their range (this machine is shared and noisy).
#
#   tools/bench/step_time.sh [PAIRS=5] [STEPS=12] [REFENV=/tmp/refenv]
#   FULL=1    full SFT instead of LoRA (all linears)
#   DTYPE=bf16  bf16 mixed precision on both sides (transformers: torch.autocast)
#   LAUNCH=path   the launch binary to measure (default: build target/release/launch)
#   BASELINE=path another launch binary (e.g. an older commit's) run in the same rounds,
#                 so its ratio is measured under the same load (f32 only)
#   MODELS="quickstart wide"   which models (default both):
#     quickstart: assets/quickstart (hidden 64), its chat data, 8 samples per step, padded
#                 to the longest; LoRA r 8 / alpha 16 (transformers: bench_transformers.py)
#     wide:       a random Llama, hidden 256, 4 layers, 4 heads, vocab 512; 4 rows of 256
#                 random tokens per step; LoRA r 16 / alpha 32 (transformers: gpu_torch.py)
# Both sides: AdamW, 2 CPU threads, dropout 0, eager/SDPA attention as transformers picks.
set -euo pipefail
cd "$(dirname "$0")/../.."
pairs=${1:-5}
steps=${2:-12}
py=${3:-/tmp/refenv}/bin/python
dtype=${DTYPE:-f32}
models=${MODELS:-quickstart wide}
mode=lora; [ -n "${FULL:-}" ] && mode=full
launch=${LAUNCH:-}
if [ -z "$launch" ]; then
  cargo build --release --bin launch -q
  launch=target/release/launch
fi
baseline=${BASELINE:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
all_linear='["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'

# job MODEL_DIR TRAIN MAX_SEQ BATCH LR R ALPHA WEIGHT_DECAY MAX_GRAD_NORM → a job file
job() {
  local dir=$work/run-$RANDOM
  cat <<TOML > "$dir.toml"
[job]
name = "bench"
run_dir = "$dir"
[model]
path = "$1"
dtype = "$dtype"
[data]
train = "$2"
max_seq_len = $3
packing = false
shuffle = false
[training]
max_steps = $steps
global_batch = $4
micro_batch = $4
lr = $5
schedule = "constant"
weight_decay = $8
max_grad_norm = $9
TOML
  if [ "$mode" = lora ]; then
    printf '[lora]\nr = %s\nalpha = %s\ntargets = %s\n' "$6" "$7" "$all_linear" >> "$dir.toml"
  fi
  echo "$dir"
}

# ours JOB_DIR [BINARY] → median step seconds over steps 2..
ours() {
  rm -rf "$1"
  RUST_LOG=warn RAYON_NUM_THREADS=2 "${2:-$launch}" train "$1.toml" > /dev/null
  python3 - "$1/events.jsonl" <<'PY'
import json, statistics, sys
steps = [e for e in map(json.loads, open(sys.argv[1])) if e["event"] == "step"][1:]
print(statistics.median(e["step_time"] for e in steps))
PY
}

bf16_flag=""; [ "$dtype" = bf16 ] && bf16_flag="--bf16"
results=$work/results.txt
for model in $models; do
  case $model in
    quickstart)
      lr=2e-3; [ "$mode" = full ] && lr=1e-3
      dir=$(job assets/quickstart/model assets/quickstart/data/train.jsonl 512 8 $lr 8 16 0.0 0)
      full_flag=""; [ "$mode" = full ] && full_flag="--full"
      theirs() {
        "$py" tools/quickstart/bench_transformers.py --steps "$steps" --batch 8 --threads 2 \
          --lr $lr $full_flag $bf16_flag | tail -1 \
          | python3 -c 'import json,sys; print(json.load(sys.stdin)["median_seconds_per_step"])'
      } ;;
    wide)
      "$py" tools/bench/make_bench_model.py --shape cpu-wide --out "$work/wide" --seq 256 \
        --samples 64 > /dev/null
      # gpu_torch.py's optimizer: weight decay 0.01, gradients clipped to norm 1.
      dir=$(job "$work/wide" "$work/wide/train.jsonl" 256 4 1e-4 16 32 0.01 1.0)
      theirs() {
        OMP_NUM_THREADS=2 "$py" tools/bench/gpu_torch.py --model "$work/wide" \
          --data "$work/wide/train.jsonl" --seq 256 --micro-batch 4 --steps "$steps" \
          --warmup 1 --mode $mode --device cpu --dtype "$dtype" --threads 2 | tail -1 \
          | python3 -c 'import json,sys; print(json.load(sys.stdin)["step_s_median"])'
      } ;;
    *) echo "unknown model $model" >&2; exit 2 ;;
  esac
  for i in $(seq "$pairs"); do
    a=$(ours "$dir")
    b=$(theirs)
    echo "$model $a $b" >> "$results"
    printf '%s round %d: tidemill %.1f ms, transformers %.1f ms' "$model" "$i" \
      "$(python3 -c "print($a*1000)")" "$(python3 -c "print($b*1000)")" >&2
    if [ -n "$baseline" ]; then
      c=$(ours "$dir" "$baseline")
      echo "$model-baseline $c $b" >> "$results"
      printf ', baseline %.1f ms' "$(python3 -c "print($c*1000)")" >&2
    fi
    echo >&2
  done
done
python3 - "$results" "$mode" "$dtype" "$pairs" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    model, a, b = line.split()
    rows[model].append((float(a), float(b)))
mode, dtype, pairs = sys.argv[2], sys.argv[3], sys.argv[4]
for model, ab in rows.items():
    ratios = sorted(a / b for a, b in ab)
    print(f"{model} {mode} {dtype}: tidemill {statistics.median(a for a, _ in ab) * 1000:.1f} ms/step, "
          f"transformers {statistics.median(b for _, b in ab) * 1000:.1f} ms/step; "
          f"ratio {statistics.median(ratios):.2f} (median of {pairs} interleaved pairs, "
          f"range {ratios[0]:.2f}-{ratios[-1]:.2f})")
PY
