#!/usr/bin/env bash
# Strategy-search time: `launch plan` (release) for public models at 8, 512 and 4096
# H100s, printing the search's own time (search_s) and the process's wall time, with
# the number of candidates priced and rejected.
#   tools/bench/plan.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bin launch >/dev/null
LAUNCH=target/release/launch
declare -A MODELS=(
  [llama3-8b]="--layers 32 --hidden 4096 --heads 32 --kv-heads 8 --ffn 14336 --vocab 128256"
  [llama3-70b]="--layers 80 --hidden 8192 --heads 64 --kv-heads 8 --ffn 28672 --vocab 128256"
  [llama3-405b]="--layers 126 --hidden 16384 --heads 128 --kv-heads 8 --ffn 53248 --vocab 128256"
  [mixtral-8x22b]="--layers 56 --hidden 6144 --heads 48 --kv-heads 8 --ffn 16384 --vocab 32768 --experts 8 --topk 2"
)
printf "%-14s %6s %10s %10s %9s %9s   %s\n" model gpus search_s wall_s priced rejected best
for model in llama3-8b llama3-70b llama3-405b mixtral-8x22b; do
  for gpus in 8 512 4096; do
    start=$(date +%s.%N)
    # shellcheck disable=SC2086
    out=$($LAUNCH plan ${MODELS[$model]} --seq-len 8192 --global-batch $((gpus * 2)) \
      --nnodes $((gpus / 8)) --gpus-per-node 8 --hardware h100-80g --top 1 --format json)
    end=$(date +%s.%N)
    echo "$out" | python3 -c "
import json, sys
d = json.load(sys.stdin)
c = d['candidates'][0] if d['candidates'] else None
best = 'none fits' if c is None else 'dp%d tp%d pp%d ep%d mb%d v%d%s%s  %.2f s/step  MFU %.1f%%  %.1f GiB' % (
    c['dp'], c['tp'], c['pp'], c['ep'], c['micro_batch'], c['virtual_stages'],
    ' recompute' if c['recompute'] else '', ' zero1' if c['zero1'] else '',
    c['step_time_s'], 100 * c['mfu'], c['mem_gb_per_gpu'])
print('%-14s %6d %10.4f %10.3f %9d %9d   %s' % ('$model', $gpus, d['search_s'], $end - $start, d['considered'], len(d['rejected']), best))
"
  done
done
