#include "base3_kernels.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "avx2.h"
#include "thread_pool.h"

namespace bitnet {
namespace {

constexpr int kDigits = 5;
constexpr uint8_t kZeroCodes = 121;  // 1 + 3 + 9 + 27 + 81: five codes u = 1 (t = 0)

// q = ceil(b * 256 / 243): the byte as a fraction of 3^5 in 8 bits, rounded up so that truncating
// 3 q / 256 never falls below a digit.
uint8_t prescale(uint8_t b) { return static_cast<uint8_t>((b * 256 + 242) / 243); }

// Lane i of digit vector j of a chunk holds value 5 i + 4 - j of the chunk.
void permute_activations(const int8_t* a, int64_t k_padded, int8_t* out) {
  for (int64_t c = 0; c < k_padded; c += kBase3ChunkValues) {
    for (int j = 0; j < kDigits; ++j) {
      for (int i = 0; i < kBase3ChunkBytes; ++i) out[c + j * kBase3ChunkBytes + i] = a[c + kDigits * i + 4 - j];
    }
  }
}

// dot(u, a) of the 4 rows of a row group over `chunks` chunks, a permuted.
using TileFn = void (*)(const int8_t* a, const uint8_t* w, int64_t chunks, int32_t* dots);

void tile_scalar(const int8_t* a, const uint8_t* w, int64_t chunks, int32_t* dots) {
  for (int r = 0; r < kStreamGroup; ++r) {
    int32_t acc = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const uint8_t* wc = w + (c * kStreamGroup + r) * kBase3ChunkBytes;
      const int8_t* ac = a + c * kBase3ChunkValues;
      for (int i = 0; i < kBase3ChunkBytes; ++i) {
        unsigned q = wc[i];
        for (int j = 0; j < kDigits; ++j, q = (q * 3) & 255) acc += static_cast<int32_t>((q * 3) >> 8) * ac[j * kBase3ChunkBytes + i];
      }
    }
    dots[r] = acc;
  }
}

// floor(3 q / 256) per byte with byte operations: avg(q - 1, q >> 1) = floor(floor(3 q / 2) / 2)
// (the -1 cancels avg's rounding up; q = 0 saturates to the right answer), then >> 6.
BITNET_AVX2 inline __m256i top_digit(__m256i q) {
  const __m256i half = _mm256_and_si256(_mm256_srli_epi16(q, 1), _mm256_set1_epi8(0x7F));
  const __m256i three_quarters = _mm256_avg_epu8(_mm256_subs_epu8(q, _mm256_set1_epi8(1)), half);
  return _mm256_and_si256(_mm256_srli_epi16(three_quarters, 6), _mm256_set1_epi8(3));
}

// int16 lanes gain at most 5 * 2 * 2 * 128 = 2560 per chunk: widen every 12 chunks (30720 < 32767).
constexpr int64_t kFlushChunks = 12;
constexpr int64_t kPrefetchBytes = 4096;  // as the 2-bit GEMV (ternary_kernels.cpp)

BITNET_AVX2 void tile_avx2(const int8_t* a, const uint8_t* w, int64_t chunks, int32_t* dots) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i total[kStreamGroup];
  for (int r = 0; r < kStreamGroup; ++r) total[r] = _mm256_setzero_si256();
  for (int64_t c0 = 0; c0 < chunks; c0 += kFlushChunks) {
    __m256i acc[kStreamGroup];
    for (int r = 0; r < kStreamGroup; ++r) acc[r] = _mm256_setzero_si256();
    for (int64_t c = c0; c < std::min(chunks, c0 + kFlushChunks); ++c) {
      __m256i av[kDigits];
      for (int j = 0; j < kDigits; ++j) {
        av[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + c * kBase3ChunkValues + j * kBase3ChunkBytes));
      }
      const uint8_t* wc = w + c * kStreamGroup * kBase3ChunkBytes;
      _mm_prefetch(reinterpret_cast<const char*>(wc + kPrefetchBytes), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(wc + kPrefetchBytes + 64), _MM_HINT_T1);
      for (int r = 0; r < kStreamGroup; ++r) {
        __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + r * kBase3ChunkBytes));
        for (int j = 0; j < kDigits; ++j) {
          acc[r] = _mm256_add_epi16(acc[r], _mm256_maddubs_epi16(top_digit(q), av[j]));
          q = _mm256_add_epi8(q, _mm256_add_epi8(q, q));  // 3 q mod 256
        }
      }
    }
    for (int r = 0; r < kStreamGroup; ++r) total[r] = _mm256_add_epi32(total[r], _mm256_madd_epi16(acc[r], ones));
  }
  for (int r = 0; r < kStreamGroup; ++r) dots[r] = hsum_epi32(total[r]);
}

}  // namespace

void base3_kernel_layout(const uint8_t* file, int64_t n, int64_t k, uint8_t* out) {
  const int64_t file_bytes = (k + kDigits - 1) / kDigits, row_bytes = base3_padded_features(k) / kDigits;
  const int64_t chunks = row_bytes / kBase3ChunkBytes;
  std::memset(out, prescale(kZeroCodes), base3_kernel_bytes(n, k));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t byte = 0; byte < file_bytes; ++byte) {
      const int64_t chunk = byte / kBase3ChunkBytes;
      const int64_t slot = ((r / kStreamGroup) * chunks + chunk) * kStreamGroup + r % kStreamGroup;
      out[slot * kBase3ChunkBytes + byte % kBase3ChunkBytes] = prescale(file[r * file_bytes + byte]);
    }
  }
}

void base3_gemm_int(Isa isa, const int8_t* a, int64_t m, const uint8_t* w, int64_t n, int64_t k_padded,
                    int32_t* out, int threads) {
  const int64_t chunks = k_padded / kBase3ChunkValues, tiles = ceil_div(n, kStreamGroup);
  std::vector<int8_t> permuted(m * k_padded);
  std::vector<int32_t> sums(m, 0);
  for (int64_t i = 0; i < m; ++i) {
    permute_activations(a + i * k_padded, k_padded, permuted.data() + i * k_padded);
    for (int64_t c = 0; c < k_padded; ++c) sums[i] += a[i * k_padded + c];
  }
  const TileFn tile = has_avx2(isa) ? tile_avx2 : tile_scalar;
  const int64_t panel = panel_rows(tiles, chunks * kStreamGroup * kBase3ChunkBytes, 1, threads);
  parallel_for(ceil_div(tiles, panel), threads, [&](int64_t task) {
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t t = task * panel; t < std::min(tiles, (task + 1) * panel); ++t) {
        int32_t dots[kStreamGroup];
        tile(permuted.data() + i * k_padded, w + t * chunks * kStreamGroup * kBase3ChunkBytes, chunks, dots);
        for (int r = 0; r < kStreamGroup && t * kStreamGroup + r < n; ++r) out[i * n + t * kStreamGroup + r] = dots[r] - sums[i];
      }
    }
  });
}

}  // namespace bitnet
