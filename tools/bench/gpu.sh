#!/usr/bin/env bash
# The one prepared script for a GPU machine (one H100 or H200, no network; PyTorch,
# transformers and peft installed there). It runs tools/bench/gpu_bench.py, which writes
# OUT/summary.json as it goes: probe and calibration, CUDA-vs-CPU loss parity on the
# quick-start job, the data plane at world 1 (`launch comm-check`: the communicator
# contract through NCCL and a 256 MiB all-reduce through NCCL vs through host memory; a
# `launch train` with launch.data_plane = "nccl"), then tidemill vs transformers(+peft)
# tokens/s, MFU and peak memory for LoRA and full SFT of Qwen2-0.5B- and Llama-1B-shaped
# models at sequence 2048, the hardware calibration, and last burn's kernel fusion
# (`job.fusion`) against the same runs without it.
#
# The `launch` binary is built elsewhere (no toolkit or network needed; 11 min 15 s on 2
# cores from clean; 62 MB stripped, near the 64 MiB a device run carries) and carried:
#   CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda --bin launch
#   mkdir -p bin && cp target/release/launch bin/launch && strip bin/launch
#
#   tools/bench/gpu.sh [OUT]                       on the GPU machine (7 minutes at most: LIMIT)
#   DEVICE=cpu SMALL=1 PYTHON=/tmp/refenv/bin/python tools/bench/gpu.sh /tmp/gpu-dry
#                                                  a dry run here, on tiny shapes
# Environment: LAUNCH (the binary; default bin/launch, else target/release/launch),
# PYTHON (with torch; default python3), LIMIT (seconds for everything, default 420),
# BUDGET (seconds after which no new benchmark starts, default 330).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=$(realpath -m "${1:-gpu-out}")
mkdir -p "$out"
device=${DEVICE:-cuda}
py=${PYTHON:-python3}
launch=${LAUNCH:-}
if [ -z "$launch" ]; then
  for c in bin/launch target/release/launch; do
    if [ -x "$c" ]; then launch=$PWD/$c; break; fi
  done
fi
[ -n "$launch" ] || { echo "no launch binary (bin/launch or LAUNCH=...)" >&2; exit 2; }
if [ "$device" = cuda ]; then
  # The kernels include the CUDA headers at run time (NVRTC): the toolkit's, else those of
  # the pip wheels PyTorch brings (nvidia-cuda-runtime / nvidia-cuda-nvrtc).
  if [ -z "${CUDA_PATH:-}" ] && [ -e /usr/local/cuda/include/cuda_runtime.h ]; then
    export CUDA_PATH=/usr/local/cuda
  fi
  pip_dir() { "$py" -c "import importlib, os; m = importlib.import_module('$1'); print(list(m.__path__)[0])" 2>/dev/null; }
  if [ -z "${CUDA_PATH:-}" ]; then
    for m in nvidia.cuda_runtime nvidia.cu13 nvidia.cu12; do
      d=$(pip_dir $m)
      if [ -n "$d" ] && [ -e "$d/include/cuda_runtime.h" ]; then export CUDA_PATH=$d; break; fi
    done
  fi
  export LD_LIBRARY_PATH="${CUDA_PATH:-/usr/local/cuda}/lib64:${CUDA_PATH:-/usr/local/cuda}/lib:${LD_LIBRARY_PATH:-}"
  for m in nvidia.cuda_nvrtc nvidia.cu13 nvidia.cu12; do
    d=$(pip_dir $m)
    if [ -n "$d" ] && [ -d "$d/lib" ]; then export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d/lib"; fi
  done
  # cudarc looks for libnccl.so; the pip wheel ships libnccl.so.2 in its package folder.
  nccl=$("$py" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
  if [ -n "$nccl" ] && [ -e "$nccl/libnccl.so.2" ]; then
    mkdir -p "$out/lib" && ln -sf "$nccl/libnccl.so.2" "$out/lib/libnccl.so"
    export LD_LIBRARY_PATH="$out/lib:$LD_LIBRARY_PATH"
  fi
  # Compiled kernels and autotune results, kept between the runs of this script.
  export TIDEMILL_KERNEL_CACHE=$out/kernel-cache
fi
small=()
[ -n "${SMALL:-}" ] && small=(--small)
timeout --signal=TERM --kill-after=10 "${LIMIT:-420}" \
  python3 tools/bench/gpu_bench.py --out "$out" --device "$device" --launch "$launch" \
  --python "$py" --budget "${BUDGET:-330}" "${small[@]}"
rc=$?
echo "exit $rc; summary: $out/summary.json"
exit $rc
