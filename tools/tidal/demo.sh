#!/usr/bin/env bash
# A tidal job in about a minute on CPU: the quick-start job (70 steps) trained only inside
# windows of 15 s, 5 s apart (UTC; three are needed), handing the "GPUs" back 1 s before each window ends;
# then its ledger (`launch status`) and picture (runs/tidal-demo/status.svg).
#   tools/tidal/demo.sh            (LAUNCH=path/to/launch to use another binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
launch=${LAUNCH:-target/release/launch}
[ -x "$launch" ] || cargo build --release --bin launch
at() { date -u -d "+$1 seconds" +%H:%M:%S; }
windows="[\"$(at 3)-$(at 18)\", \"$(at 23)-$(at 38)\", \"$(at 43)-$(at 58)\", \"$(at 63)-$(at 78)\"]"
rm -rf runs/tidal-demo
"$launch" train configs/quickstart.toml \
    --set job.run_dir=runs/tidal-demo \
    --set training.max_steps="${STEPS:-70}" \
    --set training.eval_every=0 \
    --set checkpoint.every=5 \
    --set "tidal.windows=$windows" \
    --set tidal.timezone=UTC \
    --set tidal.handback_margin_s=1 \
    --set tidal.safety_factor=1
"$launch" status runs/tidal-demo
