#include "decoder.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "avx2.h"
#include "thread_pool.h"

namespace bitnet {
namespace {

// ------------------------------------------------------------------ float row operations

// model.RMSNorm: weight * (x * rsqrt(mean(x^2) + eps)). The squares are summed in double, so the
// mean is the exactly rounded one that torch's float reduction lands on or within an ulp of.
float rms_multiplier(double sum, int64_t n, float eps) {
  return 1.0f / std::sqrt(static_cast<float>(sum / static_cast<double>(n)) + eps);
}

void rms_norm_scalar(const float* x, const float* weight, int64_t n, float eps, float* out) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i] * x[i]);
  const float r = rms_multiplier(sum, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * r);
}

// The same in 8 double lanes: the float squares are exact in double and their partial sums carry
// 29 more bits than the float mean keeps, so the order only moves the result in rare ties. The
// scalar loop's one dependent add chain took ~4 cycles a value (0.9 ms of a 2B4T token).
BITNET_AVX2 void rms_norm_avx2(const float* x, const float* weight, int64_t n, float eps, float* out) {
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 sq = _mm256_mul_ps(v, v);
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(sq)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(sq, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
  double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (int64_t j = i; j < n; ++j) sum += static_cast<double>(x[j] * x[j]);
  const float r = rms_multiplier(sum, n, eps);
  const __m256 vr = _mm256_set1_ps(r);
  for (i = 0; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), vr)));
  }
  for (; i < n; ++i) out[i] = weight[i] * (x[i] * r);
}

void rms_norm(Isa isa, const float* x, const float* weight, int64_t n, float eps, float* out) {
  if (has_avx2(isa)) return rms_norm_avx2(x, weight, n, eps, out);
  rms_norm_scalar(x, weight, n, eps, out);
}

// model.apply_rope, rotate-half convention, in place: x * cos + rotate_half(x) * sin.
void apply_rope(float* x, const float* cos, const float* sin, int64_t head_dim, float* scratch) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) scratch[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
  for (int64_t i = half; i < head_dim; ++i) scratch[i] = x[i] * cos[i] + x[i - half] * sin[i];
  std::copy(scratch, scratch + head_dim, x);
}

BITNET_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  float total = hsum_ps(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

BITNET_AVX2 void axpy_avx2(float alpha, const float* x, int64_t n, float* y) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// exp(x) for x <= 0 (softmax's shifted scores), Cephes' expf as in avx_mathfun: n = round(x log2 e),
// a degree-5 polynomial of the remainder, times 2^n; within 2 ulp of std::exp, and 0 below -87.
// std::exp one value at a time cost ~1 ms of a 2B4T token at 140 cached positions.
BITNET_AVX2 __m256 exp_avx2(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.3f);
  const __m256 underflow = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  }
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// scores[j] = dot(q, keys[j]) * scale for j < seen, 8 keys at a time: 8 independent FMA chains
// instead of one, their sums transposed into one vector. head_dim a multiple of 8.
//
// With `values`, each batch also prefetches the next batch's keys into L1 and its own 8 values into
// L2, for weighted_values: a batch's 8 key rows are 8 short streams the hardware prefetcher does not
// run ahead on. The first query head of a KV group does it (the others find the chunk in cache):
// attention 1.07-1.10x at 145 positions, paired.
BITNET_AVX2 void scores_avx2(const float* q, const float* keys, int64_t seen, int64_t hd, float scale, float* scores,
                             const float* values) {
  const __m256 vscale = _mm256_set1_ps(scale);
  const int64_t row_lines = hd * static_cast<int64_t>(sizeof(float)) / 64;
  int64_t j = 0;
  for (; j + 8 <= seen; j += 8) {
    if (values != nullptr) {
      const char* next_keys = reinterpret_cast<const char*>(keys + (j + 8) * hd);
      const char* batch_values = reinterpret_cast<const char*>(values + j * hd);
      const int64_t key_lines = std::clamp<int64_t>(seen - j - 8, 0, 8) * row_lines;
      for (int64_t l = 0; l < key_lines; ++l) _mm_prefetch(next_keys + 64 * l, _MM_HINT_T0);
      for (int64_t l = 0; l < 8 * row_lines; ++l) _mm_prefetch(batch_values + 64 * l, _MM_HINT_T1);
    }
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + (j + u) * hd + d), acc[u]);
    }
    const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 lo = _mm256_hadd_ps(s01, s23), hi = _mm256_hadd_ps(s45, s67);  // lanes: keys 0-3 | 0-3, 4-7 | 4-7
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
    _mm256_storeu_ps(scores + j, _mm256_mul_ps(sums, vscale));
  }
  for (; j < seen; ++j) scores[j] = dot_avx2(q, keys + j * hd, hd) * scale;
}

