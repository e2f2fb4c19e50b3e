// Python bindings of the ternary CPU kernels: bitnet_train._cpu_kernels.
//
// Arguments are numpy arrays (torch tensors arrive zero-copy through .numpy() from
// bitnet_train.kernels.cpu). Every argument is checked here, so the kernels can trust shapes;
// compute runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <vector>

#include "ternary_kernels.h"
#include "thread_pool.h"

namespace py = pybind11;
using bitnet::Isa;

namespace {

// Process-wide, changed only with the GIL held; each call copies it before releasing the GIL.
struct Settings {
  Isa isa = bitnet::cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar;
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

py::array_t<int32_t> ternary_gemm_int(const py::handle& a_obj, const py::handle& w_obj) {
  const py::array a = require<int8_t>(a_obj, "ternary_gemm_int: a", 2);
  const py::array w = require<uint8_t>(w_obj, "ternary_gemm_int: qweight", 2);
  const int64_t k_padded = a.shape(1);
  if (k_padded % bitnet::kBlockValues != 0) {
    throw py::value_error("ternary_gemm_int: a has " + std::to_string(k_padded) +
                          " columns; pad activations to a multiple of 128 (quantize_activations does)");
  }
  check_weight(w, k_padded, "ternary_gemm_int");
  const bitnet::TernaryGemm g{data<int8_t>(a), data<uint8_t>(w), a.shape(0), w.shape(0), k_padded};
  py::array_t<int32_t> out({g.m, g.n});
  const Settings s = settings();
  {
    py::gil_scoped_release nogil;
    bitnet::gemm_int(s.isa, g, out.mutable_data(), s.threads);
  }
  return out;
}

py::array_t<float> bitlinear_forward(const py::handle& x_obj, const py::handle& w_obj, float qscale,
                                     int64_t in_features) {
  const py::array x = require<float>(x_obj, "bitlinear_forward: x", 2);
  const py::array w = require<uint8_t>(w_obj, "bitlinear_forward: qweight", 2);
  const int64_t m = x.shape(0), k = x.shape(1);
  if (in_features < 1 || k != in_features) {
    throw py::value_error("bitlinear_forward: x has " + std::to_string(k) + " features, in_features is " +
                          std::to_string(in_features));
  }
  if (!(qscale > 0.0f) || !std::isfinite(qscale)) {
    throw py::value_error("bitlinear_forward: qscale must be the positive multiplier s = 1 / mean|W|, got " +
                          std::to_string(qscale));
  }
  const int64_t k_padded = bitnet::padded_features(k);
  check_weight(w, k_padded, "bitlinear_forward");
  py::array_t<float> out({m, static_cast<int64_t>(w.shape(0))});
  const Settings s = settings();
  {
    py::gil_scoped_release nogil;
    std::vector<int8_t> q(m * k_padded);
    std::vector<float> a_scales(m);
    bitnet::quantize_rows(s.isa, data<float>(x), m, k, k_padded, q.data(), a_scales.data(), s.threads);
    const bitnet::TernaryGemm g{q.data(), data<uint8_t>(w), m, w.shape(0), k_padded};
    bitnet::gemm_rescaled(s.isa, g, a_scales.data(), qscale, out.mutable_data(), s.threads);
  }
  return out;
}

const char* backend_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "scalar"; }

std::vector<std::string> available_backends() {
  std::vector<std::string> names{"scalar"};
  if (bitnet::cpu_has_avx2()) names.emplace_back("avx2");
  return names;
}

void set_backend(const std::string& name) {
  if (name == "auto") {
    settings().isa = bitnet::cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar;
  } else if (name == "avx2") {
    if (!bitnet::cpu_has_avx2()) throw py::value_error("set_backend: this CPU lacks AVX2/FMA");
    settings().isa = Isa::kAvx2;
  } else if (name == "scalar") {
    settings().isa = Isa::kScalar;
  } else {
    throw py::value_error("set_backend: unknown backend '" + name + "'; use 'auto', 'avx2' or 'scalar'");
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
  m.def("ternary_gemm_int", &ternary_gemm_int, py::arg("a"), py::arg("qweight"),
        "int8 (M, Kpad) x packed uint8 (N, Kpad/4) -> exact int32 (M, N) = a @ t^T");
  m.def("bitlinear_forward", &bitlinear_forward, py::arg("x"), py::arg("qweight"), py::arg("qscale"),
        py::arg("in_features"), "float32 (M, K) -> float32 (M, N): quantize, integer matmul, rescale");
  m.def("set_backend", &set_backend, py::arg("name"), "'auto', 'avx2' or 'scalar'");
  m.def("get_backend", [] { return backend_name(settings().isa); }, "the backend calls run on now");
  m.def("available_backends", &available_backends, "backends this CPU can run");
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("get_num_threads", [] { return settings().threads; });
}
