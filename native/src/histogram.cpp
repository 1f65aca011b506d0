// histogram: per-feature bin counts of float32 x [n, d], accumulated into
// int64 counts [d, b + 2]: bin 0 underflow (x < edges[j, 0]), bins 1..b the
// intervals [e_k, e_k+1) with the last one closed (NumPy's convention), bin
// b + 1 overflow (x > edges[j, b]). NaN is counted nowhere.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.hpp"
#include "kernels.hpp"

namespace fleet {
namespace {

// Finding the bin. A per-feature table splits [edges[0], edges[b]] into
// `cells` equal slices, and cell(v) = int((v - lo) * scale) is monotonic in v
// (each rounding step is). So an interior edge in a lower cell than v is <= v,
// one in a higher cell is > v, and only the edges in v's own cell need a
// comparison. table[c] counts the interior edges in cells below c: with at
// most one in cell c (the usual case: cells are narrower than the narrowest
// bin, up to a cap), v's bin is table[c] plus one comparison, exactly, with no
// branch. A cell holding several edges is marked negative and walked.
struct Feature {
  double lo, scale;
  float lo_f, scale_f;  // the same in float, used when (v - lo) * scale cannot overflow a float
  bool in_float;
  float first, last;
  int cells, bins;
  const float *inner;    // the interior edges edges[1..b-1], then +inf: bins entries
  const int32_t *table;  // cells entries
};

template <bool InFloat>
inline int cell(const Feature &f, float v) {
  const int c = InFloat ? static_cast<int>((v - f.lo_f) * f.scale_f)
                        : static_cast<int>((static_cast<double>(v) - f.lo) * f.scale);
  return c < f.cells ? c : f.cells - 1;
}

struct Tables {
  std::vector<Feature> features;
  std::vector<float> inner;
  std::vector<int32_t> table;
};

void build_tables(const float *edges, size_t d, int bins, Tables &t) {
  t.features.resize(d);
  t.inner.resize(d * bins);
  std::vector<size_t> offsets(d);
  for (size_t j = 0; j < d; ++j) {
    const float *e = edges + j * (bins + 1);
    const double range = static_cast<double>(e[bins]) - e[0];
    double min_gap = range;
    for (int k = 0; k < bins; ++k) min_gap = std::min(min_gap, static_cast<double>(e[k + 1]) - e[k]);
    Feature &f = t.features[j];
    f.cells = static_cast<int>(std::min(std::ceil(4.0 * range / min_gap), 4.0 * bins + 64.0));
    f.lo = e[0];
    f.scale = f.cells / range;
    f.lo_f = e[0];
    f.scale_f = static_cast<float>(f.scale);
    f.in_float = std::isfinite(static_cast<float>(range)) && range < 1e30 && std::isfinite(f.scale_f) &&
                 f.scale_f > 0.0f;
    f.first = e[0];
    f.last = e[bins];
    f.bins = bins;
    float *inner = t.inner.data() + j * bins;
    for (int k = 0; k < bins - 1; ++k) inner[k] = e[k + 1];
    inner[bins - 1] = std::numeric_limits<float>::infinity();
    offsets[j] = t.table.size();
    std::vector<int32_t> in_cell(f.cells, 0);
    for (int k = 0; k < bins - 1; ++k) ++in_cell[f.in_float ? cell<true>(f, inner[k]) : cell<false>(f, inner[k])];
    int32_t below = 0;
    for (int c = 0; c < f.cells; ++c) {
      t.table.push_back(in_cell[c] > 1 ? -1 - below : below);
      below += in_cell[c];
    }
  }
  for (size_t j = 0; j < d; ++j) {
    t.features[j].inner = t.inner.data() + j * bins;
    t.features[j].table = t.table.data() + offsets[j];
  }
}

// Counts rows [begin, end) of feature f (column j of x, d columns) into
// local[0..bins+1]: 0 underflow, k+1 bin k, bins+1 overflow; NaN nowhere.
template <bool InFloat>
void count_block(const Feature &f, const float *x, size_t d, size_t begin, size_t end, int64_t *local) {
  const float *inner = f.inner;
  const float first = f.first, last = f.last;
  for (size_t i = begin; i < end; ++i) {
    const float v = x[i * d];
    if (v >= first && v <= last) {
      int k = f.table[cell<InFloat>(f, v)];
      if (k >= 0) {
        k += static_cast<int>(v >= inner[k]);
      } else {
        for (k = -1 - k; v >= inner[k]; ++k) {
        }
      }
      ++local[k + 1];
    } else if (v < first) {
      ++local[0];
    } else if (v > last) {
      ++local[f.bins + 1];
    }  // else NaN
  }
}

constexpr size_t kSmallBatch = 64;  // rows below which the tables do not pay for themselves

}  // namespace

nb::object histogram(nb::handle x_obj, nb::handle edges_obj, nb::handle counts_obj) {
  auto x = require<In<float, 2>>(x_obj, "x: expected a C-contiguous float32 NumPy array with 2 dimension(s)");
  auto edges = require<In<float, 2>>(edges_obj, "edges: expected a C-contiguous float32 NumPy array with 2 dimension(s)");
  auto counts = require<Out<int64_t, 2>>(
      counts_obj, "counts: expected a writable, C-contiguous int64 NumPy array with 2 dimension(s)");
  const size_t n = x.shape(0), d = x.shape(1);
  if (edges.shape(0) != d) throw nb::value_error("edges: must have one row per feature (x.shape[1] rows)");
  if (edges.shape(1) < 2) throw nb::value_error("edges: each row needs at least 2 edges (1 bin)");
  if (edges.shape(1) > (1u << 24)) throw nb::value_error("edges: at most 2**24 edges per feature");
  const int bins = static_cast<int>(edges.shape(1)) - 1;
  if (counts.shape(0) != d || counts.shape(1) != static_cast<size_t>(bins) + 2)
    throw nb::value_error("counts: shape must be (x.shape[1], edges.shape[1] + 1)");
  const float *e = edges.data();
  for (size_t j = 0; j < d; ++j) {
    const float *row = e + j * (bins + 1);
    for (int k = 0; k <= bins; ++k) {
      if (!std::isfinite(row[k]) || (k > 0 && !(row[k - 1] < row[k])))
        throw nb::value_error("edges: every row must be finite and strictly increasing");
    }
  }
  {
    nb::gil_scoped_release release;
    if (n < kSmallBatch) {
      // A few rows (a serving batch): building the lookup tables would cost more than a
      // binary search of each value among its feature's edges.
      int64_t *total = counts.data();
      const float *xs = x.data();
      for (size_t i = 0; i < n; ++i)
        for (size_t j = 0; j < d; ++j) {
          const float v = xs[i * d + j];
          const float *row = e + j * (bins + 1);
          int64_t *c = total + j * (bins + 2);
          if (v < row[0]) {
            ++c[0];
          } else if (v > row[bins]) {
            ++c[bins + 1];
          } else if (v == row[bins]) {
            ++c[bins];  // the last bin is closed
          } else if (v == v) {
            ++c[std::upper_bound(row, row + bins + 1, v) - row];  // 1 + the bin: edges[k] <= v < edges[k+1]
          }
        }
    } else {
      Tables tables;
      build_tables(e, d, bins, tables);
      // Blocks of rows small enough to stay in L1 while each feature's column
      // is counted into a private array, added to `counts` once at the end.
      constexpr size_t kBlockBytes = 16 * 1024;
      const size_t block = std::max<size_t>(1, kBlockBytes / (sizeof(float) * std::max<size_t>(d, 1)));
      const size_t slots = static_cast<size_t>(bins) + 2;
      std::vector<int64_t> local(d * slots, 0);
      for (size_t begin = 0; begin < n; begin += block)
        for (size_t j = 0; j < d; ++j)
          (tables.features[j].in_float ? count_block<true> : count_block<false>)(
              tables.features[j], x.data() + j, d, begin, std::min(n, begin + block), local.data() + j * slots);
      int64_t *total = counts.data();
      for (size_t j = 0; j < d; ++j)
        for (int k = 0; k < bins + 2; ++k) total[j * (bins + 2) + k] += local[j * slots + k];
    }
  }
  return nb::borrow(counts_obj);
}

}  // namespace fleet