// In place: scores[j] = exp(scores[j] - max); returns their sum, and the max in *top.
BITNET_AVX2 float softmax_numerators_avx2(float* scores, int64_t seen, float* top_out) {
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= seen; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(scores + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float top = *std::max_element(lanes, lanes + 8);
  for (; j < seen; ++j) top = std::max(top, scores[j]);
  const __m256 vtop = _mm256_set1_ps(top);
  __m256 vsum = _mm256_setzero_ps();
  for (j = 0; j + 8 <= seen; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(scores + j), vtop));
    _mm256_storeu_ps(scores + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float total = hsum_ps(vsum);
  for (; j < seen; ++j) {
    const __m256 e = exp_avx2(_mm256_set1_ps(scores[j] - top));
    total += scores[j] = _mm256_cvtss_f32(e);
  }
  *top_out = top;
  return total;
}

// y[0 .. 8 Chunks) = sum_j weights[j] * values[j][0 .. 8 Chunks), rows `stride` floats apart. The
// chunk count is a template argument so that the accumulators stay in registers: with a run-time
// count the compiler stored them to the stack and branched on the count for every value row
// (perf annotate). Attention 1.025x, paired (the loads, not these stores, bound it).
template <int Chunks>
BITNET_AVX2 void weighted_values_block(const float* weights, const float* values, int64_t seen, int64_t stride,
                                       float* y) {
  __m256 acc[Chunks];
  for (int c = 0; c < Chunks; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < seen; ++j) {
    const __m256 w = _mm256_set1_ps(weights[j]);
    const float* v = values + j * stride;
    for (int c = 0; c < Chunks; ++c) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * c), acc[c]);
  }
  for (int c = 0; c < Chunks; ++c) _mm256_storeu_ps(y + 8 * c, acc[c]);
}

using WeightedValuesFn = void (*)(const float*, const float*, int64_t, int64_t, float*);
constexpr WeightedValuesFn kWeightedValues[8] = {
    weighted_values_block<1>, weighted_values_block<2>, weighted_values_block<3>, weighted_values_block<4>,
    weighted_values_block<5>, weighted_values_block<6>, weighted_values_block<7>, weighted_values_block<8>};

// y = sum_j weights[j] * values[j], 64 dimensions at a time. head_dim a multiple of 8.
BITNET_AVX2 void weighted_values_avx2(const float* weights, const float* values, int64_t seen, int64_t hd, float* y) {
  for (int64_t d0 = 0; d0 < hd; d0 += 64) {
    kWeightedValues[std::min<int64_t>(64, hd - d0) / 8 - 1](weights, values + d0, seen, hd, y + d0);
  }
}

// Attention over chunks of the cached positions: chunk c's partial softmax is (y: the weighted
// values, unnormalized; its max score; its sum of exponentials), kPartial floats.
constexpr int64_t kAttentionChunk = 64;

