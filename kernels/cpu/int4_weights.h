// 4-bit grouped weights for the LM head.
//
// At decode the head is read once per token, and in 2B4T it is the largest single matrix
// (128256 x 2560): int8 storage is 0.33 GB, 40% of a token's bytes. Four bits with one float32
// scale per 128 values (4.25 bits per weight) halves that. Each group of 128 values keeps its
// own scale (llama.cpp's Q4_0 choice: the value of largest magnitude maps to -8), so one large
// weight costs precision only in its own group, not in its row.
//
// Layout (bitnet_train.kernels.cpu.pack_int4 writes it): codes u = q + 8 in 0..15, input dim
// zero-padded to a multiple of 128, rows padded to a multiple of kStreamGroup (4) with zero
// weights. A group's 128 codes fill 64 bytes: byte j holds value j in its low nibble and value
// 64 + j in its high nibble, so one 32-byte load unpacks (a mask, a shift and a mask) into two
// vectors that line up with two contiguous 32-value chunks of the activations. Rows are
// interleaved 4 at a time, group by group, as group_rows does for the ternary weights, so a tile
// of 4 rows reads one sequential stream: w is (ceil(n/4), groups, 4, 64) bytes and scales
// (ceil(n/4), groups, 4) floats.
//
// Activations are int8 per token (quantize_rows), so the product is u8 x s8 multiply-adds: the
// rounding they add (~1e-3 of the logits) is small beside the weights' 4-bit rounding.
#pragma once

#include <cstdint>

#include "ternary_kernels.h"

namespace bitnet {

constexpr int64_t kInt4Group = 128;       // values per scale (one packed ternary block's worth)
constexpr int64_t kInt4GroupBytes = 64;   // bytes per group and row

// out (m, n) = sum over groups g of scales[j, g] * dot(q_j,g, a_i,g) / s_a[i], with a, s_a the int8
// activations of x (m, k) and q = u - 8 the codes of weight row j.
void int4_weight_gemm(Isa isa, const float* x, int64_t m, int64_t k, const uint8_t* w, const float* scales,
                      int64_t n, float* out, int threads);

}  // namespace bitnet
