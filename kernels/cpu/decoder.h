// The whole BitNet b1.58 decoder stack on the CPU kernels: every layer of a forward step in one call.
//
// The maths is bitnet_train/engine/model.py's torch path, operation for operation (which is
// model.py's): RMSNorm, fused q/k/v (+ Qwen2's biases), RoPE (rotate-half), GQA attention over the
// KV cache, attn_sub_norm, o_proj, residual; RMSNorm, fused gate/up, act(gate)·up, ffn_sub_norm,
// down_proj, residual; after the last layer, the final RMSNorm. The architecture choices are
// model.py's: the activation (2B4T's ReLU² or Llama's SiLU), sub-norms present or not, q/k/v biases
// present or not; each is one branch per layer, none per value. Running it here instead of as ~40
// torch calls per layer is what makes decode memory-bound: at batch 1 a torch op costs about as much
// as the GEMV beside it.
#pragma once

#include <cstdint>
#include <vector>

#include "ternary_kernels.h"

namespace bitnet {

// One or more BitLinears with a common input, their packed rows concatenated.
struct Projection {
  const uint8_t* w;         // n packed rows, row-major or grouped (TernaryGemm::row_group)
  const float* row_scales;  // (n,): s_w of the projection each row came from
  int64_t n, k;
  int64_t row_group;
};

// nullptr marks what a model does not have: a Llama's sub-norms, every bias but Qwen2's.
struct DecoderLayer {
  const float* input_norm;
  Projection qkv;        // q rows, then k, then v
  const float* qkv_bias;  // (q + k + v rows,), added after the rescale, as BitLinear does
  const float* attn_sub_norm;
  Projection o;
  const float* post_norm;
  Projection gate_up;  // gate rows, then up
  const float* ffn_sub_norm;
  Projection down;
};

// model.ACTIVATIONS: the FFN's gate activation.
enum class Activation { kRelu2, kSilu };

struct DecoderShape {
  int64_t hidden, intermediate, heads, kv_heads, head_dim;
  float eps;
  Activation activation;
};

// The step's tokens continue a cached sequence: positions past .. past + tokens - 1.
struct DecoderStep {
  float* x;            // (batch * tokens, hidden) row-major: embeddings in, normed last hidden state out
  int64_t batch, tokens, past;
  const float* cos;    // (tokens, head_dim): RoPE tables of those positions
  const float* sin;
  float* k_cache;      // (layers, batch, kv_heads, max_tokens, head_dim), written at past ..
  float* v_cache;
  int64_t max_tokens;
};

// The pieces of a forward step, timed when a profile is on (`bitnet-train bench engine --profile`):
// where the time goes between the GEMVs, which stream the weights, and what leaves memory idle.
enum class Piece { kNorm, kQuantize, kGemv, kAttention, kRopeCache, kGlu, kResidual, kCount };
constexpr const char* kPieceNames[] = {"norms", "quantize", "gemv", "attention", "rope_cache", "glu", "residual"};
static_assert(sizeof(kPieceNames) / sizeof(kPieceNames[0]) == static_cast<int>(Piece::kCount));

// Seconds per piece summed over the steps since profiling was switched on. A timer costs ~30 ns,
// 10 per layer: off by default all the same, so a step without a profile reads no clock.
struct DecoderProfile {
  bool enabled = false;
  double seconds[static_cast<int>(Piece::kCount)] = {};
  int64_t steps = 0;
};

// A step's intermediate activations, kept from one step to the next: allocated afresh, a
// 128-token prefill of 2B4T faulted in ~20 MB of new pages per call (a fifth of its non-GEMM time).
struct DecoderWorkspace {
  std::vector<float> normed, a_scales, qkv, attended, gate_up, ffn, out, partials;
  std::vector<int8_t> codes;
  DecoderProfile profile;
};

// Every layer, then the final RMSNorm (`final_norm`, (hidden,)) of every row of step.x in place,
// so that a step hands the head its input without a torch call in between.
void decoder_forward(Isa isa, const DecoderShape& shape, const std::vector<DecoderLayer>& layers,
                     const float* final_norm, const DecoderStep& step, DecoderWorkspace& workspace, int threads);

}  // namespace bitnet
