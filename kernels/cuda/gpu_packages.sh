#!/usr/bin/env bash
# The Python packages gpu_session.sh needs that the lent GPU machine's image lacks, installed here
# (it reaches no registry) into one folder that travels with the working tree:
#     bash kernels/cuda/gpu_packages.sh [DIR]      # default .gpu_pkgs (git-ignored via .git/info/exclude)
# then on the GPU machine: PYTHONPATH=$PWD:$PWD/.gpu_pkgs bash kernels/cuda/gpu_session.sh
# The image has torch, triton, transformers, accelerate, pyarrow and xxhash (device KINDS.md);
# these are the rest, all pure Python (torchao's CUDA libraries, built for other torch versions,
# are left out: its BitNet training needs only its Triton kernels and torch._int_mm).
# Versions are this repository's pins; the image runs Python 3.12.
set -euo pipefail
dir=${1:-.gpu_pkgs}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
rm -rf "$dir"
pip_target() { python -m pip install --quiet --no-deps --target "$dir" -c "$here/constraints.txt" "$@"; }
pip_target --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --implementation py \
    hydra-core omegaconf datasets dill multiprocess gguf torchao onebitllms
pip_target antlr4-python3-runtime  # an sdist only: built here, pure Python
find "$dir" -name "*.so" -delete
rm -rf "$dir/bin" "$dir/test" "$dir/tests"
grep -qx "/${dir#./}/" "$here/.git/info/exclude" 2>/dev/null || echo "/${dir#./}/" >>"$here/.git/info/exclude"
echo "gpu_packages: $(du -sh "$dir" | cut -f1) in $dir"