// y = the softmax-weighted values of `count` chunk partials (stride `stride` floats), merged in
// chunk order: each rescaled by exp(its max - the overall max).
BITNET_AVX2 void merge_partials_avx2(const float* partials, int64_t count, int64_t stride, int64_t hd, float* y) {
  float top = -INFINITY;
  for (int64_t c = 0; c < count; ++c) top = std::max(top, partials[c * stride + hd]);
  float total = 0.0f;
  for (int64_t c = 0; c < count; ++c) {
    const float* p = partials + c * stride;
    const float w = std::exp(p[hd] - top);
    total += w * p[hd + 1];
    const __m256 vw = _mm256_set1_ps(w);
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 term = _mm256_mul_ps(vw, _mm256_loadu_ps(p + d));
      _mm256_storeu_ps(y + d, c == 0 ? term : _mm256_add_ps(_mm256_loadu_ps(y + d), term));
    }
  }
  const __m256 inv = _mm256_set1_ps(1.0f / total);
  for (int64_t d = 0; d < hd; d += 8) _mm256_storeu_ps(y + d, _mm256_mul_ps(_mm256_loadu_ps(y + d), inv));
}

// h[i] = max(gate[i], 0)^2 * up[i] for the whole multiples of 8; returns how many were done.
BITNET_AVX2 int64_t relu2_glu_avx2(const float* gate, const float* up, int64_t n, float* h) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 relu = _mm256_max_ps(_mm256_setzero_ps(), _mm256_loadu_ps(gate + i));
    _mm256_storeu_ps(h + i, _mm256_mul_ps(_mm256_mul_ps(relu, relu), _mm256_loadu_ps(up + i)));
  }
  return i;
}

float dot(Isa isa, const float* a, const float* b, int64_t n) {
  if (has_avx2(isa)) return dot_avx2(a, b, n);
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) total += a[i] * b[i];
  return total;
}

