#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds with the `cuda` feature and checks the GPU decoder end to end.
#   1. tests/gpu.rs and tests/gpu_twin.rs with NEUZIP_REQUIRE_GPU=1: every fixture, the golden files and the
#      forced-float-codec files (all BF16/F16 patterns, F32 layouts) and the lossy files (all BF16/F16 patterns,
#      MiniLM slices, forced rANS/raw splits) decoded on the GPU, bit for bit against the CPU decoder; with
#      NEUZIP_MINILM_DIR set, the real MiniLM checkpoints too, lossless and lossy;
#   2. neuzip bench --gpu on a 1 GiB BF16 tensor (scripts/make_big_bf16.py): decode GB/s beside a D2D copy.
# NVRTC: set NVRTC_LIB_DIR to a directory holding libnvrtc.so.12 or libnvrtc.so (a CUDA 13 toolkit has
# libnvrtc.so in its lib64), or have the pip wheel nvidia-cuda-nvrtc-cu12 installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NVRTC_LIB_DIR:-}" ]; then
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        if [ -e "$d/libnvrtc.so" ] || [ -e "$d/libnvrtc.so.12" ]; then NVRTC_LIB_DIR=$d; break; fi
    done
fi
if [ -z "${NVRTC_LIB_DIR:-}" ]; then
    NVRTC_LIB_DIR=$(python3 -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib"))' 2>/dev/null || true)
fi
export LD_LIBRARY_PATH="${NVRTC_LIB_DIR:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu_check: NVRTC from ${NVRTC_LIB_DIR:-the default library path}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

cargo build --release --features cuda
export NEUZIP_REQUIRE_NVRTC=1 NEUZIP_REQUIRE_GPU=1
ignored=()
if [ -n "${NEUZIP_MINILM_DIR:-}" ]; then ignored=(-- --include-ignored); fi
cargo test --release --features cuda --test gpu --test gpu_twin "${ignored[@]}"

big="${TMPDIR:-/tmp}/neuzip_big_bf16.safetensors"
[ -e "$big" ] || python3 scripts/make_big_bf16.py "$big"
./target/release/neuzip bench --gpu --runs 5 "$big"
./target/release/neuzip bench --gpu --runs 5 --json "$big"
