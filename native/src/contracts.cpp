// check_bounds: the input contracts' range and finiteness rules over float32 x [n, d].
// For each row, first[i] is the first feature j whose value is non-finite or outside
// [lo[j], hi[j]] (-1: none); counts[0, j] adds the rows whose feature j is finite but out of
// range, counts[1, j] those where it is NaN or +-Inf. Returns the number of violating rows.
// An infinite bound is no bound (lo = -inf, hi = +inf accepts every finite value).
#include <cmath>

#include "common.hpp"
#include "kernels.hpp"

namespace fleet {

nb::object check_bounds(nb::handle x_obj, nb::handle lo_obj, nb::handle hi_obj, nb::handle first_obj,
                        nb::handle counts_obj) {
  auto x = require<In<float, 2>>(x_obj, "x: expected a C-contiguous float32 NumPy array with 2 dimension(s)");
  auto lo = require<In<float, 1>>(lo_obj, "lo: expected a C-contiguous float32 NumPy array with 1 dimension(s)");
  auto hi = require<In<float, 1>>(hi_obj, "hi: expected a C-contiguous float32 NumPy array with 1 dimension(s)");
  auto first = require<Out<int32_t, 1>>(
      first_obj, "first: expected a writable, C-contiguous int32 NumPy array with 1 dimension(s)");
  auto counts = require<Out<int64_t, 2>>(
      counts_obj, "counts: expected a writable, C-contiguous int64 NumPy array with 2 dimension(s)");
  const size_t n = x.shape(0), d = x.shape(1);
  if (lo.shape(0) != d) throw nb::value_error("lo: length must equal x.shape[1]");
  if (hi.shape(0) != d) throw nb::value_error("hi: length must equal x.shape[1]");
  if (first.shape(0) != n) throw nb::value_error("first: length must equal x.shape[0]");
  if (counts.shape(0) != 2 || counts.shape(1) != d) throw nb::value_error("counts: shape must be (2, x.shape[1])");
  for (size_t j = 0; j < d; ++j)
    if (std::isnan(lo.data()[j]) || std::isnan(hi.data()[j]) || lo.data()[j] > hi.data()[j])
      throw nb::value_error("lo, hi: bounds must not be NaN and lo <= hi");
  long long bad_rows = 0;
  {
    nb::gil_scoped_release release;
    const float *xs = x.data(), *l = lo.data(), *h = hi.data();
    int32_t *f = first.data();
    int64_t *out_of_range = counts.data(), *non_finite = counts.data() + d;
    for (size_t i = 0; i < n; ++i) {
      const float *row = xs + i * d;
      int32_t where = -1;
      for (size_t j = 0; j < d; ++j) {
        const float v = row[j];
        // One comparison pair for the common case: a finite value inside its bounds.
        if (v >= l[j] && v <= h[j] && std::isfinite(v)) continue;
        if (std::isfinite(v)) {
          ++out_of_range[j];
        } else {
          ++non_finite[j];
        }
        if (where < 0) where = static_cast<int32_t>(j);
      }
      f[i] = where;
      bad_rows += where >= 0;
    }
  }
  return nb::int_(bad_rows);
}

}  // namespace fleet