void axpy(Isa isa, float alpha, const float* x, int64_t n, float* y) {
  if (has_avx2(isa)) return axpy_avx2(alpha, x, n, y);
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// ------------------------------------------------------------------ one forward step

// Adds the time from its construction to its destruction to a piece of the profile, if it is on.
class Stopwatch {
 public:
  using Clock = std::chrono::steady_clock;
  Stopwatch(DecoderProfile& profile, Piece piece)
      : slot_(profile.enabled ? &profile.seconds[static_cast<int>(piece)] : nullptr),
        start_(slot_ != nullptr ? Clock::now() : Clock::time_point{}) {}
  ~Stopwatch() {
    if (slot_ != nullptr) *slot_ += std::chrono::duration<double>(Clock::now() - start_).count();
  }
  Stopwatch(const Stopwatch&) = delete;
  Stopwatch& operator=(const Stopwatch&) = delete;

 private:
  double* slot_;
  Clock::time_point start_;
};

class Step {
 public:
  Step(Isa isa, const DecoderShape& shape, const DecoderStep& step, DecoderWorkspace& ws, int threads)
      : isa_(isa), s_(shape), st_(step), threads_(threads), rows_(step.batch * step.tokens),
        q_cols_(shape.heads * shape.head_dim), kv_cols_(shape.kv_heads * shape.head_dim),
        normed_(sized(ws.normed, rows_ * std::max(shape.hidden, shape.intermediate))),
        codes_(sized(ws.codes, rows_ * padded_features(std::max(shape.hidden, shape.intermediate)))),
        a_scales_(sized(ws.a_scales, rows_)), qkv_(sized(ws.qkv, rows_ * (q_cols_ + 2 * kv_cols_))),
        attended_(sized(ws.attended, rows_ * q_cols_)), gate_up_(sized(ws.gate_up, rows_ * 2 * shape.intermediate)),
        ffn_(sized(ws.ffn, rows_ * shape.intermediate)), out_(sized(ws.out, rows_ * shape.hidden)),
        partials_(ws.partials), profile_(ws.profile) {
    if (profile_.enabled) ++profile_.steps;
  }

  // x = norm(x): the model's final RMSNorm, in place (rms_norm reads a value before writing it).
  void final_norm(const float* weight) {
    Stopwatch timer(profile_, Piece::kNorm);
    parallel_for(rows_, threads_, [&](int64_t r) {
      float* row = st_.x + r * s_.hidden;
      rms_norm(isa_, row, weight, s_.hidden, s_.eps, row);
    });
  }

  void layer(int64_t index, const DecoderLayer& l) {
    // Attention block: x += o_proj(attn_sub_norm(attention(rope(qkv(input_norm(x)) + bias))))
    project(norm_rows(st_.x, l.input_norm, s_.hidden), l.qkv, qkv_.data());
    if (l.qkv_bias != nullptr) add_bias(l.qkv_bias, q_cols_ + 2 * kv_cols_);
    rope_and_cache(index);
    {
      Stopwatch timer(profile_, Piece::kAttention);
      attend(index);
    }
    project(norm_rows(attended_.data(), l.attn_sub_norm, q_cols_), l.o, out_.data());
    add_to_x();

    // FFN block: x += down(ffn_sub_norm(act(gate) * up)), gate/up of post_norm(x)
    project(norm_rows(st_.x, l.post_norm, s_.hidden), l.gate_up, gate_up_.data());
    if (s_.activation == Activation::kRelu2) {
      glu([](float g) { const float relu = std::max(g, 0.0f); return relu * relu; });
    } else {
      glu([](float g) { return g / (1.0f + std::exp(-g)); });  // torch's silu, in the same order
    }
    project(norm_rows(ffn_.data(), l.ffn_sub_norm, s_.intermediate), l.down, out_.data());
    add_to_x();
  }

 private:
  // rms_norm(in (rows, n)) in normed_; a missing norm (weight nullptr: a Llama's sub-norms) is in itself.
  const float* norm_rows(const float* in, const float* weight, int64_t n) {
    if (weight == nullptr) return in;
    Stopwatch timer(profile_, Piece::kNorm);
    parallel_for(rows_, threads_, [&](int64_t r) { rms_norm(isa_, in + r * n, weight, n, s_.eps, normed_.data() + r * n); });
    return normed_.data();
  }

  // out (rows, p.n) = BitLinear(in (rows, p.k)): int8 activations per token, exact integer
  // product, one rescale by s_w * s_a per output.
  void project(const float* in, const Projection& p, float* out) {
    const int64_t k_padded = padded_features(p.k);
    {
      Stopwatch timer(profile_, Piece::kQuantize);
      quantize_rows(isa_, in, rows_, p.k, k_padded, codes_.data(), a_scales_.data(), threads_);
    }
    Stopwatch timer(profile_, Piece::kGemv);
    const TernaryGemm g{codes_.data(), p.w, rows_, p.n, k_padded, p.row_group};
    gemm_rescaled(isa_, g, a_scales_.data(), p.row_scales, out, threads_);
  }

  float* cache_row(float* cache, int64_t layer, int64_t b, int64_t g, int64_t pos) const {
    return cache + (((layer * st_.batch + b) * s_.kv_heads + g) * st_.max_tokens + pos) * s_.head_dim;
  }

  void rope_and_cache(int64_t layer) {
    Stopwatch timer(profile_, Piece::kRopeCache);
    const int64_t hd = s_.head_dim, ld = q_cols_ + 2 * kv_cols_;
    parallel_for(rows_, threads_, [&](int64_t r) {
      const int64_t b = r / st_.tokens, t = r % st_.tokens;
      const float *cos = st_.cos + t * hd, *sin = st_.sin + t * hd;
      float* row = qkv_.data() + r * ld;
      std::vector<float> scratch(hd);
      for (int64_t h = 0; h < s_.heads; ++h) apply_rope(row + h * hd, cos, sin, hd, scratch.data());
      for (int64_t g = 0; g < s_.kv_heads; ++g) {
        float* k = row + q_cols_ + g * hd;
        apply_rope(k, cos, sin, hd, scratch.data());
        std::copy(k, k + hd, cache_row(st_.k_cache, layer, b, g, st_.past + t));
        const float* v = row + q_cols_ + kv_cols_ + g * hd;
        std::copy(v, v + hd, cache_row(st_.v_cache, layer, b, g, st_.past + t));
      }
    });
  }

  // Causal GQA attention: the token at position p sees cached positions 0 .. p.
  //
  // On AVX2 the cached positions are taken in chunks of kAttentionChunk, each giving a partial
  // softmax for every query head of its KV group, merged in chunk order: the same arithmetic
  // whichever task computes which chunk, so a decode step and a full recompute agree exactly. When
  // few tokens are decoded, a task is one chunk of one group (2B4T decode: 5 groups x ~3 chunks, so
  // both threads share the cache reads), else all chunks of one token's group (prefill). Either way
  // the group's 4 query heads read each key and value from DRAM once, not 4 times.
  void attend(int64_t layer) {
    if (!has_avx2(isa_) || s_.head_dim % 8 != 0) return attend_scalar(layer);
    const int64_t hd = s_.head_dim, group = s_.heads / s_.kv_heads, part = hd + 2;
    const int64_t chunks = ceil_div(st_.past + st_.tokens, kAttentionChunk), units = rows_ * s_.kv_heads;
    const bool split = units < 4 * threads_;
    if (split) sized(partials_, units * group * chunks * part);
    parallel_for(split ? units * chunks : units, threads_, [&](int64_t task) {
      const int64_t unit = split ? task / chunks : task, r = unit / s_.kv_heads, g = unit % s_.kv_heads;
      const int64_t seen = st_.past + r % st_.tokens + 1, used = ceil_div(seen, kAttentionChunk);
      thread_local std::vector<float> local;
      float* out;  // this unit's partials: (head in group, chunk, part)
      if (split) {
        if (task % chunks >= used) return;
        out = partials_.data() + unit * group * chunks * part;
        chunk_partials(layer, r, g, task % chunks, seen, chunks, out);
        return;
      }
      local.resize(group * chunks * part);
      out = local.data();
      for (int64_t c = 0; c < used; ++c) chunk_partials(layer, r, g, c, seen, chunks, out);
      for (int64_t h = 0; h < group; ++h) {
        merge_partials_avx2(out + h * chunks * part, used, part, hd, attended_.data() + r * q_cols_ + (g * group + h) * hd);
      }
    });
    if (!split) return;
    for (int64_t unit = 0; unit < units; ++unit) {
      const int64_t r = unit / s_.kv_heads, g = unit % s_.kv_heads;
      const int64_t used = ceil_div(st_.past + r % st_.tokens + 1, kAttentionChunk);
      for (int64_t h = 0; h < group; ++h) {
        merge_partials_avx2(partials_.data() + (unit * group + h) * chunks * part, used, part, hd,
                            attended_.data() + r * q_cols_ + (g * group + h) * hd);
      }
    }
  }

  // Chunk c's partials for every query head of KV group g at row r (which sees `seen` positions),
  // written to out[(h * chunks + c) * (head_dim + 2) ..].
  void chunk_partials(int64_t layer, int64_t r, int64_t g, int64_t c, int64_t seen, int64_t chunks, float* out) {
    const int64_t hd = s_.head_dim, group = s_.heads / s_.kv_heads, part = hd + 2, ld = q_cols_ + 2 * kv_cols_;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
    const int64_t b = r / st_.tokens, j0 = c * kAttentionChunk, n = std::min(seen, j0 + kAttentionChunk) - j0;
    const float* keys = cache_row(st_.k_cache, layer, b, g, j0);
    const float* values = cache_row(st_.v_cache, layer, b, g, j0);
    float scores[kAttentionChunk];
    for (int64_t h = 0; h < group; ++h) {
      const float* q = qkv_.data() + r * ld + (g * group + h) * hd;
      float* p = out + (h * chunks + c) * part;
      scores_avx2(q, keys, n, hd, scale, scores, h == 0 ? values : nullptr);
      p[hd + 1] = softmax_numerators_avx2(scores, n, &p[hd]);
      weighted_values_avx2(scores, values, n, hd, p);
    }
  }

  // The portable path: one query head per task, its scores over all positions at once.
  void attend_scalar(int64_t layer) {
    const int64_t hd = s_.head_dim, ld = q_cols_ + 2 * kv_cols_, group = s_.heads / s_.kv_heads;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
    parallel_for(st_.batch * s_.heads, threads_, [&](int64_t task) {
      const int64_t b = task / s_.heads, h = task % s_.heads, g = h / group;
      const float* keys = cache_row(st_.k_cache, layer, b, g, 0);
      const float* values = cache_row(st_.v_cache, layer, b, g, 0);
      std::vector<float> scores(st_.past + st_.tokens);
      for (int64_t t = 0; t < st_.tokens; ++t) {
        const int64_t r = b * st_.tokens + t, seen = st_.past + t + 1;
        const float* q = qkv_.data() + r * ld + h * hd;
        float top = -INFINITY;
        for (int64_t j = 0; j < seen; ++j) {
          scores[j] = dot(isa_, q, keys + j * hd, hd) * scale;
          top = std::max(top, scores[j]);
        }
        float total = 0.0f;
        for (int64_t j = 0; j < seen; ++j) total += scores[j] = std::exp(scores[j] - top);
        float* y = attended_.data() + r * q_cols_ + h * hd;
        std::fill(y, y + hd, 0.0f);
        for (int64_t j = 0; j < seen; ++j) axpy(isa_, scores[j] / total, values + j * hd, hd, y);
      }
    });
  }

  // ffn_ = act(gate) * up, the activation rounded to float before the product as in torch.
  template <class Act>
  void glu(Act act) {
    Stopwatch timer(profile_, Piece::kGlu);
    const int64_t n = s_.intermediate;
    parallel_for(rows_, threads_, [&](int64_t r) {
      const float *gate = gate_up_.data() + r * 2 * n, *up = gate + n;
      float* h = ffn_.data() + r * n;
      int64_t i = 0;
      if (has_avx2(isa_) && s_.activation == Activation::kRelu2) i = relu2_glu_avx2(gate, up, n, h);
      for (; i < n; ++i) h[i] = act(gate[i]) * up[i];
    });
  }

  // qkv_ (rows, n) += bias: after the rescale, as BitLinear's F.linear adds it.
  void add_bias(const float* bias, int64_t n) {
    Stopwatch timer(profile_, Piece::kGemv);
    for (int64_t r = 0; r < rows_; ++r) {
      float* row = qkv_.data() + r * n;
      for (int64_t i = 0; i < n; ++i) row[i] = row[i] + bias[i];
    }
  }

  void add_to_x() {
    Stopwatch timer(profile_, Piece::kResidual);
    const int64_t n = rows_ * s_.hidden;
    for (int64_t i = 0; i < n; ++i) st_.x[i] = st_.x[i] + out_[i];
  }

  template <class T>
  static std::vector<T>& sized(std::vector<T>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v;
  }

  const Isa isa_;
  const DecoderShape s_;
  const DecoderStep st_;
  const int threads_;
  const int64_t rows_, q_cols_, kv_cols_;
  std::vector<float>& normed_;
  std::vector<int8_t>& codes_;
  std::vector<float>&a_scales_, &qkv_, &attended_, &gate_up_, &ffn_, &out_, &partials_;
  DecoderProfile& profile_;
};

}  // namespace

void decoder_forward(Isa isa, const DecoderShape& shape, const std::vector<DecoderLayer>& layers,
                     const float* final_norm, const DecoderStep& step, DecoderWorkspace& workspace, int threads) {
  Step run(isa, shape, step, workspace, threads);
  for (size_t i = 0; i < layers.size(); ++i) run.layer(static_cast<int64_t>(i), layers[i]);
  run.final_norm(final_norm);
}

}  // namespace bitnet
