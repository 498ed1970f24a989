#!/usr/bin/env bash
# The NCCL data plane across GPUs, for a machine with two or more (ours have one GPU, and
# NCCL refuses two ranks on one GPU: this script has not run on our machines).
#
#   tools/bench/nccl_check.sh [GPUS]          (default: 2; 4 adds the four-rank layouts)
#
# 1. `launch run --nproc-per-node GPUS -- launch comm-check --device cuda --bench-mb 256`:
#    the communicator contract (every collective, uneven sizes, split groups) through NCCL
#    on every rank, and a 256 MiB all-reduce through NCCL against host memory.
# 2. Small jobs (the test fixtures: Llama with tied embeddings, Mixtral with 4 experts),
#    full SFT, 6 steps, f32, on one GPU and then in each layout over NCCL: dp2, dp2 with
#    ZeRO-1, tp2, tp2 with sequence parallelism, pp2 (1F1B), ep2 (and with 4 GPUs dp2×tp2,
#    tp2×pp2, ep2×tp2). Every step's loss and gradient norm must match one process within
#    TOL (default 1e-3, relative): GPU reductions are not bitwise reproducible across
#    layouts, CPU ones are (the test suite checks those to 1e-5).
#
# Exit status: 0 every check passed, 1 one failed (the failing ones are printed), 2 setup.
# Environment: LAUNCH (the `launch` binary built with --features cuda; default bin/launch,
# else target/release/launch), TOL, OUT (work folder; default a temporary one), DEVICE
# (`cpu` runs the same checks over TCP on this machine: how the script itself is tested).
set -uo pipefail
cd "$(dirname "$0")/../.."
gpus=${1:-2}
tol=${TOL:-1e-3}
launch=${LAUNCH:-}
if [ -z "$launch" ]; then
  for c in bin/launch target/release/launch; do
    if [ -x "$c" ]; then launch=$PWD/$c; break; fi
  done
fi
[ -n "$launch" ] || { echo "no launch binary (bin/launch or LAUNCH=...)" >&2; exit 2; }
device=${DEVICE:-cuda}
plane=tcp
if [ "$device" = cuda ]; then
  plane=nccl
  "$launch" probe > /dev/null || { echo "launch probe: the GPU path cannot run here" >&2; exit 2; }
  have=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [ "$have" -lt "$gpus" ]; then
    echo "$gpus GPUs asked for, nvidia-smi lists $have" >&2
    exit 2
  fi
fi
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
failed=()

echo "== communicator contract through $plane on $gpus ranks ($device)"
if "$launch" run --nproc-per-node "$gpus" --run-dir "$out/comm" -- \
     "$launch" comm-check --device "$device" --bench-mb 256 > "$out/comm.jsonl"; then
  cat "$out/comm.jsonl"
  python3 - "$out/comm.jsonl" "$gpus" "$plane" <<'PY' || failed+=("comm-check")
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
assert len(lines) == int(sys.argv[2]), f"{len(lines)} ranks answered"
assert all(l["data_plane"] == sys.argv[3] for l in lines), f"not on {sys.argv[3]}"
PY
else
  failed+=("comm-check")
fi

fixtures=tests/fixtures
job() { # job MODEL NAME -> path of a job file
  local model=$1 name=$2
  cat > "$out/$name.toml" <<TOML
[job]
name = "$name"
run_dir = "$out/$name"
device = "$device"
[model]
path = "$fixtures/models/$model"
[data]
train = "$fixtures/data/train_tokens.jsonl"
max_seq_len = 64
packing = false
[training]
max_steps = 6
global_batch = 8
micro_batch = 1
lr = 1e-2
seed = 3
max_grad_norm = 0.8
[launch]
max_restarts = 0
TOML
  echo "$out/$name.toml"
}

# `layout MODEL NAME NPROC [--set k=v]...`: the job in that layout against one process.
layout() {
  local model=$1 name=$2 nproc=$3; shift 3
  local file
  file=$(job "$model" "$model-$nproc-${name// /_}")
  if ! RUST_LOG=warn "$launch" train "$file" --nproc-per-node "$nproc" "$@" > /dev/null; then
    echo "FAIL $model $name: launch train failed"
    failed+=("$model $name")
    return
  fi
  if python3 - "$out/$model-one/events.jsonl" "${file%.toml}/events.jsonl" "$tol" "$model $name" <<'PY'; then
import json, sys
def steps(path):
    return [(e["loss"], e["grad_norm"]) for e in map(json.loads, open(path))
            if e["event"] == "step" and e.get("rank", 0) == 0]
one, got, tol, what = steps(sys.argv[1]), steps(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
assert len(one) == len(got) == 6, f"{what}: {len(got)} steps"
worst = max(abs(a - b) / max(abs(b), 1e-6) for x, y in zip(got, one) for a, b in zip(x, y))
print(f"ok   {what}: largest relative difference {worst:.2e}")
sys.exit(0 if worst <= tol else 1)
PY
    :
  else
    failed+=("$model $name")
  fi
}

for model in llama3 mixtral; do
  echo "== $model: one rank, then each layout over $plane"
  RUST_LOG=warn "$launch" train "$(job $model $model-one)" > /dev/null || { echo "one process failed" >&2; exit 2; }
  layout $model "dp2" 2
  layout $model "dp2 ZeRO-1" 2 --set parallel.zero1=true
  layout $model "tp2" 2 --set parallel.tp=2
  layout $model "tp2 + sequence parallel" 2 --set parallel.tp=2 --set parallel.sequence_parallel=true
  layout $model "pp2 1F1B" 2 --set parallel.pp=2
  [ $model = mixtral ] && layout $model "ep2" 2 --set parallel.ep=2
  if [ "$gpus" -ge 4 ]; then
    layout $model "dp2×tp2" 4 --set parallel.tp=2
    layout $model "tp2×pp2" 4 --set parallel.tp=2 --set parallel.pp=2
    [ $model = mixtral ] && layout $model "ep2×tp2" 4 --set parallel.ep=2 --set parallel.tp=2
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "every check passed ($out)"
