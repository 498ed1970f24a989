#!/usr/bin/env bash
# CPU step time of each two-rank layout against one process, measured side by side in one
# run on the same data and batch: the quick-start model (Llama) for dp2, tp2 (with and
# without sequence parallelism) and pp2 (1F1B vs GPipe), and a Mixtral made with the
# quick-start model's sizes (8 experts, top 2; generated with transformers) for dp2 vs ep2,
# and a four-layer Llama of those sizes for pp2 1F1B vs GPipe vs interleaved (2 virtual
# stages per rank). Full SFT, 8 rows of 512 packed tokens per step in micro-batches of 1,
# mean over steps 3.. of rank 0's step_time.
#   tools/bench/layouts.sh [STEPS] [/tmp/refenv]
#
# With BEFORE=path/to/an/older/launch it compares the two builds instead: for each two-rank
# layout, PAIRS (default 5) runs of the older and this build, interleaved (A B A B ...),
# and prints the median of this build's step time over the older one's with the spread.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-12}
py=${2:-/tmp/refenv}/bin/python
cargo build --release --bin launch -q
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

moe=$tmp/moe
deep=$tmp/deep
"$py" - "$moe" "$deep" <<'PY'
import json, shutil, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
out, deep = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cfg = MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
                    initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=1)
MixtralForCausalLM(cfg).save_pretrained(out)
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(f"assets/quickstart/model/{f}", out)
cfg = json.load(open("assets/quickstart/model/config.json"))
cfg["num_hidden_layers"] = 4
cfg.pop("transformers_version", None)
LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(deep)
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(f"assets/quickstart/model/{f}", deep)
PY

# Mean step time (ms) of rank 0 of a run: `measure MODEL NPROC [--set k=v]...`
measure() { measure_with target/release/launch "$@"; }
measure_with() {
  local bin=$1 model=$2 nproc=$3; shift 3
  local run=$tmp/run-$RANDOM
  cat > "$tmp/job.toml" <<TOML
[job]
name = "layouts"
run_dir = "$run"
[model]
path = "$model"
[data]
train = "assets/quickstart/data/train.jsonl"
max_seq_len = 512
packing = true
shuffle = false
[training]
max_steps = $steps
global_batch = 8
micro_batch = 1
lr = 1e-3
schedule = "constant"
TOML
  # The machine's cores are shared out between the ranks.
  local threads=$(( $(nproc) / nproc ))
  RUST_LOG=warn RAYON_NUM_THREADS=$(( threads > 0 ? threads : 1 )) \
    "$bin" train "$tmp/job.toml" --nproc-per-node "$nproc" "$@" > /dev/null
  python3 - "$run/events.jsonl" <<'PY'
import json, sys
steps = [e for e in map(json.loads, open(sys.argv[1]))
         if e["event"] == "step" and e.get("rank", 0) == 0 and e["step"] > 2]
print(f'{1000 * sum(e["step_time"] for e in steps) / len(steps):.1f}')
PY
}

row() { # name ms baseline
  python3 -c "print(f'{\"$1\":<28} {float(\"$2\"):8.1f} ms/step   {float(\"$2\")/float(\"$3\"):5.2f} × one process')"
}

# `compare NAME MODEL NPROC [--set k=v]...`: this build against $BEFORE, interleaved.
compare() {
  local name=$1; shift
  local ratios=() a b
  for _ in $(seq "${PAIRS:-5}"); do
    a=$(measure_with "$BEFORE" "$@")
    b=$(measure_with target/release/launch "$@")
    ratios+=("$a $b")
  done
  printf '%s\n' "${ratios[@]}" | python3 -c "
import statistics, sys
pairs = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
r = sorted(b / a for a, b in pairs)
print(f'{\"$name\":<28} before {statistics.median(a for a, _ in pairs):7.1f} ms  now {statistics.median(b for _, b in pairs):7.1f} ms  '
      f'now/before {statistics.median(r):5.2f} (range {r[0]:.2f}-{r[-1]:.2f}, {len(r)} pairs)')"
}

if [ -n "${BEFORE:-}" ]; then
  echo "$(nproc) cores; this build against $BEFORE, ${PAIRS:-5} interleaved pairs of $steps steps"
  q=assets/quickstart/model
  compare "dp2" $q 2
  compare "dp2 ZeRO-1" $q 2 --set parallel.zero1=true
  compare "tp2" $q 2 --set parallel.tp=2
  compare "tp2 + sequence parallel" $q 2 --set parallel.tp=2 --set parallel.sequence_parallel=true
  compare "pp2 1F1B" $q 2 --set parallel.pp=2
  compare "ep2 (Mixtral)" "$moe" 2 --set parallel.ep=2
  compare "pp2 interleaved (4 layers)" "$deep" 2 --set parallel.pp=2 --set parallel.schedule=interleaved
  exit 0
fi

echo "$(nproc) cores; quick-start Llama (2 layers, h 64), full SFT"
one=$(measure assets/quickstart/model 1)
row "one process" "$one" "$one"
row "dp2" "$(measure assets/quickstart/model 2)" "$one"
row "tp2" "$(measure assets/quickstart/model 2 --set parallel.tp=2)" "$one"
row "tp2 + sequence parallel" "$(measure assets/quickstart/model 2 --set parallel.tp=2 --set parallel.sequence_parallel=true)" "$one"
row "pp2 1F1B" "$(measure assets/quickstart/model 2 --set parallel.pp=2)" "$one"
row "pp2 GPipe" "$(measure assets/quickstart/model 2 --set parallel.pp=2 --set parallel.schedule=gpipe)" "$one"
echo "Mixtral with the same sizes, 8 experts top 2, full SFT"
one=$(measure "$moe" 1)
row "one process" "$one" "$one"
row "dp2" "$(measure "$moe" 2)" "$one"
row "ep2" "$(measure "$moe" 2 --set parallel.ep=2)" "$one"
echo "Llama with the same sizes and 4 layers, full SFT"
one=$(measure "$deep" 1)
row "one process" "$one" "$one"
row "pp2 1F1B" "$(measure "$deep" 2 --set parallel.pp=2)" "$one"
row "pp2 GPipe" "$(measure "$deep" 2 --set parallel.pp=2 --set parallel.schedule=gpipe)" "$one"
row "pp2 interleaved ×2" "$(measure "$deep" 2 --set parallel.pp=2 --set parallel.schedule=interleaved)" "$one"
