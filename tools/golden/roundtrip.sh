#!/usr/bin/env bash
# Train the round-trip jobs with tidemill, copy their exports into tests/fixtures/roundtrip/,
# then compute peft/transformers golden losses for them. Run from anywhere:
#   tools/golden/roundtrip.sh [/tmp/refenv]
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${1:-/tmp/refenv}/bin/python
cargo build --bin launch
fix=tests/fixtures/roundtrip
for job in lora_llama2 lora_qwen2 lora_mixtral sft_llama2; do
  run=$(mktemp -d)
  target/debug/launch train "$fix/$job.toml" --set "job.run_dir=\"$run\""
  rm -rf "${fix:?}/$job"
  case $job in
    lora_*) cp -r "$run/export/adapter" "$fix/$job" ;;
    sft_*) cp -r "$run/export/model" "$fix/$job" ;;
  esac
  rm -rf "$run"
done
"$py" tools/golden/peft_roundtrip.py
