// Python bindings of the ternary CPU kernels: bitnet_train._cpu_kernels.
//
// Arguments are numpy arrays (torch tensors arrive zero-copy through .numpy() from
// bitnet_train.kernels.cpu). Every argument is checked here, so the kernels can trust shapes;
// compute runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "base3_kernels.h"
#include "decoder.h"
#include "int4_weights.h"
#include "int8_weights.h"
#include "stream_arena.h"
#include "ternary_kernels.h"
#include "thread_pool.h"

namespace py = pybind11;
using bitnet::Isa;

namespace {

// Process-wide, changed only with the GIL held; each call copies it before releasing the GIL.
Isa best_isa() {
  if (bitnet::cpu_has_avx512_vnni()) return Isa::kAvx512;
  return bitnet::cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar;
}

struct Settings {
  Isa isa = best_isa();
  int threads = bitnet::hardware_threads();
};

Settings& settings() {
  static Settings s;
  return s;
}

std::string str(const py::handle& obj) { return py::str(obj).cast<std::string>(); }

// The argument as a C-contiguous `ndim`-D array of T, or a ValueError that names it.
template <class T>
py::array require(const py::handle& obj, const std::string& where, int ndim) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::value_error(where + " must be a numpy array, got " + str(py::type::handle_of(obj)));
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!py::isinstance<py::array_t<T>>(arr)) {
    throw py::value_error(where + " must have dtype " + str(py::dtype::of<T>()) + ", got " + str(arr.dtype()));
  }
  if (arr.ndim() != ndim) {
    throw py::value_error(where + " must be " + std::to_string(ndim) + "-D, got shape " + str(arr.attr("shape")));
  }
  if (!(arr.flags() & py::array::c_style)) {
    throw py::value_error(where + " must be C-contiguous (use .contiguous() or np.ascontiguousarray)");
  }
  return arr;
}

template <class T>
const T* data(const py::array& arr) {
  return static_cast<const T*>(arr.data());
}

void check_weight(const py::array& w, int64_t k_padded, const std::string& fn) {
  if (w.shape(1) * 4 != k_padded) {
    throw py::value_error(fn + ": qweight has " + std::to_string(w.shape(1)) + " bytes per row, but " +
                          std::to_string(k_padded) + " padded input features need " +
                          std::to_string(k_padded / 4) + " (docs/formats.md)");
  }
}

// Rows and row group of a packed ternary weight: with rows > 0, group_rows' output for that many
// rows; else the row-major docs/formats.md layout.
std::pair<int64_t, int64_t> ternary_weight(const py::array& w, int64_t k_padded, int64_t rows, const std::string& fn) {
  if (rows <= 0) {
    check_weight(w, k_padded, fn);
    return {w.shape(0), 1};
  }
  const int64_t group = bitnet::kStreamGroup;
  if (w.shape(0) != (rows + group - 1) / group || w.shape(1) != group * k_padded / 4) {
    throw py::value_error(fn + ": grouped qweight of " + std::to_string(rows) + " rows must be (" +
                          std::to_string((rows + group - 1) / group) + ", " + std::to_string(group * k_padded / 4) +
                          "), got (" + std::to_string(w.shape(0)) + ", " + std::to_string(w.shape(1)) +
                          "); make it with group_rows");
  }
  return {rows, group};
}

py::tuple quantize_activations(const py::handle& x_obj) {
  const py::array x = require<float>(x_obj, "quantize_activations: x", 2);
  const int64_t m = x.shape(0), k = x.shape(1);
  if (k == 0) throw py::value_error("quantize_activations: x has no features (shape (M, 0))");
  const int64_t k_padded = bitnet::padded_features(k);
  py::array_t<int8_t> q({m, k_padded});
  py::array_t<float> scales(m);
  const Settings s = settings();
  {
    py::gil_scoped_release nogil;
    bitnet::quantize_rows(s.isa, data<float>(x), m, k, k_padded, q.mutable_data(), scales.mutable_data(), s.threads);
  }
  return py::make_tuple(q, scales);
}

