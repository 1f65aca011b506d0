// standardize: out = clip((x - mean) / std, -clip, clip) and a mask of rows
// holding NaN or +-Inf, in one pass over float32 x [n, d].
#include <cstring>

#include "common.hpp"
#include "kernels.hpp"

namespace fleet {
namespace {

// The loop body is branch-free so that it vectorises: the finiteness test is
// on the exponent bits, the clip is two selects that keep a NaN as it is
// (as np.clip does). `out` may be `x` itself: each element is read before
// it is written, at the same index.
void standardize_rows(const float *x, const float *mean, const float *std, float clip, float *out,
                      bool *bad, size_t n, size_t d) {
  for (size_t i = 0; i < n; ++i) {
    const float *row = x + i * d;
    float *dst = out + i * d;
    uint32_t non_finite = 0;
    for (size_t j = 0; j < d; ++j) {
      float v = row[j];
      uint32_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      non_finite |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
      float z = (v - mean[j]) / std[j];
      z = z < -clip ? -clip : z;
      z = z > clip ? clip : z;
      dst[j] = z;
    }
    bad[i] = non_finite != 0;
  }
}

}  // namespace

nb::tuple standardize(nb::handle x_obj, nb::handle mean_obj, nb::handle std_obj, nb::handle clip_obj,
                      nb::handle out_obj) {
  auto x = require<In<float, 2>>(x_obj, "x: expected a C-contiguous float32 NumPy array with 2 dimension(s)");
  auto mean = require<In<float, 1>>(mean_obj, "mean: expected a C-contiguous float32 NumPy array with 1 dimension(s)");
  auto std = require<In<float, 1>>(std_obj, "std: expected a C-contiguous float32 NumPy array with 1 dimension(s)");
  double clip_d = 0.0;
  if (PyBool_Check(clip_obj.ptr()) || !nb::try_cast<double>(clip_obj, clip_d, /*convert=*/true))
    throw nb::type_error("clip: expected a real number");
  const size_t n = x.shape(0), d = x.shape(1);
  if (mean.shape(0) != d) throw nb::value_error("mean: length must equal x.shape[1]");
  if (std.shape(0) != d) throw nb::value_error("std: length must equal x.shape[1]");
  const float clip = static_cast<float>(clip_d);
  if (!(clip > 0.0f)) throw nb::value_error("clip: must be > 0");
  for (size_t j = 0; j < d; ++j)
    if (!(std.data()[j] > 0.0f)) throw nb::value_error("std: every entry must be > 0");

  Out<float, 2> out;
  nb::object result;
  if (out_obj.is_none()) {
    out = new_array<float, 2>({n, d});
    result = nb::cast(out);
  } else {
    out = require<Out<float, 2>>(out_obj, "out: expected a writable, C-contiguous float32 NumPy array with 2 dimension(s)");
    if (out.shape(0) != n || out.shape(1) != d) throw nb::value_error("out: shape must equal x.shape");
    result = nb::borrow(out_obj);  // the caller's own array, written in place
  }
  auto bad = new_array<bool, 1>({n});
  {
    nb::gil_scoped_release release;
    standardize_rows(x.data(), mean.data(), std.data(), clip, out.data(), bad.data(), n, d);
  }
  return nb::make_tuple(result, bad);
}

}  // namespace fleet
