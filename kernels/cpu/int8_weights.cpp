#include "int8_weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "avx2.h"
#include "thread_pool.h"

namespace bitnet {
namespace {

constexpr int kMaxTile = 4;

// int32 lanes add pairs of |w * q| <= 127 * 32767; this many values per lane sum stay below 2^31,
// after which the partial dot moves to int64.
constexpr int64_t kChunkValues = 4096;
static_assert(kChunkValues / 16 * 2 * 127 * 32767LL < (1LL << 31), "int32 accumulators could overflow");

// Rounds like torch: 32767 / amax is evaluated as reciprocal(amax) * 32767, and half to even.
float quantize_int16(const float* x, int64_t k, int16_t* q) {
  float amax = 0.0f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = (1.0f / std::max(amax, 1e-5f)) * 32767.0f;
  for (int64_t i = 0; i < k; ++i) q[i] = static_cast<int16_t>(std::clamp(std::nearbyint(x[i] * s), -32767.0f, 32767.0f));
  return s;
}

// Where a tile's weights lie: value c of its row j at w + j * row + (c / 16) * block + c % 16.
// Row-major: row = k, block = 16; grouped (int8_group_rows): row = 16, block = 16 * kInt8Group.
struct Layout {
  int64_t row, block;
  bool grouped;
};

const int8_t* at(const int8_t* w, const Layout& l, int j, int64_t c) {
  return w + j * l.row + (c / kInt8Block) * l.block + c % kInt8Block;
}

// dots[i * kMaxTile + j] = dot(q row i, w row j) for a rows x cols tile.
using TileFn = void (*)(int rows, int cols, const int16_t* q, int64_t k, const int8_t* w, const Layout& l,
                        int64_t* dots);

void tile_scalar(int rows, int cols, const int16_t* q, int64_t k, const int8_t* w, const Layout& l, int64_t* dots) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) {
      int64_t acc = 0;
      for (int64_t c = 0; c < k; ++c) acc += static_cast<int64_t>(q[i * k + c]) * *at(w, l, j, c);
      dots[i * kMaxTile + j] = acc;
    }
  }
}

// Software prefetch distance in a grouped stream, as the ternary GEMV's (ternary_kernels.cpp).
constexpr int64_t kPrefetchBytes = 4096;

template <int Rows, int Cols>
BITNET_AVX2 void tile_avx2(const int16_t* q, int64_t k, const int8_t* w, const Layout& l, int64_t* dots) {
  for (int i = 0; i < Rows; ++i) std::fill(dots + i * kMaxTile, dots + i * kMaxTile + Cols, 0);
  const int64_t whole = k / kInt8Block * kInt8Block;
  for (int64_t c0 = 0; c0 < whole; c0 += kChunkValues) {
    __m256i acc[Rows][Cols];
    for (int i = 0; i < Rows; ++i) {
      for (int j = 0; j < Cols; ++j) acc[i][j] = _mm256_setzero_si256();
    }
    const int64_t c1 = std::min(whole, c0 + kChunkValues);
    for (int64_t c = c0; c < c1; c += kInt8Block) {
      __m256i wv[Cols];
      // Grouped, the tile's rows are one stream: one prefetch per 64-byte line, 4 KB ahead. Row-major,
      // the same place in the next tile's rows: the hardware prefetcher alone leaves a GEMV stalling
      // on DRAM (one core: 8.6 GB/s without, 10.3 with, 4 KB ahead 9.3).
      if (l.grouped) {
        _mm_prefetch(reinterpret_cast<const char*>(at(w, l, 0, c) + kPrefetchBytes), _MM_HINT_T1);
      }
      for (int j = 0; j < Cols; ++j) {
        const int8_t* wj = at(w, l, j, c);
        if (!l.grouped && c % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(wj + Cols * k), _MM_HINT_T1);
        wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wj)));
      }
      for (int i = 0; i < Rows; ++i) {
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * k + c));
        for (int j = 0; j < Cols; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(qv, wv[j]));
      }
    }
    for (int i = 0; i < Rows; ++i) {
      for (int j = 0; j < Cols; ++j) dots[i * kMaxTile + j] += hsum_epi32(acc[i][j]);
    }
  }
  for (int i = 0; i < Rows; ++i) {
    for (int j = 0; j < Cols; ++j) {
      for (int64_t c = whole; c < k; ++c) dots[i * kMaxTile + j] += static_cast<int64_t>(q[i * k + c]) * *at(w, l, j, c);
    }
  }
}