py::array_t<int32_t> ternary_gemm_int(const py::handle& a_obj, const py::handle& w_obj, int64_t rows) {
  const py::array a = require<int8_t>(a_obj, "ternary_gemm_int: a", 2);
  const py::array w = require<uint8_t>(w_obj, "ternary_gemm_int: qweight", 2);
  const int64_t k_padded = a.shape(1);
  if (k_padded % bitnet::kBlockValues != 0) {
    throw py::value_error("ternary_gemm_int: a has " + std::to_string(k_padded) +
                          " columns; pad activations to a multiple of 128 (quantize_activations does)");
  }
  const auto [n, group] = ternary_weight(w, k_padded, rows, "ternary_gemm_int");
  const bitnet::TernaryGemm g{data<int8_t>(a), data<uint8_t>(w), a.shape(0), n, k_padded, group};
  py::array_t<int32_t> out({g.m, g.n});
  const Settings s = settings();
  {
    py::gil_scoped_release nogil;
    bitnet::gemm_int(s.isa, g, out.mutable_data(), s.threads);
  }
  return out;
}

py::array_t<uint8_t> group_rows(const py::handle& w_obj) {
  const py::array w = require<uint8_t>(w_obj, "group_rows: qweight", 2);
  const int64_t n = w.shape(0), k_padded = w.shape(1) * 4, group = bitnet::kStreamGroup;
  py::array_t<uint8_t> out({(n + group - 1) / group, group * w.shape(1)});
  bitnet::group_rows(data<uint8_t>(w), n, k_padded, group, out.mutable_data());
  return out;
}

py::array_t<uint8_t> base3_layout(const py::handle& w_obj, int64_t in_features) {
  const py::array w = require<uint8_t>(w_obj, "base3_layout: qweight", 2);
  const int64_t n = w.shape(0), file_bytes = (in_features + 4) / 5;
  if (in_features < 1 || w.shape(1) != file_bytes) {
    throw py::value_error("base3_layout: in_features=" + std::to_string(in_features) + " needs " +
                          std::to_string(file_bytes) + " base-3 bytes per row, qweight has " +
                          std::to_string(w.shape(1)) + " (docs/formats.md, layout base3)");
  }
  const uint8_t* bytes = data<uint8_t>(w);
  if (std::any_of(bytes, bytes + n * file_bytes, [](uint8_t b) { return b > 242; })) {
    throw py::value_error("base3_layout: qweight holds a byte > 242 = 3^5 - 1, which is not 5 ternary codes");
  }
  const int64_t tiles = (n + bitnet::kStreamGroup - 1) / bitnet::kStreamGroup;
  py::array_t<uint8_t> out({tiles, bitnet::base3_kernel_bytes(n, in_features) / tiles});
  bitnet::base3_kernel_layout(bytes, n, in_features, out.mutable_data());
  return out;
}

py::array_t<int32_t> base3_gemm_int(const py::handle& a_obj, const py::handle& w_obj, int64_t rows) {
  const py::array a = require<int8_t>(a_obj, "base3_gemm_int: a", 2);
  const py::array w = require<uint8_t>(w_obj, "base3_gemm_int: qweight", 2);
  const int64_t k_padded = a.shape(1);
  if (k_padded % bitnet::kBase3ChunkValues != 0 || rows < 1 ||
      w.shape(0) * w.shape(1) != bitnet::base3_kernel_bytes(rows, k_padded)) {
    throw py::value_error("base3_gemm_int: a needs a multiple of 160 columns and qweight base3_layout's " +
                          std::to_string(rows) + " rows of them");
  }
  py::array_t<int32_t> out({a.shape(0), rows});
  const Settings s = settings();
  {
    py::gil_scoped_release nogil;
    bitnet::base3_gemm_int(s.isa, data<int8_t>(a), a.shape(0), data<uint8_t>(w), rows, k_padded, out.mutable_data(),
                           s.threads);
  }
  return out;
}

