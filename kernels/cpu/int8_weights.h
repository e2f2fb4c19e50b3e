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

// out (m, n) = x (m, k) @ (w (n, k) * scales[:, None])^T, computed as
// float(dot(w_j, q_i)) / s_i * scales[j] with q_i = round(x_i * s_i), s_i = 32767 / max|x_i|.
void int8_weight_gemm(Isa isa, const float* x, int64_t m, int64_t k, const int8_t* w, int64_t n,
                      const float* scales, float* out, int threads);

}  // namespace bitnet
