// Ternary x int8 CPU kernels: a portable scalar path and an AVX2 path picked at run time.
#include "ternary_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "avx2.h"
#include "thread_pool.h"

namespace bitnet {
namespace {

constexpr float kEps = 1e-5f;  // quant.EPS


// ------------------------------------------------------------------ activation quantization

// quant.py writes `127.0 / amax`, but torch evaluates scalar / tensor as
// tensor.reciprocal() * scalar: two roundings, which differ from one division for about a
// quarter of all amax values. Mirror it, or values near k + 0.5 round the other way.
float absmax_multiplier(float amax) { return (1.0f / std::max(amax, kEps)) * 127.0f; }

// nearbyint rounds in the default mode, half to even, exactly like torch.round.
int8_t quantize_value(float x, float s) {
  return static_cast<int8_t>(std::clamp(std::nearbyint(x * s), -128.0f, 127.0f));
}

float quantize_row_scalar(const float* x, int64_t k, int8_t* q) {
  float amax = 0.0f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = absmax_multiplier(amax);
  for (int64_t i = 0; i < k; ++i) q[i] = quantize_value(x[i], s);
  return s;
}

BITNET_AVX2 float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

BITNET_AVX2 __m256i quantize8_avx2(const float* x, __m256 s) {
  const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), s),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 clamped = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-128.0f)), _mm256_set1_ps(127.0f));
  return _mm256_cvtps_epi32(clamped);
}

BITNET_AVX2 float quantize_row_avx2(const float* x, int64_t k, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  float amax = hmax(vmax);
  for (; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));

  const float s = absmax_multiplier(amax);
  const __m256 vs = _mm256_set1_ps(s);
  // The saturating packs work within 128-bit lanes; this dword permutation restores order.
  const __m256i lane_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (i = 0; i + 32 <= k; i += 32) {
    const __m256i lo = _mm256_packs_epi32(quantize8_avx2(x + i, vs), quantize8_avx2(x + i + 8, vs));
    const __m256i hi = _mm256_packs_epi32(quantize8_avx2(x + i + 16, vs), quantize8_avx2(x + i + 24, vs));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), lane_order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), bytes);
  }
  for (; i < k; ++i) q[i] = quantize_value(x[i], s);
  return s;
}

// ------------------------------------------------------------------ integer matmul tiles

constexpr int kMaxTile = 4;  // largest tile side, in activation rows or weight rows

// Activation rows x weight rows computed together: each loaded activation chunk is reused
// across `cols` weight rows and each unpacked weight chunk across `rows` activation rows.
struct TileShape {
  int rows, cols;
};

// Byte steps through the weights from a tile's first row: to the next row, and from one block
// of a row to its next (row-major: ldw and 32; grouped: 32 and 32 * group).
struct Strides {
  int64_t row, block;
};

// dot(u, a) over `blocks` packed blocks for a rows x cols tile;
// dots[i * kMaxTile + j] pairs activation row i with weight row j.
using TileFn = void (*)(int rows, int cols, const int8_t* a, int64_t lda, const uint8_t* w,
                        const Strides& ws, int64_t blocks, int32_t* dots);

struct Kernel {
  TileFn tile;
  TileShape gemv;  // m == 1 (decode): memory-bound, several weight rows share the one activation row
  TileShape gemm;  // m > 1 (prefill): compute-bound, unpacked weights reused across activation rows
};

int32_t dot_u_scalar(const int8_t* a, const uint8_t* w, int64_t block_stride, int64_t blocks) {
  int32_t acc = 0;
  for (int64_t b = 0; b < blocks; ++b, a += kBlockValues, w += block_stride) {
    for (int j = 0; j < kBlockBytes; ++j) {
      for (int s = 0; s < 4; ++s) acc += ((w[j] >> (2 * s)) & 3) * a[s * kBlockBytes + j];
    }
  }
  return acc;
}

void tile_scalar(int rows, int cols, const int8_t* a, int64_t lda, const uint8_t* w, const Strides& ws,
                 int64_t blocks, int32_t* dots) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) dots[i * kMaxTile + j] = dot_u_scalar(a + i * lda, w + j * ws.row, ws.block, blocks);
  }
}