py::array_t<float> bitlinear_forward(const py::handle& x_obj, const py::handle& w_obj, const py::handle& scales_obj,
                                     int64_t in_features, int64_t rows) {
  const py::array x = require<float>(x_obj, "bitlinear_forward: x", 2);
  const py::array w = require<uint8_t>(w_obj, "bitlinear_forward: qweight", 2);
  const py::array scales = require<float>(scales_obj, "bitlinear_forward: qscale", 1);
  const int64_t m = x.shape(0), k = x.shape(1);
  if (in_features < 1 || k != in_features) {
    throw py::value_error("bitlinear_forward: x has " + std::to_string(k) + " features, in_features is " +
                          std::to_string(in_features));
  }
  const int64_t k_padded = bitnet::padded_features(k);
  const auto [n, group] = ternary_weight(w, k_padded, rows, "bitlinear_forward");
  if (scales.shape(0) != 1 && scales.shape(0) != n) {
    throw py::value_error("bitlinear_forward: qscale needs one value (s_w of the whole weight) or one per row (" +
                          std::to_string(n) + "), got " + std::to_string(scales.shape(0)));
  }
  for (int64_t j = 0; j < scales.shape(0); ++j) {
    const float s_w = data<float>(scales)[j];
    if (!(s_w > 0.0f) || !std::isfinite(s_w)) {
      throw py::value_error("bitlinear_forward: qscale must hold positive multipliers s = 1 / mean|W|, got " +
                            std::to_string(s_w) + " at " + std::to_string(j));
    }
  }
  py::array_t<float> out({m, n});
  const Settings s = settings();
  {
    py::gil_scoped_release nogil;
    std::vector<int8_t> q(m * k_padded);
    std::vector<float> a_scales(m);
    const std::vector<float> w_scales = scales.shape(0) == n
        ? std::vector<float>(data<float>(scales), data<float>(scales) + n)
        : std::vector<float>(n, data<float>(scales)[0]);
    bitnet::quantize_rows(s.isa, data<float>(x), m, k, k_padded, q.data(), a_scales.data(), s.threads);
    const bitnet::TernaryGemm g{q.data(), data<uint8_t>(w), m, n, k_padded, group};
    bitnet::gemm_rescaled(s.isa, g, a_scales.data(), w_scales.data(), out.mutable_data(), s.threads);
  }
  return out;
}

// rows > 0: w is int8_group_rows' layout of that many rows, (ceil(rows / 4), 4 * K16).
py::array_t<float> int8_weight_linear(const py::handle& x_obj, const py::handle& w_obj, const py::handle& scales_obj,
                                      int64_t rows) {
  const py::array x = require<float>(x_obj, "int8_weight_linear: x", 2);
  const py::array w = require<int8_t>(w_obj, "int8_weight_linear: weight", 2);
  const py::array scales = require<float>(scales_obj, "int8_weight_linear: scales", 1);
  const int64_t m = x.shape(0), k = x.shape(1), n = rows > 0 ? rows : w.shape(0);
  if (rows > 0) {
    const int64_t groups = (rows + bitnet::kInt8Group - 1) / bitnet::kInt8Group;
    if (w.shape(0) != groups || w.shape(1) != bitnet::kInt8Group * bitnet::int8_group_padded(k)) {
      throw py::value_error("int8_weight_linear: a grouped weight of " + std::to_string(rows) + " rows of " +
                            std::to_string(k) + " features must have shape (" + std::to_string(groups) + ", " +
                            std::to_string(bitnet::kInt8Group * bitnet::int8_group_padded(k)) + "), got " +
                            str(w.attr("shape")) + " (cpu.int8_group_rows)");
    }
  } else if (w.shape(1) != k) {
    throw py::value_error("int8_weight_linear: x has " + std::to_string(k) + " features, weight has " +
                          std::to_string(w.shape(1)) + " columns");
  }
  if (scales.shape(0) != n) throw py::value_error("int8_weight_linear: need one scale per weight row");
  py::array_t<float> out({m, n});
  const Settings s = settings();
  {
    py::gil_scoped_release nogil;
    bitnet::int8_weight_gemm(s.isa, data<float>(x), m, k, data<int8_t>(w), n, data<float>(scales),
                             out.mutable_data(), s.threads, rows > 0);
  }
  return out;
}

py::array_t<int8_t> int8_group_rows(const py::handle& w_obj) {
  const py::array w = require<int8_t>(w_obj, "int8_group_rows: weight", 2);
  const int64_t n = w.shape(0), k = w.shape(1);
  py::array_t<int8_t> out({(n + bitnet::kInt8Group - 1) / bitnet::kInt8Group, bitnet::kInt8Group * bitnet::int8_group_padded(k)});
  bitnet::int8_group_rows(data<int8_t>(w), n, k, out.mutable_data());
  return out;
}