using TileImpl = void (*)(const int16_t*, int64_t, const int8_t*, const Layout&, int64_t*);

constexpr TileImpl kAvx2Tiles[kMaxTile][kMaxTile] = {
    {tile_avx2<1, 1>, tile_avx2<1, 2>, tile_avx2<1, 3>, tile_avx2<1, 4>},
    {tile_avx2<2, 1>, tile_avx2<2, 2>, tile_avx2<2, 3>, tile_avx2<2, 4>},
    {tile_avx2<3, 1>, tile_avx2<3, 2>, tile_avx2<3, 3>, tile_avx2<3, 4>},
    {tile_avx2<4, 1>, tile_avx2<4, 2>, tile_avx2<4, 3>, tile_avx2<4, 4>},
};

void tile_avx2_any(int rows, int cols, const int16_t* q, int64_t k, const int8_t* w, const Layout& l, int64_t* dots) {
  kAvx2Tiles[rows - 1][cols - 1](q, k, w, l, dots);
}

}  // namespace

void int8_weight_gemm(Isa isa, const float* x, int64_t m, int64_t k, const int8_t* w, int64_t n,
                      const float* scales, float* out, int threads, bool grouped) {
  std::vector<int16_t> q(m * k);
  std::vector<float> s(m);
  for (int64_t i = 0; i < m; ++i) s[i] = quantize_int16(x + i * k, k, q.data() + i * k);

  const TileFn tile = has_avx2(isa) ? tile_avx2_any : tile_scalar;
  const Layout layout = grouped ? Layout{kInt8Block, kInt8Block * kInt8Group, true} : Layout{k, kInt8Block, false};
  const int64_t ldw = grouped ? int8_group_padded(k) : k;  // bytes per row, padding included
  // A GEMV shares its one activation row across 4 weight rows; a GEMM reuses each widened
  // weight vector across 4 activation rows. Grouped, a tile stays inside one group of rows.
  const int tile_rows = m == 1 ? 1 : 4, tile_cols = m == 1 ? 4 : 2;
  static_assert(kInt8Group % 4 == 0, "every tile width (2, 4) must divide the row group");
  const int64_t panel = panel_rows(n, ldw, grouped ? kInt8Group : tile_cols, threads,
                                   m == 1 ? kGemvTaskBytes : kGemmPanelBytes);
  const auto row = [&](int64_t r) {
    return grouped ? w + (r / kInt8Group) * kInt8Group * ldw + (r % kInt8Group) * kInt8Block : w + r * k;
  };
  parallel_for(ceil_div(n, panel), threads, [&](int64_t t) {
    const int64_t n_end = std::min(n, (t + 1) * panel);
    for (int64_t m0 = 0; m0 < m; m0 += tile_rows) {
      const int rows = static_cast<int>(std::min<int64_t>(tile_rows, m - m0));
      for (int64_t n0 = t * panel; n0 < n_end; n0 += tile_cols) {
        const int cols = static_cast<int>(std::min<int64_t>(tile_cols, n_end - n0));
        int64_t dots[kMaxTile * kMaxTile];
        tile(rows, cols, q.data() + m0 * k, k, row(n0), layout, dots);
        for (int i = 0; i < rows; ++i) {
          for (int j = 0; j < cols; ++j) {
            out[(m0 + i) * n + n0 + j] = static_cast<float>(dots[i * kMaxTile + j]) / s[m0 + i] * scales[n0 + j];
          }
        }
      }
    }
  });
}

void int8_group_rows(const int8_t* w, int64_t n, int64_t k, int8_t* out) {
  const int64_t padded = int8_group_padded(k);
  std::memset(out, 0, int8_grouped_bytes(n, k));
  for (int64_t r = 0; r < n; ++r) {
    int8_t* group = out + (r / kInt8Group) * kInt8Group * padded + (r % kInt8Group) * kInt8Block;
    for (int64_t c = 0; c < k; ++c) group[(c / kInt8Block) * kInt8Block * kInt8Group + c % kInt8Block] = w[r * k + c];
  }
}

}  // namespace bitnet
