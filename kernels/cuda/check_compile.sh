#!/usr/bin/env bash
# Compile check for CI: builds the W2A8 library into a temporary directory with ptxas resource
# usage (registers, shared memory, spills) printed; exits non-zero on any compile error and on
# register spills. No GPU needed; about 5 s on 2 cores.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
command -v "${NVCC:-nvcc}" >/dev/null || { echo "check_compile: nvcc not found (set NVCC or PATH)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
NVCC_EXTRA="-Xptxas -v ${NVCC_EXTRA:-}" "$here/build.sh" "$tmp/libbitnet_w2a8.so" 2>&1 | tee "$tmp/log" || status=$?
[ "$status" -eq 0 ] || { echo "check_compile: nvcc failed (exit $status)" >&2; exit "$status"; }
# A kernel that spills to local memory compiles fine but is a performance bug: fail on it.
if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$tmp/log" >/dev/null; then
    echo "check_compile: register spills reported above" >&2; exit 1
fi
echo "check_compile: OK ($(du -h "$tmp/libbitnet_w2a8.so" | cut -f1) library)"