py::array_t<float> int4_weight_linear(const py::handle& x_obj, const py::handle& w_obj, const py::handle& scales_obj,
                                      int64_t rows) {
  const py::array x = require<float>(x_obj, "int4_weight_linear: x", 2);
  const py::array w = require<uint8_t>(w_obj, "int4_weight_linear: weight", 4);
  const py::array scales = require<float>(scales_obj, "int4_weight_linear: scales", 3);
  const int64_t m = x.shape(0), k = x.shape(1), groups = bitnet::padded_features(k) / bitnet::kInt4Group;
  const int64_t tiles = (rows + bitnet::kStreamGroup - 1) / bitnet::kStreamGroup;
  const std::vector<int64_t> w_shape{tiles, groups, bitnet::kStreamGroup, bitnet::kInt4GroupBytes};
  for (int d = 0; d < 4; ++d) {
    if (w.shape(d) != w_shape[d] || (d < 3 && scales.shape(d) != w_shape[d])) {
      throw py::value_error("int4_weight_linear: " + std::to_string(rows) + " rows of " + std::to_string(k) +
                            " features need weight (" + std::to_string(tiles) + ", " + std::to_string(groups) +
                            ", 4, 64) and scales (" + std::to_string(tiles) + ", " + std::to_string(groups) +
                            ", 4); make them with bitnet_train.kernels.cpu.pack_int4");
    }
  }
  py::array_t<float> out({m, rows});
  const Settings s = settings();
  {
    py::gil_scoped_release nogil;
    bitnet::int4_weight_gemm(s.isa, data<float>(x), m, k, data<uint8_t>(w), data<float>(scales), rows,
                             out.mutable_data(), s.threads);
  }
  return out;
}

