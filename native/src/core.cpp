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

static nb::tuple standardize(FloatMatrix x, FloatVector mean, FloatVector std, float clip,
                             nb::object out_obj) {
  const size_t n = x.shape(0), d = x.shape(1);
  if (mean.shape(0) != d) throw nb::value_error("mean: length must equal x.shape[1]");
  if (std.shape(0) != d) throw nb::value_error("std: length must equal x.shape[1]");
  if (!(clip > 0.0f)) throw nb::value_error("clip: must be > 0");
  for (size_t j = 0; j < d; ++j)
    if (!(std.data()[j] > 0.0f)) throw nb::value_error("std: every entry must be > 0");

  OutMatrix out;
  if (out_obj.is_none()) {
    float *buf = new float[n * d > 0 ? n * d : 1];
    nb::capsule owner(buf, [](void *p) noexcept { delete[] static_cast<float *>(p); });
    out = OutMatrix(buf, {n, d}, owner);
  } else {
    if (!nb::try_cast<OutMatrix>(out_obj, out))
      throw nb::type_error("out: must be a C-contiguous float32 array of shape x.shape");
    if (out.shape(0) != n || out.shape(1) != d)
      throw nb::value_error("out: shape must equal x.shape");
  }
  bool *bad_buf = new bool[n > 0 ? n : 1];
  nb::capsule bad_owner(bad_buf, [](void *p) noexcept { delete[] static_cast<bool *>(p); });
  BoolVector bad(bad_buf, {n}, bad_owner);

  {
    nb::gil_scoped_release release;
    standardize_rows(x.data(), mean.data(), std.data(), clip, out.data(), bad_buf, n, d);
  }
  return nb::make_tuple(out, bad);
}

NB_MODULE(_core, m) {
  m.doc() = "fleet's compiled preprocessing kernels";
  m.def("standardize", &standardize, nb::arg("x"), nb::arg("mean"), nb::arg("std"),
        nb::arg("clip"), nb::arg("out") = nb::none(),
        "clip((x - mean) / std, -clip, clip) for float32 x [n, d] in one pass; returns "
        "(out, bad_rows) where bad_rows marks rows holding NaN or +-Inf.");
}
