// fleet's native kernels, bound as `native._core`. Each one has a NumPy
// reference in native/_reference/ with the same signature; tests compare the two.
#include "common.hpp"
#include "json_tensor.hpp"
#include "kernels.hpp"

namespace fleet {

long long require_int(nb::handle obj, const char *name, long long lo, long long hi) {
  const std::string prefix = std::string(name) + ": ";
  if (!PyLong_Check(obj.ptr()) || PyBool_Check(obj.ptr())) throw nb::type_error((prefix + "expected an int").c_str());
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(obj.ptr(), &overflow);
  if (overflow != 0 || value < lo || value > hi)
    throw nb::value_error((prefix + "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]").c_str());
  return value;
}

}  // namespace fleet

NB_MODULE(_core, m) {
  namespace nb = nanobind;
  m.doc() = "fleet's compiled preprocessing kernels";
  if (!fleet::json::init_numpy()) throw nb::python_error();
  // .none(): a None argument reaches the kernel and gets its named TypeError.
  m.def("standardize", &fleet::standardize, nb::arg("x").none(), nb::arg("mean").none(), nb::arg("std").none(),
        nb::arg("clip").none(), nb::arg("out").none() = nb::none(),
        "clip((x - mean) / std, -clip, clip) for float32 x [n, d] in one pass; returns "
        "(out, bad_rows) where bad_rows marks rows holding NaN or +-Inf.");
  m.def("histogram", &fleet::histogram, nb::arg("x").none(), nb::arg("edges").none(), nb::arg("counts").none(),
        "Adds the per-feature bin counts of float32 x [n, d] into int64 counts [d, b + 2] (underflow, the b "
        "bins of edges [d, b + 1], overflow; NaN not counted) and returns counts.");
  m.def("resize_normalize", &fleet::resize_normalize, nb::arg("images").none(), nb::arg("out_h").none(),
        nb::arg("out_w").none(), nb::arg("mean").none(), nb::arg("std").none(), nb::arg("out").none() = nb::none(),
        nb::kw_only(), nb::arg("threads").none() = 1,
        "Bilinear resize (align_corners=False) of uint8 images [h, w] or [h, w, c] to out_h x out_w, then "
        "(v / 255 - mean) / std, into float32 out [n, c, out_h, out_w], over `threads` threads.");
  m.def("check_bounds", &fleet::check_bounds, nb::arg("x").none(), nb::arg("lo").none(), nb::arg("hi").none(),
        nb::arg("first").none(), nb::arg("counts").none(),
        "Input contracts over float32 x [n, d]: first[i] = the first feature of row i that is non-finite or "
        "outside [lo, hi] (-1: none); counts[0, j] += rows with feature j out of range, counts[1, j] += rows "
        "with it non-finite; returns the number of violating rows.");
  m.def("parse_v2_json", &fleet::parse_v2_json, nb::arg("body").none(),
        "orjson.loads(body), except that each inputs[i]['data'] is a NumPy array of the input's datatype "
        "and shape; ValueError with the byte offset for anything malformed.");
  m.def("otlp_spans", &fleet::otlp_spans, nb::arg("traces").none(), nb::arg("offset_ns").none(),
        "The OTLP ScopeSpans.spans fields (protobuf bytes) of finished Trace records "
        "(serving/telemetry/tracing.py) and their children, times plus offset_ns: the bytes of "
        "serving/telemetry/otlp.py's Python encoder.");
}