// The decoder stack's weights, checked once and held (with references that keep the arrays
// alive) so that a forward step passes only its activations.
class Decoder {
 public:
  Decoder(int64_t hidden, int64_t intermediate, int64_t heads, int64_t kv_heads, float eps,
          const std::string& activation, const py::list& layers, const py::handle& final_norm) {
    if (hidden < 1 || intermediate < 1 || heads < 1 || kv_heads < 1 || hidden % heads != 0 || heads % kv_heads != 0 ||
        (hidden / heads) % 2 != 0) {
      throw py::value_error("Decoder: hidden " + std::to_string(hidden) + ", heads " + std::to_string(heads) +
                            ", kv_heads " + std::to_string(kv_heads) +
                            " do not make an even head_dim shared by whole GQA groups");
    }
    shape_ = {hidden, intermediate, heads, kv_heads, hidden / heads, eps, parse_activation(activation)};
    const int64_t kv = kv_heads * shape_.head_dim;
    arena_ = bitnet::StreamArena(static_cast<int64_t>(layers.size()) *
                                 (grouped(hidden + 2 * kv, hidden) + grouped(hidden, hidden) +
                                  grouped(2 * intermediate, hidden) + grouped(hidden, intermediate)));
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto t = layers[i].cast<py::tuple>();
      if (t.size() != 13) throw py::value_error("Decoder: layer " + std::to_string(i) + " needs 13 entries");
      const std::string at = "Decoder: layer " + std::to_string(i) + " ";
      bitnet::DecoderLayer l;
      l.input_norm = vector(t[0], at + "input_norm", hidden);
      l.qkv = projection(t[1], t[2], at + "qkv", hidden + 2 * kv, hidden);
      l.qkv_bias = optional_vector(t[3], at + "qkv bias", hidden + 2 * kv);
      l.attn_sub_norm = optional_vector(t[4], at + "attn_sub_norm", hidden);
      l.o = projection(t[5], t[6], at + "o", hidden, hidden);
      l.post_norm = vector(t[7], at + "post_norm", hidden);
      l.gate_up = projection(t[8], t[9], at + "gate_up", 2 * intermediate, hidden);
      l.ffn_sub_norm = optional_vector(t[10], at + "ffn_sub_norm", intermediate);
      l.down = projection(t[11], t[12], at + "down", hidden, intermediate);
      layers_.push_back(l);
    }
    final_norm_ = vector(final_norm, "Decoder: final norm", hidden);
  }

  void forward(const py::handle& x_obj, const py::handle& cos_obj, const py::handle& sin_obj,
               const py::handle& k_obj, const py::handle& v_obj, int64_t past) {
    py::array x = require<float>(x_obj, "Decoder.forward: x", 3);
    const py::array cos = require<float>(cos_obj, "Decoder.forward: cos", 2);
    const py::array sin = require<float>(sin_obj, "Decoder.forward: sin", 2);
    py::array k = require<float>(k_obj, "Decoder.forward: k_cache", 5);
    py::array v = require<float>(v_obj, "Decoder.forward: v_cache", 5);
    const int64_t batch = x.shape(0), tokens = x.shape(1), hd = shape_.head_dim;
    if (x.shape(2) != shape_.hidden) throw py::value_error("Decoder.forward: x must be (batch, tokens, hidden)");
    for (const py::array& table : {cos, sin}) {
      if (table.shape(0) != tokens || table.shape(1) != hd) {
        throw py::value_error("Decoder.forward: cos and sin must be (tokens, head_dim)");
      }
    }
    const std::vector<int64_t> cache{static_cast<int64_t>(layers_.size()), batch, shape_.kv_heads, k.shape(3), hd};
    for (const py::array& c : {k, v}) {
      for (int d = 0; d < 5; ++d) {
        if (c.shape(d) != cache[d]) {
          throw py::value_error("Decoder.forward: the caches must be (layers, batch, kv_heads, max_tokens, head_dim) "
                                "= (" + std::to_string(cache[0]) + ", " + std::to_string(batch) + ", " +
                                std::to_string(shape_.kv_heads) + ", max_tokens, " + std::to_string(hd) + ")");
        }
      }
    }
    if (past < 0 || past + tokens > k.shape(3)) {
      throw py::value_error("Decoder.forward: " + std::to_string(past) + " cached and " + std::to_string(tokens) +
                            " new tokens do not fit a cache of " + std::to_string(k.shape(3)));
    }
    const bitnet::DecoderStep step{static_cast<float*>(x.mutable_data()), batch, tokens, past, data<float>(cos),
                                   data<float>(sin), static_cast<float*>(k.mutable_data()),
                                   static_cast<float*>(v.mutable_data()), k.shape(3)};
    const Settings s = settings();
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(workspace_mutex_);  // one step at a time per workspace
    bitnet::decoder_forward(s.isa, shape_, layers_, final_norm_, step, workspace_, s.threads);
  }

  int64_t huge_page_bytes() const { return arena_.huge_page_bytes(); }

  // Switches the per-piece timers on or off; either way the sums start again from zero.
  void set_profiling(bool on) {
    std::lock_guard<std::mutex> lock(workspace_mutex_);
    workspace_.profile = bitnet::DecoderProfile{};
    workspace_.profile.enabled = on;
  }

  py::dict profile() {
    std::lock_guard<std::mutex> lock(workspace_mutex_);
    py::dict out;
    for (int i = 0; i < static_cast<int>(bitnet::Piece::kCount); ++i) {
      out[bitnet::kPieceNames[i]] = workspace_.profile.seconds[i];
    }
    out["steps"] = workspace_.profile.steps;
    return out;
  }

 private:
  const float* vector(const py::handle& obj, const std::string& name, int64_t n) {
    const py::array a = require<float>(obj, name, 1);
    if (a.shape(0) != n) throw py::value_error(name + " must have " + std::to_string(n) + " values");
    keep_.push_back(a);
    return data<float>(a);
  }

  // None: the model has no such tensor (a Llama's sub-norms, a bias-free q/k/v).
  const float* optional_vector(const py::handle& obj, const std::string& name, int64_t n) {
    return obj.is_none() ? nullptr : vector(obj, name, n);
  }

  static bitnet::Activation parse_activation(const std::string& name) {
    if (name == "relu2") return bitnet::Activation::kRelu2;
    if (name == "silu") return bitnet::Activation::kSilu;
    throw py::value_error("Decoder: activation '" + name + "' is not one the decoder computes; use 'relu2' or 'silu'");
  }

  // The decoder reads its own copy of the weights in the streaming layout (group_rows).
  bitnet::Projection projection(const py::handle& w_obj, const py::handle& scales_obj, const std::string& name,
                                int64_t n, int64_t k) {
    const py::array w = require<uint8_t>(w_obj, name + " qweight", 2);
    if (w.shape(0) != n) throw py::value_error(name + " qweight must have " + std::to_string(n) + " rows");
    const int64_t k_padded = bitnet::padded_features(k);
    check_weight(w, k_padded, name);
    uint8_t* out = arena_.take(bitnet::grouped_bytes(n, k_padded, bitnet::kStreamGroup));
    bitnet::group_rows(data<uint8_t>(w), n, k_padded, bitnet::kStreamGroup, out);
    return {out, vector(scales_obj, name + " row scales", n), n, k, bitnet::kStreamGroup};
  }

  // Arena bytes of a projection's grouped rows.
  static int64_t grouped(int64_t n, int64_t k) {
    return bitnet::arena_bytes(bitnet::grouped_bytes(n, bitnet::padded_features(k), bitnet::kStreamGroup));
  }

  bitnet::DecoderShape shape_;
  std::vector<bitnet::DecoderLayer> layers_;
  const float* final_norm_;
  std::vector<py::array> keep_;
  bitnet::StreamArena arena_;  // the grouped weights
  bitnet::DecoderWorkspace workspace_;
  std::mutex workspace_mutex_;
};