// maddubs adds two u * a products into an int16 lane without saturating (u <= 2, |a| <= 128).
// Those lanes are summed in int16 over kFlushBlocks blocks (4 maddubs per block) before
// widening to int32, which saves a madd per maddubs; the bound below keeps that exact.
constexpr int64_t kFlushBlocks = 16;
static_assert(4 * kFlushBlocks * 2 * 2 * 128 <= 32768 && 4 * kFlushBlocks * 2 * 2 * 127 <= 32767,
              "int16 accumulators could overflow");

// A GEMV streams its weights from DRAM, where the hardware prefetcher alone leaves the loop
// stalling: prefetching each weight row ahead took one core from ~4.5 to ~7 GB/s. Into L2, not
// L1: 5-15% faster in paired runs. 2-16 KB ahead measured alike.
constexpr int64_t kPrefetchBytes = 4096;

template <int Rows, int Cols>
BITNET_AVX2 void tile_avx2(const int8_t* a, int64_t lda, const uint8_t* w, const Strides& ws,
                           int64_t blocks, int32_t* dots) {
  const __m256i low2 = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int i = 0; i < Rows; ++i) std::fill(dots + i * kMaxTile, dots + i * kMaxTile + Cols, 0);

  for (int64_t b0 = 0; b0 < blocks; b0 += kFlushBlocks) {
    __m256i acc[Rows][Cols];  // int16 lanes
    for (int i = 0; i < Rows; ++i) {
      for (int j = 0; j < Cols; ++j) acc[i][j] = _mm256_setzero_si256();
    }
    const int64_t b1 = std::min(blocks, b0 + kFlushBlocks);
    for (int64_t b = b0; b < b1; ++b) {
      for (int j = 0; j < Cols; ++j) {
        const uint8_t* wb = w + j * ws.row + b * ws.block;
        _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchBytes), _MM_HINT_T1);
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb));
        for (int s = 0; s < 4; ++s) {  // bits 2s, 2s+1 of every byte: values 32s .. 32s+31
          const __m256i u = _mm256_and_si256(_mm256_srli_epi16(packed, 2 * s), low2);
          for (int i = 0; i < Rows; ++i) {
            const int8_t* ab = a + i * lda + b * kBlockValues + s * kBlockBytes;
            const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ab));
            acc[i][j] = _mm256_add_epi16(acc[i][j], _mm256_maddubs_epi16(u, av));
          }
        }
      }
    }
    // Widening and reducing once per kFlushBlocks blocks costs next to nothing.
    for (int i = 0; i < Rows; ++i) {
      for (int j = 0; j < Cols; ++j) dots[i * kMaxTile + j] += hsum_epi32(_mm256_madd_epi16(acc[i][j], ones));
    }
  }
}

using TileImpl = void (*)(const int8_t*, int64_t, const uint8_t*, const Strides&, int64_t, int32_t*);

// Every shape up to kMaxTile x kMaxTile: edge tiles need the smaller ones, and the tile choice
// in kernel_for stays a one-line tuning change.
constexpr TileImpl kAvx2Tiles[kMaxTile][kMaxTile] = {
    {tile_avx2<1, 1>, tile_avx2<1, 2>, tile_avx2<1, 3>, tile_avx2<1, 4>},
    {tile_avx2<2, 1>, tile_avx2<2, 2>, tile_avx2<2, 3>, tile_avx2<2, 4>},
    {tile_avx2<3, 1>, tile_avx2<3, 2>, tile_avx2<3, 3>, tile_avx2<3, 4>},
    {tile_avx2<4, 1>, tile_avx2<4, 2>, tile_avx2<4, 3>, tile_avx2<4, 4>},
};

void tile_avx2_any(int rows, int cols, const int8_t* a, int64_t lda, const uint8_t* w, const Strides& ws,
                   int64_t blocks, int32_t* dots) {
  kAvx2Tiles[rows - 1][cols - 1](a, lda, w, ws, blocks, dots);
}

// The AVX2 GEMV above has a compute ceiling barely over the memory bandwidth (2 cores of a Xeon,
// 2026-12-02: 34 GB/s with the weights in L3 against a 31 GB/s read), so it streams only when
// loads and arithmetic overlap perfectly, and it streamed at 72% of the read. AVX-512 VNNI's
// vpdpbusd multiplies u8 x s8 and adds into int32 lanes in one instruction, on 64 bytes: a
// group's 4 grouped rows take 2 loads instead of 4, and each 2-bit field costs an AND and a
// vpdpbusd instead of a shift, an AND, a maddubs and an add. 2B4T decode, paired with AVX2 in
// one process: 1.12x (1.03-1.16) with the int4 head, 1.09x (1.05-1.19) with int8.
//
// The fields are not shifted down: field s is masked in place, so its products are u * 4^s * a,
// summed in an accumulator of their own and shifted right by 2s at the end (exactly: every term
// is a multiple of 4^s). A lane of field 3 gains at most 4 * 2 * 64 * 128 per block.
constexpr int64_t kVnniFlushBlocks = 1 << 14;
static_assert(kVnniFlushBlocks * 4 * 2 * 64 * 128 < (1LL << 31), "int32 accumulators could overflow");

