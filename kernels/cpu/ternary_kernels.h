// Ternary-weight x int8-activation CPU kernels (BitNet b1.58 inference).
//
// Weights are in the bitnet-train packed layout (docs/formats.md): 2-bit codes u = t + 1,
// 128 values per 32-byte block, byte j of a block holding values j, j+32, j+64, j+96 from the
// low bits up. Activations are int8 rows padded with zeros to the same multiple of 128.
// The integer result is dot(t, a) = dot(u, a) - sum(a): u is unsigned and a signed, which is
// exactly the operand split of the u8 x s8 multiply-add instructions.
#pragma once

#include <cstdint>

namespace bitnet {

constexpr int64_t kBlockValues = 128;  // values per packed block
constexpr int64_t kBlockBytes = 32;    // bytes per packed block

inline int64_t padded_features(int64_t k) { return (k + kBlockValues - 1) / kBlockValues * kBlockValues; }

// kAvx512 is kAvx2 everywhere except the ternary GEMV (one activation row), which it runs on
// AVX-512 VNNI (ternary_kernels.cpp says why).
enum class Isa { kScalar, kAvx2, kAvx512 };

inline bool has_avx2(Isa isa) { return isa != Isa::kScalar; }

bool cpu_has_avx2();
bool cpu_has_avx512_vnni();

// Per-token absmax int8 quantization, bit-identical to bitnet_train.quant.quantize_int8.
// x: (rows, k) float32; q: (rows, k_padded) int8 with the padding zeroed; scales: (rows,),
// the multipliers s = 127 / max|x| (so x ~ q / s).
void quantize_rows(Isa isa, const float* x, int64_t rows, int64_t k, int64_t k_padded,
                   int8_t* q, float* scales, int threads);

// Weight rows regrouped so that a GEMV tile reads one sequential stream. Row-major, a tile of 4
// rows reads 4 streams 640 bytes apart (2B4T, K = 2560), which the prefetchers follow poorly: one
// core streamed 8.5-9.4 GB/s that way and 12.6-13.3 GB/s regrouped (memory read: ~15 GB/s).
constexpr int64_t kStreamGroup = 4;

// Bytes of `n` rows regrouped by `group`: the last group is padded with zero bytes.
inline int64_t grouped_bytes(int64_t n, int64_t k_padded, int64_t group) {
  return (n + group - 1) / group * group * (k_padded / 4);
}

// w (n, k_padded / 4) row-major -> grouped: block b of row r goes to 32-byte slot
// ((r / group) * blocks + b) * group + r % group, so a group's rows advance through K together.
void group_rows(const uint8_t* w, int64_t n, int64_t k_padded, int64_t group, uint8_t* out);

// a: (m, k_padded) int8 activations; w: n packed ternary weight rows, row-major (row_group 1:
// (n, k_padded / 4), the docs/formats.md layout) or grouped by group_rows (row_group 4).
struct TernaryGemm {
  const int8_t* a;
  const uint8_t* w;
  int64_t m, n, k_padded;
  int64_t row_group = 1;
};

// out (m, n) int32 = a @ t^T, exact.
void gemm_int(Isa isa, const TernaryGemm& g, int32_t* out, int threads);

// out (m, n) float32 = (a @ t^T) / (w_scales[col] * a_scales[row]): the BitLinear output. The
// weight scale is per output row of w, so projections fused into one w keep their own s_w.
void gemm_rescaled(Isa isa, const TernaryGemm& g, const float* a_scales, const float* w_scales,
                   float* out, int threads);

}  // namespace bitnet
