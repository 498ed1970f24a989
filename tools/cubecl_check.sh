#!/usr/bin/env bash
# The GPU code path on a machine without a GPU: burn's wgpu backend runs the cubecl
# kernels the CUDA backend shares with it on any Vulkan driver, Mesa's software llvmpipe
# included (Debian: `apt-get install mesa-vulkan-drivers`). tests/it/cubecl.rs trains the
# fixture models on it, plain and under kernel fusion (`job.fusion`), against the CPU
# backend, single-process and over data-parallel, ZeRO-1 and pipeline layouts, and checks
# the fusion client's side of handing a fused tensor to a device collective.
#
# Not run by .ci/run, which only compiles it (`cargo check --features wgpu`): it builds
# burn a second time with the wgpu backend (11 minutes on 2 cores from clean) and needs a
# Vulkan driver. What it cannot check is CUDA's own: NVRTC, bf16
# kernels, NCCL, device memory statistics (tools/bench/gpu.sh, on a GPU).
#
#   tools/cubecl_check.sh            exit status 0 when every check passes
set -euo pipefail
cd "$(dirname "$0")/.."
if ! compgen -G "/usr/share/vulkan/icd.d/*.json" >/dev/null \
    && ! compgen -G "/etc/vulkan/icd.d/*.json" >/dev/null; then
  echo "no Vulkan driver found (Debian: apt-get install mesa-vulkan-drivers)" >&2
  exit 2
fi
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
exec cargo test --features wgpu --test it cubecl:: "$@"
