#include "int4_weights.h"

#include <algorithm>
#include <vector>

#include "avx2.h"
#include "thread_pool.h"

namespace bitnet {
namespace {

constexpr int64_t kTileBytes = kStreamGroup * kInt4GroupBytes;  // one group of a 4-row tile
constexpr int kCodeOffset = 8;                                   // u = q + 8

// The same distance ahead as the ternary GEMV (ternary_kernels.cpp), into L2.
constexpr int64_t kPrefetchBytes = 4096;

// One activation row against the 4 weight rows of a tile: out4[r] = sum_g scale[g, r] * dot_g.
using TileFn = void (*)(const int8_t* a, const int32_t* offsets, const uint8_t* w, const float* scales,
                        int64_t groups, float* out4);

void tile_scalar(const int8_t* a, const int32_t*, const uint8_t* w, const float* scales, int64_t groups,
                 float* out4) {
  for (int r = 0; r < kStreamGroup; ++r) {
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* wr = w + g * kTileBytes + r * kInt4GroupBytes;
      const int8_t* ag = a + g * kInt4Group;
      int32_t dot = 0;
      for (int j = 0; j < kInt4GroupBytes; ++j) {
        dot += ((wr[j] & 15) - kCodeOffset) * ag[j] + ((wr[j] >> 4) - kCodeOffset) * ag[kInt4GroupBytes + j];
      }
      acc += static_cast<float>(dot) * scales[g * kStreamGroup + r];
    }
    out4[r] = acc;
  }
}

// The four int16 multiply-adds of one group and row, in the lane order offsets_avx2 repeats.
// Each maddubs lane adds two products u * a with u <= 15, |a| <= 128, so four of them sum to at
// most 4 * 3840 = 15360: no int16 overflow.
BITNET_AVX2 inline __m256i group_dot16(const uint8_t* wr, const __m256i a[4]) {
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i p0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
  const __m256i p1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 32));
  __m256i s = _mm256_maddubs_epi16(_mm256_and_si256(p0, low4), a[0]);  // values 0..31
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(p1, low4), a[1]));  // 32..63
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(p0, 4), low4), a[2]));  // 64..95
  return _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(p1, 4), low4), a[3]));
}

BITNET_AVX2 inline void load_group(const int8_t* ag, __m256i a[4]) {
  for (int c = 0; c < 4; ++c) a[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ag + 32 * c));
}

// dot(u, a) = dot(q, a) + 8 sum(a): per group, the 8 * sum(a) of each int32 lane, shared by every row.
BITNET_AVX2 void offsets_avx2(const int8_t* a, int64_t groups, int32_t* offsets) {
  const __m256i ones = _mm256_set1_epi16(1), eights = _mm256_set1_epi8(kCodeOffset);
  for (int64_t g = 0; g < groups; ++g) {
    __m256i av[4];
    load_group(a + g * kInt4Group, av);
    __m256i s = _mm256_maddubs_epi16(eights, av[0]);
    for (int c = 1; c < 4; ++c) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(eights, av[c]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(offsets + 8 * g), _mm256_madd_epi16(s, ones));
  }
}

BITNET_AVX2 void tile_avx2(const int8_t* a, const int32_t* offsets, const uint8_t* w, const float* scales,
                           int64_t groups, float* out4) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[kStreamGroup];
  for (int r = 0; r < kStreamGroup; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i av[4];
    load_group(a + g * kInt4Group, av);
    const __m256i offset = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(offsets + 8 * g));
    const uint8_t* wg = w + g * kTileBytes;
    for (int r = 0; r < kStreamGroup; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(wg + r * kInt4GroupBytes + kPrefetchBytes), _MM_HINT_T1);
      const __m256i dot = _mm256_sub_epi32(_mm256_madd_epi16(group_dot16(wg + r * kInt4GroupBytes, av), ones), offset);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(scales + g * kStreamGroup + r), acc[r]);
    }
  }
  for (int r = 0; r < kStreamGroup; ++r) out4[r] = hsum_ps(acc[r]);
}

}  // namespace

void int4_weight_gemm(Isa isa, const float* x, int64_t m, int64_t k, const uint8_t* w, const float* scales,
                      int64_t n, float* out, int threads) {
  const int64_t k_padded = padded_features(k), groups = k_padded / kInt4Group;
  std::vector<int8_t> a(m * k_padded);
  std::vector<float> a_scales(m);
  quantize_rows(isa, x, m, k, k_padded, a.data(), a_scales.data(), threads);
  std::vector<int32_t> offsets(has_avx2(isa) ? m * groups * 8 : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(offsets.size()) / (groups * 8); ++i) {
    offsets_avx2(a.data() + i * k_padded, groups, offsets.data() + i * groups * 8);
  }

  const TileFn tile = has_avx2(isa) ? tile_avx2 : tile_scalar;
  const int64_t tiles = ceil_div(n, kStreamGroup);
  // Tiles per task: a panel of weights small enough to stay in L2 while every activation row uses it.
  const int64_t panel = panel_rows(tiles, groups * kTileBytes, 1, threads, m == 1 ? kGemvTaskBytes : kGemmPanelBytes);
  parallel_for(ceil_div(tiles, panel), threads, [&](int64_t task) {
    const int64_t t_end = std::min(tiles, (task + 1) * panel);
    for (int64_t i = 0; i < m; ++i) {
      const int32_t* off = offsets.empty() ? nullptr : offsets.data() + i * groups * 8;
      for (int64_t t = task * panel; t < t_end; ++t) {
        float out4[kStreamGroup];
        tile(a.data() + i * k_padded, off, w + t * groups * kTileBytes, scales + t * groups * kStreamGroup, groups,
             out4);
        for (int r = 0; r < kStreamGroup && t * kStreamGroup + r < n; ++r) {
          out[i * n + t * kStreamGroup + r] = out4[r] / a_scales[i];
        }
      }
    }
  });
}

}  // namespace bitnet
