#!/usr/bin/env bash
# Tidal hand-back latencies, lost work per preemption (see tools/bench/tidal.py).
#   tools/bench/tidal.sh [PAIRS]        LAUNCH=path/to/launch (default target/release/launch)
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python3 tools/bench/tidal.py "$@"
