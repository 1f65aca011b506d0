// What every kernel's binding shares: array types and argument checks that
// name the argument. Arguments are taken as plain objects and cast without
// implicit conversion: nanobind would otherwise copy a float64 or strided
// array silently (and write `out` into that copy, not the caller's buffer).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace fleet {

namespace nb = nanobind;

template <typename T, size_t Dims>
using In = nb::ndarray<const T, nb::ndim<Dims>, nb::c_contig, nb::device::cpu>;
template <typename T, size_t Dims>
using Out = nb::ndarray<T, nb::numpy, nb::ndim<Dims>, nb::c_contig, nb::device::cpu>;

// Casts `obj` to the array type T without conversion, or raises TypeError(message).
template <typename T>
T require(nb::handle obj, const char *message) {
  T value;
  if (!nb::try_cast<T>(obj, value, /*convert=*/false)) throw nb::type_error(message);
  return value;
}

// A Python int (not a bool) in [lo, hi], or TypeError/ValueError naming `name`.
long long require_int(nb::handle obj, const char *name, long long lo, long long hi);

// A new float32/bool NumPy array of `shape` owning a fresh buffer.
template <typename T, size_t Dims>
Out<T, Dims> new_array(const size_t (&shape)[Dims]) {
  size_t count = 1;
  for (size_t s : shape) count *= s;
  T *buf = new T[count > 0 ? count : 1];
  nb::capsule owner(buf, [](void *p) noexcept { delete[] static_cast<T *>(p); });
  return Out<T, Dims>(buf, Dims, shape, owner);
}

}  // namespace fleet
