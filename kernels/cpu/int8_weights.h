// int8-weight products for the LM head stored as per-row absmax int8.
//
// At decode the head is the one large matrix that is not ternary (2B4T: 128256 x 2560), and it is
// read once per token; int8 storage reads a quarter of float32's bytes. The activations are
// rounded to int16 per token (relative error under 2e-5, far below the weights' int8 rounding),
// which turns the product into integer multiply-adds: three instructions per 16 weights instead
// of the four per 8 a float32 product takes, so the GEMV keeps up with memory.
#pragma once

#include <cstdint>

#include "ternary_kernels.h"

namespace bitnet {

// The grouped layout (int8_group_rows): rows interleaved kInt8Group at a time in blocks of
// kInt8Block values, so that a GEMV tile of 4 rows reads one sequential stream of 64-byte lines, as
// the ternary layers' group_rows does (row-major, a tile reads 4 streams 2560 bytes apart).
constexpr int64_t kInt8Group = 4;
constexpr int64_t kInt8Block = 16;

inline int64_t int8_group_padded(int64_t k) { return (k + kInt8Block - 1) / kInt8Block * kInt8Block; }

// Bytes of n rows of k values grouped: rows padded to a multiple of kInt8Group, values to kInt8Block.
inline int64_t int8_grouped_bytes(int64_t n, int64_t k) {
  return (n + kInt8Group - 1) / kInt8Group * kInt8Group * int8_group_padded(k);
}

// w (n, k) row-major -> grouped: value c of row r at ((r / 4) * K16 / 16 + c / 16) * 64 + (r % 4) * 16 + c % 16,
// K16 = int8_group_padded(k); the padding is zero.
void int8_group_rows(const int8_t* w, int64_t n, int64_t k, int8_t* out);

// out (m, n) = x (m, k) @ (w (n, k) * scales[:, None])^T, computed as
// float(dot(w_j, q_i)) / s_i * scales[j] with q_i = round(x_i * s_i), s_i = 32767 / max|x_i|.
// w row-major, or grouped by int8_group_rows.
void int8_weight_gemm(Isa isa, const float* x, int64_t m, int64_t k, const int8_t* w, int64_t n,
                      const float* scales, float* out, int threads, bool grouped = false);

}  // namespace bitnet
