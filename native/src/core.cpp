// fleet's native kernels. Each one has a NumPy reference in native/_reference.py
// with the same signature; tests compare the two.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <utility>

namespace nb = nanobind;

using FloatMatrix = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using FloatVector = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using OutMatrix = nb::ndarray<float, nb::numpy, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using BoolVector = nb::ndarray<bool, nb::numpy, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

namespace {

// One pass over x: out = clip((x - mean) / std, -clip, clip), and bad[i] set
// when row i holds a NaN or an infinity (those rows are left as computed).
void standardize_rows(const float *x, const float *mean, const float *std, float clip,
                      float *out, bool *bad, size_t n, size_t d) {
  for (size_t i = 0; i < n; ++i) {
    const float *row = x + i * d;
    float *dst = out + i * d;
    bool row_bad = false;
    for (size_t j = 0; j < d; ++j) {
      float v = row[j];
      row_bad |= !std::isfinite(v);
      float z = (v - mean[j]) / std[j];
      z = z < -clip ? -clip : (z > clip ? clip : z);
      dst[j] = z;
    }
    bad[i] = row_bad;
  }
}

}  // namespace

// Arguments are taken as plain objects and cast without implicit conversion:
// nanobind would otherwise copy a float64 or strided array silently (and write
// `out` into that copy, not the caller's buffer). Each error names its argument,
// with the messages of the NumPy reference.
template <typename T>
static T require(nb::handle obj, const char *message) {
  T value;
  if (!nb::try_cast<T>(obj, value, /*convert=*/false)) throw nb::type_error(message);
  return value;
}

static nb::tuple standardize(nb::handle x_obj, nb::handle mean_obj, nb::handle std_obj,
                             nb::handle clip_obj, nb::handle out_obj) {
  auto x = require<FloatMatrix>(x_obj, "x: expected a C-contiguous float32 NumPy array with 2 dimension(s)");
  auto mean = require<FloatVector>(mean_obj, "mean: expected a C-contiguous float32 NumPy array with 1 dimension(s)");
  auto std = require<FloatVector>(std_obj, "std: expected a C-contiguous float32 NumPy array with 1 dimension(s)");
  double clip_d;
  if (PyBool_Check(clip_obj.ptr()) || !nb::try_cast<double>(clip_obj, clip_d, /*convert=*/true))
    throw nb::type_error("clip: expected a real number");
  const size_t n = x.shape(0), d = x.shape(1);
  if (mean.shape(0) != d) throw nb::value_error("mean: length must equal x.shape[1]");
  if (std.shape(0) != d) throw nb::value_error("std: length must equal x.shape[1]");
  const float clip = static_cast<float>(clip_d);
  if (!(clip > 0.0f)) throw nb::value_error("clip: must be > 0");
  for (size_t j = 0; j < d; ++j)
    if (!(std.data()[j] > 0.0f)) throw nb::value_error("std: every entry must be > 0");

  OutMatrix out;
  nb::object result;
  if (out_obj.is_none()) {
    float *buf = new float[n * d > 0 ? n * d : 1];
    nb::capsule owner(buf, [](void *p) noexcept { delete[] static_cast<float *>(p); });
    out = OutMatrix(buf, {n, d}, owner);
    result = nb::cast(out);
  } else {
    out = require<OutMatrix>(out_obj, "out: expected a writable, C-contiguous float32 NumPy array with 2 dimension(s)");
    if (out.shape(0) != n || out.shape(1) != d) throw nb::value_error("out: shape must equal x.shape");
    result = nb::borrow(out_obj);  // the caller's own array, written in place
  }
  bool *bad_buf = new bool[n > 0 ? n : 1];
  nb::capsule bad_owner(bad_buf, [](void *p) noexcept { delete[] static_cast<bool *>(p); });
  BoolVector bad(bad_buf, {n}, bad_owner);

  {
    nb::gil_scoped_release release;
    standardize_rows(x.data(), mean.data(), std.data(), clip, out.data(), bad_buf, n, d);
  }
  return nb::make_tuple(result, bad);
}

NB_MODULE(_core, m) {
  m.doc() = "fleet's compiled preprocessing kernels";
  // .none(): a None argument reaches `standardize` and gets its named TypeError.
  m.def("standardize", &standardize, nb::arg("x").none(), nb::arg("mean").none(), nb::arg("std").none(),
        nb::arg("clip").none(), nb::arg("out").none() = nb::none(),
        "clip((x - mean) / std, -clip, clip) for float32 x [n, d] in one pass; returns "
        "(out, bad_rows) where bad_rows marks rows holding NaN or +-Inf.");
}