BITNET_AVX512_WARNINGS_OFF

// sum over fields s of acc[s] / 4^s.
BITNET_AVX512_VNNI inline __m512i unscale_fields(const __m512i acc[4]) {
  return _mm512_add_epi32(_mm512_add_epi32(acc[0], _mm512_srai_epi32(acc[1], 2)),
                          _mm512_add_epi32(_mm512_srai_epi32(acc[2], 4), _mm512_srai_epi32(acc[3], 6)));
}

// dots[0..3] = dot(u, a) of one activation row with the 4 rows of one group (group_rows, 4).
BITNET_AVX512_VNNI void gemv_group_vnni(const int8_t* a, const uint8_t* w, int64_t blocks, int32_t* dots) {
  const __m512i fields[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0C), _mm512_set1_epi8(0x30),
                             _mm512_set1_epi8(static_cast<char>(0xC0))};
  __m512i rows01 = _mm512_setzero_si512(), rows23 = _mm512_setzero_si512();  // rows 0 | 1, 2 | 3
  for (int64_t b0 = 0; b0 < blocks; b0 += kVnniFlushBlocks) {
    __m512i acc01[4], acc23[4];
    for (int s = 0; s < 4; ++s) acc01[s] = acc23[s] = _mm512_setzero_si512();
    const int64_t b1 = std::min(blocks, b0 + kVnniFlushBlocks);
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* wb = w + b * kStreamGroup * kBlockBytes;
      _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchBytes), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(wb + 64 + kPrefetchBytes), _MM_HINT_T1);
      const __m512i w01 = _mm512_loadu_si512(wb), w23 = _mm512_loadu_si512(wb + 64);
      for (int s = 0; s < 4; ++s) {  // values 32s .. 32s+31 of the block, for both rows of a register
        const __m256i chunk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + b * kBlockValues + s * kBlockBytes));
        const __m512i av = _mm512_broadcast_i64x4(chunk);
        acc01[s] = _mm512_dpbusd_epi32(acc01[s], _mm512_and_si512(w01, fields[s]), av);
        acc23[s] = _mm512_dpbusd_epi32(acc23[s], _mm512_and_si512(w23, fields[s]), av);
      }
    }
    rows01 = _mm512_add_epi32(rows01, unscale_fields(acc01));
    rows23 = _mm512_add_epi32(rows23, unscale_fields(acc23));
  }
  dots[0] = hsum_epi32(_mm512_castsi512_si256(rows01));
  dots[1] = hsum_epi32(_mm512_extracti64x4_epi64(rows01, 1));
  dots[2] = hsum_epi32(_mm512_castsi512_si256(rows23));
  dots[3] = hsum_epi32(_mm512_extracti64x4_epi64(rows23, 1));
}

BITNET_AVX512_WARNINGS_ON

// A whole group of grouped rows against one activation row goes to the VNNI GEMV; every other
// tile (prefill's, edge tiles, row-major weights) to the AVX2 one.
void tile_avx512_any(int rows, int cols, const int8_t* a, int64_t lda, const uint8_t* w, const Strides& ws,
                     int64_t blocks, int32_t* dots) {
  const bool whole_group = rows == 1 && cols == kStreamGroup && ws.row == kBlockBytes &&
                           ws.block == kStreamGroup * kBlockBytes;
  if (whole_group) return gemv_group_vnni(a, w, blocks, dots);
  tile_avx2_any(rows, cols, a, lda, w, ws, blocks, dots);
}

// GEMM 4x2 measured best on Zen 3 (M=128, 2560x2560, one core: ~89 GMAC/s against 75-84 for
// 4x1, 6x1, 8x1, and less for 2x4, 3x3, 2x2; larger tiles spill their int16 accumulators).
static_assert(kStreamGroup % 4 == 0, "every tile width (1, 2, 4) must divide the row group");