// A zeroed buffer of `bytes` in its own StreamArena, which the array's base owns.
py::array_t<uint8_t> huge_page_buffer(int64_t bytes) {
  if (bytes < 1) throw py::value_error("huge_page_buffer: need at least 1 byte, got " + std::to_string(bytes));
  auto* arena = new bitnet::StreamArena(bytes);
  uint8_t* data = arena->take(bytes);
  py::capsule owner(arena, [](void* p) { delete static_cast<bitnet::StreamArena*>(p); });
  return py::array_t<uint8_t>({bytes}, {int64_t{1}}, data, owner);
}

int64_t huge_page_bytes(const py::handle& obj) {
  const py::array a = require<uint8_t>(obj, "huge_page_bytes: buffer", 1);
  return bitnet::mapped_huge_page_bytes(a.data());
}

uint64_t stream_xor(const py::handle& obj) {
  const py::array a = require<uint8_t>(obj, "stream_xor: buffer", 1);
  if (a.shape(0) % 32 != 0) throw py::value_error("stream_xor: the buffer's size must be a multiple of 32 bytes");
  const int threads = settings().threads;
  py::gil_scoped_release nogil;
  return bitnet::stream_xor(data<uint8_t>(a), a.shape(0), threads);
}

const char* backend_name(Isa isa) {
  if (isa == Isa::kAvx512) return "avx512";
  return isa == Isa::kAvx2 ? "avx2" : "scalar";
}

std::vector<std::string> available_backends() {
  std::vector<std::string> names{"scalar"};
  if (bitnet::cpu_has_avx2()) names.emplace_back("avx2");
  if (bitnet::cpu_has_avx512_vnni()) names.emplace_back("avx512");
  return names;
}

void set_backend(const std::string& name) {
  if (name == "auto") {
    settings().isa = best_isa();
  } else if (name == "avx2") {
    if (!bitnet::cpu_has_avx2()) throw py::value_error("set_backend: this CPU lacks AVX2/FMA");
    settings().isa = Isa::kAvx2;
  } else if (name == "avx512") {
    if (!bitnet::cpu_has_avx512_vnni()) throw py::value_error("set_backend: this CPU lacks AVX-512 BW/VNNI");
    settings().isa = Isa::kAvx512;
  } else if (name == "scalar") {
    settings().isa = Isa::kScalar;
  } else {
    throw py::value_error("set_backend: unknown backend '" + name + "'; use 'auto', 'avx512', 'avx2' or 'scalar'");
  }
}

void set_num_threads(int n) {
  if (n < 1) throw py::value_error("set_num_threads: need at least 1 thread, got " + std::to_string(n));
  settings().threads = n;
}

}  // namespace

