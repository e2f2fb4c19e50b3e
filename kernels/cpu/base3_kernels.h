// Ternary GEMV on the base-3 (1.6-bit) layout of the `own-1.6` export: 5 codes per byte, 20% fewer
// bytes than the 2-bit layout (2B4T's layers: 0.42 instead of 0.52 GB per token).
//
// The file stores byte b = sum_i u[5k + i] 3^i (u = t + 1, docs/formats.md). Dividing by 3 has no
// SIMD instruction, so the kernel reads each byte pre-scaled, q = ceil(b * 256 / 243) (llama.cpp
// TQ1_0's trick): q / 256 is b / 243 rounded up, so the digits come out most significant first as
// floor(3 q / 256), then q = 3 q mod 256, and so on; tests check all 243 bytes. On AVX2 a digit costs
// 8 byte operations (subtract, shift, mask, average, shift, mask, and two adds for q = 3 q), so the
// kernel does 2.4x the ALU work per weight of the 2-bit one (16 operations per 128 weights): it is
// here to be measured against it (bitnet-train bench kernels), not yet run by the decoder.
//
// Kernel layout (base3_kernel_layout): rows padded to a multiple of 160 values (32 bytes) with
// t = 0, bytes pre-scaled, rows interleaved 4 at a time in 32-byte chunks as group_rows does for
// the 2-bit layout. The 5 digit vectors of a 32-byte chunk hold, in lane i, values 5 i + 4 - j
// (j = 0..4): the activations are permuted once per token to meet them (base3_permute_activations).
#pragma once

#include <cstdint>

#include "ternary_kernels.h"

namespace bitnet {

constexpr int64_t kBase3ChunkValues = 160;  // values per 32-byte chunk of one row
constexpr int64_t kBase3ChunkBytes = 32;

inline int64_t base3_padded_features(int64_t k) {
  return (k + kBase3ChunkValues - 1) / kBase3ChunkValues * kBase3ChunkValues;
}

// Bytes of the kernel layout of n rows of k values.
inline int64_t base3_kernel_bytes(int64_t n, int64_t k) {
  return (n + kStreamGroup - 1) / kStreamGroup * kStreamGroup * (base3_padded_features(k) / 5);
}

// file: (n, ceil(k / 5)) bytes of the own-1.6 layout (every byte <= 242, checked by the caller).
void base3_kernel_layout(const uint8_t* file, int64_t n, int64_t k, uint8_t* out);

// out (m, n) int32 = a @ t^T, exact, for int8 activations a (m, base3_padded_features(k)) in their
// natural order and w in the kernel layout.
void base3_gemm_int(Isa isa, const int8_t* a, int64_t m, const uint8_t* w, int64_t n, int64_t k_padded,
                    int32_t* out, int threads);

}  // namespace bitnet
