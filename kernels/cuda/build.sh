#!/usr/bin/env bash
# Build the W2A8 kernels into a shared library: kernels/cuda/build.sh [OUTPUT.so]
# (default: libbitnet_w2a8.so beside this script). bitnet_train/kernels/cuda.py calls this same
# script, so the flags live in one place. Extra nvcc flags: NVCC_EXTRA="-Xptxas -v" build.sh ...
#
# sm_80 cubins also run on sm_86/sm_89 (same major); the compute_90 PTX lets newer GPUs JIT it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here/libbitnet_w2a8.so}
nvcc=${NVCC:-nvcc}
# shellcheck disable=SC2086  # NVCC_EXTRA is a list of flags
"$nvcc" -O3 -std=c++17 \
    -gencode arch=compute_80,code=sm_80 \
    -gencode arch=compute_90,code=sm_90 \
    -gencode arch=compute_90,code=compute_90 \
    -Xcompiler -fPIC -Xcompiler -Wall -shared \
    ${NVCC_EXTRA:-} \
    -o "$out" "$here/w2a8.cu"