PYBIND11_MODULE(_cpu_kernels, m) {
  m.doc() = "Ternary-weight x int8-activation CPU kernels (BitNet b1.58); see bitnet_train.kernels.cpu";
  m.def("quantize_activations", &quantize_activations, py::arg("x"),
        "float32 (M, K) -> (int8 (M, Kpad), float32 scale (M,)): per-token absmax, as quant.quantize_int8");
  m.def("ternary_gemm_int", &ternary_gemm_int, py::arg("a"), py::arg("qweight"), py::arg("rows") = 0,
        "int8 (M, Kpad) x packed uint8 (N, Kpad/4) -> exact int32 (M, N) = a @ t^T; with rows = N, qweight "
        "is group_rows' layout");
  m.def("group_rows", &group_rows, py::arg("qweight"),
        "packed uint8 (N, Kpad/4) -> the streaming layout (ceil(N/4), 4 * Kpad/4) the decoder reads");
  m.def("base3_layout", &base3_layout, py::arg("qweight"), py::arg("in_features"),
        "own-1.6 base-3 rows (N, ceil(K/5)) -> the base-3 GEMV's layout (kernels/cpu/base3_kernels.h)");
  m.def("base3_gemm_int", &base3_gemm_int, py::arg("a"), py::arg("qweight"), py::arg("rows"),
        "int8 (M, K160) x base3_layout weights -> exact int32 (M, rows) = a @ t^T; K160 a multiple of 160");
  m.def("bitlinear_forward", &bitlinear_forward, py::arg("x"), py::arg("qweight"), py::arg("qscale"),
        py::arg("in_features"), py::arg("rows") = 0,
        "float32 (M, K) -> float32 (M, N): quantize, integer matmul, rescale by qscale (float32 (1,) or (N,)); "
        "with rows = N, qweight is group_rows' layout");
  m.def("int8_weight_linear", &int8_weight_linear, py::arg("x"), py::arg("weight"), py::arg("scales"),
        py::arg("rows") = 0,
        "float32 (M, K) x int8 (N, K) with per-row float32 scales (N,) -> float32 (M, N); with rows = N, weight "
        "is int8_group_rows' layout");
  m.def("int8_group_rows", &int8_group_rows, py::arg("weight"),
        "int8 (N, K) -> the grouped layout (ceil(N/4), 4 * K16) of kernels/cpu/int8_weights.h, K16 = ceil(K/16) * 16");
  m.def("int4_weight_linear", &int4_weight_linear, py::arg("x"), py::arg("weight"), py::arg("scales"),
        py::arg("rows"), "float32 (M, K) x 4-bit grouped weight (kernels/cpu/int4_weights.h) -> float32 (M, rows)");
  py::class_<Decoder>(m, "Decoder", "the whole decoder stack of a model, one call per forward step")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, float, const std::string&, const py::list&,
                    const py::handle&>(),
           py::arg("hidden"), py::arg("intermediate"), py::arg("heads"), py::arg("kv_heads"), py::arg("eps"),
           py::arg("activation"), py::arg("layers"), py::arg("final_norm"),
           "activation: 'relu2' or 'silu'; layers: per layer (input_norm, qkv qweight, qkv row scales, qkv bias "
           "or None, attn_sub_norm or None, o qweight, o row scales, post_norm, gate_up qweight, gate_up row "
           "scales, ffn_sub_norm or None, down qweight, down row scales); final_norm (hidden,)")
      .def("forward", &Decoder::forward, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("past"),
           "x (batch, tokens, hidden) float32, in place: embeddings in, the final norm of the last hidden state "
           "out; appends the tokens' keys/values to the caches at positions past ..")
      .def("set_profiling", &Decoder::set_profiling, py::arg("on"),
           "time each piece of every forward step (norms, quantize, gemv, attention, rope_cache, glu, residual) "
           "from now on, or stop; the sums restart from zero")
      .def("profile", &Decoder::profile, "seconds per piece summed over the profiled steps, and 'steps'")
      .def("huge_page_bytes", &Decoder::huge_page_bytes,
           "bytes of its grouped weights the kernel backs with 2 MB pages now (kernels/cpu/stream_arena.h)");
  m.def("huge_page_buffer", &huge_page_buffer, py::arg("bytes"),
        "a zeroed uint8 (bytes,) array on 2 MB pages where the kernel grants them (kernels/cpu/stream_arena.h)");
  m.def("huge_page_bytes", &huge_page_bytes, py::arg("buffer"),
        "bytes of a huge_page_buffer the kernel backs with 2 MB pages now");
  m.def("stream_xor", &stream_xor, py::arg("buffer"),
        "XOR of every 8-byte word of a uint8 buffer, read like the GEMVs read weights: times the read bandwidth");
  m.def("set_backend", &set_backend, py::arg("name"), "'auto', 'avx512', 'avx2' or 'scalar'");
  m.def("get_backend", [] { return backend_name(settings().isa); }, "the backend calls run on now");
  m.def("available_backends", &available_backends, "backends this CPU can run");
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("get_num_threads", [] { return settings().threads; });
}
