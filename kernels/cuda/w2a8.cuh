// W2A8 kernels for BitNet b1.58: ternary weights (2-bit packed) x int8 activations.
//
// Plain CUDA C++ with a C ABI, so Python (ctypes), C++ and other runtimes can call it without
// torch headers. Every launcher takes raw device pointers and a stream, checks its arguments,
// launches asynchronously and returns the cudaError_t of the launch (never exits, never syncs).
//
// Layouts (docs/formats.md):
//   x        float32 or bfloat16, (M, K) row-major, contiguous
//   q        int8,   (M, Kpad) row-major, Kpad = ceil(K/128)*128, zero past K
//   qweight  uint8,  (N, Kpad/4): per 128-value block, byte j holds codes u = t+1 of
//            k = 128b + j + 32*i in bits 2i..2i+1 (i = 0..3)
//   w_scale  float32 [1] on the device: the quantizer's s_w = 1/mean|W|
//   y        float32 (M, N) = (dot(u, q) - sum(q)) / (s_w * s_a)
//   dot      int32   (M, N) = dot(t, q), the exact integer result (optional, for tests)
// All device pointers must be 16-byte aligned (torch allocations are 512-byte aligned).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { W2A8_DTYPE_FLOAT32 = 0, W2A8_DTYPE_BFLOAT16 = 1 };

// Per-token absmax int8 quantization, bit-identical to bitnet_train.quant.quantize_int8:
// s = (1 / max(max|x|, 1e-5)) * 127 (torch evaluates `127.0 / t` as t.reciprocal() * 127),
// q = clamp(rint(x * s), -128, 127) with rint = round half to even. Writes q (M, Kpad),
// scale (M) and row_sum (M) = sum(q), the correction the W2A8 products subtract.
cudaError_t w2a8_quantize_activations(const void* x, int x_dtype, int64_t M, int64_t K,
                                      int64_t Kpad, int8_t* q, float* scale, int32_t* row_sum,
                                      cudaStream_t stream);

// y = q @ t^T scaled, for one or a few tokens: one warp per 4 output rows, dp4a on 2-bit codes
// unpacked in registers. Memory-bound; meant for decode (M = 1). y or dot may be NULL (not both);
// a_scale and w_scale may be NULL when y is NULL.
cudaError_t w2a8_gemv(const int8_t* q, const int32_t* row_sum, const float* a_scale,
                      const uint8_t* qweight, const float* w_scale, int64_t M, int64_t N,
                      int64_t Kpad, float* y, int32_t* dot, cudaStream_t stream);

// The same product for many tokens (prefill): 64x128 tiles, a 3-stage cp.async pipeline, int8
// tensor-core mma.sync m16n8k32 (sm_80+) fed directly from the packed words. Same arguments.
cudaError_t w2a8_gemm(const int8_t* q, const int32_t* row_sum, const float* a_scale,
                      const uint8_t* qweight, const float* w_scale, int64_t M, int64_t N,
                      int64_t Kpad, float* y, int32_t* dot, cudaStream_t stream);

// Decode BitLinear in one launch: quantize_activations + w2a8_gemv fused, y (M, N) float32 from
// x (M, K) float32 or bf16. Every block quantizes its token row into shared memory itself (same
// s and sum(q), bit for bit), so y equals the two-launch path exactly. Kpad <= 32768, M <= 65535;
// meant for M = 1 (each token row re-reads the weights).
cudaError_t w2a8_bitlinear_gemv(const void* x, int x_dtype, int64_t M, int64_t K, int64_t Kpad,
                                const uint8_t* qweight, const float* w_scale, int64_t N, float* y,
                                cudaStream_t stream);

// cudaGetErrorString of this library's runtime (ctypes callers have no other handle on it).
const char* w2a8_error_string(int error);

// Bumped whenever a launcher's signature changes, so a stale cached build is detected.
int w2a8_abi_version(void);

#ifdef __cplusplus
}
#endif