const Kernel& kernel_for(Isa isa) {
  static const Kernel scalar{tile_scalar, {1, 1}, {1, 1}};
  static const Kernel avx2{tile_avx2_any, {1, 4}, {4, 2}};
  static const Kernel avx512{tile_avx512_any, {1, 4}, {4, 2}};
  if (isa == Isa::kAvx512) return avx512;
  return isa == Isa::kAvx2 ? avx2 : scalar;
}

// ------------------------------------------------------------------ driver

std::vector<int32_t> row_sums(const int8_t* a, int64_t m, int64_t k) {
  std::vector<int32_t> sums(m, 0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < k; ++j) sums[i] += a[i * k + j];
  }
  return sums;
}

// Runs the integer matmul and hands each finished dot(t, a) to store(row, col, dot).
template <class Store>
void run_gemm(Isa isa, const TernaryGemm& g, int threads, Store store) {
  const Kernel& kernel = kernel_for(isa);
  const TileShape tile = g.m == 1 ? kernel.gemv : kernel.gemm;
  const int64_t lda = g.k_padded, ldw = g.k_padded / 4, blocks = g.k_padded / kBlockValues, group = g.row_group;
  // Grouped rows: a tile stays inside one group (every tile width divides kStreamGroup).
  const Strides strides{group == 1 ? ldw : kBlockBytes, group * kBlockBytes};
  const auto row = [&](int64_t r) { return g.w + (r / group) * group * ldw + (r % group) * kBlockBytes; };
  const std::vector<int32_t> sums = row_sums(g.a, g.m, g.k_padded);
  const int64_t panel = panel_rows(g.n, ldw, std::max<int>(tile.cols, static_cast<int>(group)), threads,
                                   g.m == 1 ? kGemvTaskBytes : kGemmPanelBytes);
  const int64_t tasks = ceil_div(g.n, panel);

  parallel_for(tasks, threads, [&](int64_t t) {
    const int64_t n_end = std::min(g.n, (t + 1) * panel);
    for (int64_t m0 = 0; m0 < g.m; m0 += tile.rows) {
      const int rows = static_cast<int>(std::min<int64_t>(tile.rows, g.m - m0));
      for (int64_t n0 = t * panel; n0 < n_end; n0 += tile.cols) {
        const int cols = static_cast<int>(std::min<int64_t>(tile.cols, n_end - n0));
        int32_t dots[kMaxTile * kMaxTile];
        kernel.tile(rows, cols, g.a + m0 * lda, lda, row(n0), strides, blocks, dots);
        for (int i = 0; i < rows; ++i) {
          for (int j = 0; j < cols; ++j) store(m0 + i, n0 + j, dots[i * kMaxTile + j] - sums[m0 + i]);
        }
      }
    }
  });
}

}  // namespace

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

bool cpu_has_avx512_vnni() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

void quantize_rows(Isa isa, const float* x, int64_t rows, int64_t k, int64_t k_padded, int8_t* q,
                   float* scales, int threads) {
  parallel_for(rows, threads, [&](int64_t r) {
    int8_t* qr = q + r * k_padded;
    scales[r] = has_avx2(isa) ? quantize_row_avx2(x + r * k, k, qr) : quantize_row_scalar(x + r * k, k, qr);
    std::memset(qr + k, 0, k_padded - k);
  });
}

void group_rows(const uint8_t* w, int64_t n, int64_t k_padded, int64_t group, uint8_t* out) {
  const int64_t blocks = k_padded / kBlockValues, ldw = k_padded / 4;
  std::memset(out, 0, grouped_bytes(n, k_padded, group));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t slot = ((r / group) * blocks + b) * group + r % group;
      std::memcpy(out + slot * kBlockBytes, w + r * ldw + b * kBlockBytes, kBlockBytes);
    }
  }
}

void gemm_int(Isa isa, const TernaryGemm& g, int32_t* out, int threads) {
  run_gemm(isa, g, threads, [&](int64_t i, int64_t j, int32_t dot) { out[i * g.n + j] = dot; });
}

void gemm_rescaled(Isa isa, const TernaryGemm& g, const float* a_scales, const float* w_scales, float* out,
                   int threads) {
  run_gemm(isa, g, threads, [&](int64_t i, int64_t j, int32_t dot) {
    out[i * g.n + j] = static_cast<float>(dot) / (w_scales[j] * a_scales[i]);
  });
}

}  // namespace bitnet
