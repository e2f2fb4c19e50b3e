// AVX2 helpers shared by the kernels. Functions carry a target attribute instead of the files
// being built with -mavx2, so the module still imports (and runs its scalar paths) on CPUs
// without AVX2; callers choose at run time.
#pragma once

#include <immintrin.h>

#include <cstdint>

#define BITNET_AVX2 __attribute__((target("avx2,fma")))
// The VNNI GEMV (ternary_kernels.cpp), on CPUs that pass cpu_has_avx512_vnni().
#define BITNET_AVX512_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vnni")))

// Around the AVX-512 code: GCC 12's AVX-512 headers warn that their own _mm512_undefined_* values are
// uninitialized (GCC bug 105593, fixed in GCC 13); nothing there reads an undefined value.
#define BITNET_AVX512_WARNINGS_OFF                             \
  _Pragma("GCC diagnostic push")                               \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")        \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define BITNET_AVX512_WARNINGS_ON _Pragma("GCC diagnostic pop")

namespace bitnet {

BITNET_AVX2 inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

BITNET_AVX2 inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

}  // namespace bitnet
