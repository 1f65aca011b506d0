// The kernels as bound into `native._core`; each checks its arguments with
// the messages of its NumPy reference in native/_reference/.
#pragma once

#include "common.hpp"

namespace fleet {

nb::tuple standardize(nb::handle x, nb::handle mean, nb::handle std, nb::handle clip, nb::handle out);
nb::object histogram(nb::handle x, nb::handle edges, nb::handle counts);
nb::object resize_normalize(nb::handle images, nb::handle out_h, nb::handle out_w, nb::handle mean,
                            nb::handle std, nb::handle out, nb::handle threads);
nb::object parse_v2_json(nb::handle body);
nb::object check_bounds(nb::handle x, nb::handle lo, nb::handle hi, nb::handle first, nb::handle counts);
// Not a kernel with a NumPy twin: its reference is serving/telemetry/otlp.py's `_spans` (otlp.cpp).
nb::bytes otlp_spans(nb::handle traces, nb::handle offset_ns);

}  // namespace fleet
