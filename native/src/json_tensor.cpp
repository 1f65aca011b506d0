// A v2 input's `data`: tokenizing and converting to NumPy. See json_tensor.hpp.
#include "json_tensor.hpp"

#include "json_direct.hpp"

#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <utility>

namespace fleet::json {
namespace {

constexpr size_t kNone = static_cast<size_t>(-1);
constexpr size_t kMaxDims = 32;
constexpr size_t kReleaseAbove = size_t{1} << 15;  // elements: converting fewer is not worth a GIL round trip

enum class Kind { Bool, Int, UInt, Float, Half, Bytes };

struct DType {
  const char *name, *numpy;
  Kind kind;
  int bits;
};

constexpr DType kTypes[] = {
    {"BOOL", "bool", Kind::Bool, 8},       {"INT8", "int8", Kind::Int, 8},
    {"INT16", "int16", Kind::Int, 16},     {"INT32", "int32", Kind::Int, 32},
    {"INT64", "int64", Kind::Int, 64},     {"UINT8", "uint8", Kind::UInt, 8},
    {"UINT16", "uint16", Kind::UInt, 16},  {"UINT32", "uint32", Kind::UInt, 32},
    {"UINT64", "uint64", Kind::UInt, 64},  {"FP16", "float16", Kind::Half, 16},
    {"FP32", "float32", Kind::Float, 32},  {"FP64", "float64", Kind::Float, 64},
    {"BYTES", "object", Kind::Bytes, 0},
};
constexpr size_t kNumTypes = sizeof(kTypes) / sizeof(kTypes[0]);
constexpr const char *kTypeList = "BOOL, BYTES, FP16, FP32, FP64, INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64";

// numpy.empty and the dtypes, looked up at import (init_numpy) and kept for
// the process's life.
struct NumPy {
  PyObject *empty = nullptr;
  PyObject *dtypes[kNumTypes] = {};
};
NumPy np_cache;

void push_leaf(Cursor &c, TensorTokens &t, Leaf kind, uint64_t value, const char *at) {
  t.kinds.push_back(kind);
  t.values.push_back(value);
  if (t.record_offsets) t.offsets.push_back(static_cast<size_t>(at - c.begin));
}

void tokenize(Cursor &c, int depth, TensorTokens &t, std::string &scratch) {
  if (depth + 1 > kMaxDepth) c.fail(c.p, "nesting depth limit (1024) exceeded");
  ++c.p;  // '['
  if (c.peek("a JSON value or ']'") == ']') {
    ++c.p;
    return;
  }
  for (;;) {
    const char ch = c.peek("a JSON value");
    const char *at = c.p;
    if (ch == '-' || static_cast<unsigned char>(ch - '0') < 10) {
      Number n = scan_number(c);
      uint64_t bits;
      std::memcpy(&bits, &n.u, sizeof bits);
      push_leaf(c, t, n.kind == NumberKind::Int ? Leaf::Int : n.kind == NumberKind::UInt ? Leaf::UInt : Leaf::Float,
                bits, at);
    } else if (ch == '[') {
      tokenize(c, depth + 1, t, scratch);
    } else if (ch == '"') {
      const char *s;
      size_t n;
      scan_string(c, s, n, scratch);
      if (!s) s = scratch.data();
      const uint64_t entry = t.strings.size();
      const uint64_t size = n;
      t.strings.append(reinterpret_cast<const char *>(&size), sizeof size);
      t.strings.append(s, n);
      push_leaf(c, t, Leaf::String, entry, at);
    } else if (ch == 't') {
      c.literal("true", 4);
      push_leaf(c, t, Leaf::True, 0, at);
    } else if (ch == 'f') {
      c.literal("false", 5);
      push_leaf(c, t, Leaf::False, 0, at);
    } else if (ch == 'n') {
      c.literal("null", 4);
      push_leaf(c, t, Leaf::Null, 0, at);
    } else if (ch == '{') {
      skip_value(c, depth + 1);
      push_leaf(c, t, Leaf::Object, 0, at);
    } else {
      c.fail(c.p, "expected a JSON value");
    }
    const char next = c.peek("',' or ']'");
    ++c.p;
    if (next == ']') return;
    if (next != ',') c.fail(c.p - 1, "expected ',' or ']'");
  }
}

// The first element a datatype refuses, and why.
enum class Why { None, NotBool, NotNumber, NotInteger, Range, NotString };
struct Bad {
  size_t index = kNone;
  Why why = Why::None;
};

inline double as_double(Leaf kind, uint64_t bits) {
  if (kind == Leaf::Int) return static_cast<double>(static_cast<int64_t>(bits));
  if (kind == Leaf::UInt) return static_cast<double>(bits);
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}

template <typename T>
Bad fill_int(const TensorTokens &t, T *out) {
  const size_t n = t.kinds.size();
  for (size_t i = 0; i < n; ++i) {
    const Leaf kind = t.kinds[i];
    const uint64_t bits = t.values[i];
    if (kind == Leaf::Int) {
      const auto v = static_cast<int64_t>(bits);
      if constexpr (std::is_signed_v<T>) {
        if (v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max()) return {i, Why::Range};
      } else {
        if (v < 0 || static_cast<uint64_t>(v) > std::numeric_limits<T>::max()) return {i, Why::Range};
      }
      out[i] = static_cast<T>(v);
    } else if (kind == Leaf::UInt) {
      if (bits > static_cast<uint64_t>(std::numeric_limits<T>::max())) return {i, Why::Range};
      out[i] = static_cast<T>(bits);
    } else {
      return {i, kind == Leaf::Float ? Why::NotInteger : Why::NotNumber};
    }
  }
  return {};
}

template <typename T>
constexpr bool kIsFloat = std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, Half>;

// FP16, FP32, FP64: the element's double, then rounded to the type once (as
// numpy's float64 -> float32/float16 cast); overflow to inf refused.
template <typename T>
Bad fill_float(const TensorTokens &t, T *out) {
  const size_t n = t.kinds.size();
  for (size_t i = 0; i < n; ++i) {
    const Leaf kind = t.kinds[i];
    if (kind > Leaf::Float) return {i, Why::NotNumber};
    const double d = as_double(kind, t.values[i]);
    if constexpr (std::is_same_v<T, Half>) {
      const uint16_t h = double_to_half_bits(d);
      if ((h & 0x7C00) == 0x7C00) return {i, Why::Range};
      out[i].bits = h;
    } else {
      const T v = static_cast<T>(d);
      if (!std::isfinite(v)) return {i, Why::Range};
      out[i] = v;
    }
  }
  return {};
}

Bad fill_bool(const TensorTokens &t, bool *out) {
  const size_t n = t.kinds.size();
  for (size_t i = 0; i < n; ++i) {
    const Leaf kind = t.kinds[i];
    if (kind != Leaf::True && kind != Leaf::False) return {i, Why::NotBool};
    out[i] = kind == Leaf::True;
  }
  return {};
}

// Calls fn with `out` as a pointer to the element type of a numeric datatype.
template <typename Fn>
bool visit_numeric(const DType &type, void *out, Fn &&fn) {
  switch (type.kind) {
    case Kind::Half: return fn(static_cast<Half *>(out));
    case Kind::Float: return type.bits == 32 ? fn(static_cast<float *>(out)) : fn(static_cast<double *>(out));
    case Kind::Int:
      switch (type.bits) {
        case 8: return fn(static_cast<int8_t *>(out));
        case 16: return fn(static_cast<int16_t *>(out));
        case 32: return fn(static_cast<int32_t *>(out));
        default: return fn(static_cast<int64_t *>(out));
      }
    case Kind::UInt:
      switch (type.bits) {
        case 8: return fn(static_cast<uint8_t *>(out));
        case 16: return fn(static_cast<uint16_t *>(out));
        case 32: return fn(static_cast<uint32_t *>(out));
        default: return fn(static_cast<uint64_t *>(out));
      }
    default: return false;
  }
}

Bad fill(const TensorTokens &t, const DType &type, void *out) {
  if (type.kind == Kind::Bool) return fill_bool(t, static_cast<bool *>(out));
  Bad bad;
  visit_numeric(type, out, [&](auto *typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    if constexpr (kIsFloat<T>) bad = fill_float(t, typed);
    else bad = fill_int(t, typed);
    return true;
  });
  return bad;
}

std::string expected(const DType &type, Why why) {
  const std::string name = type.name;
  switch (type.kind) {
    case Kind::Bool: return "expected true or false for BOOL";
    case Kind::Bytes: return "expected a string for BYTES";
    case Kind::Half:
    case Kind::Float: return why == Why::Range ? "expected a number that fits " + name : "expected a number for " + name;
    default: break;
  }
  if (why != Why::Range) return "expected an integer for " + name;
  const bool is_signed = type.kind == Kind::Int;
  const uint64_t hi = type.bits == 64 ? (is_signed ? uint64_t{INT64_MAX} : UINT64_MAX)
                                      : (uint64_t{1} << (type.bits - (is_signed ? 1 : 0))) - 1;
  const std::string lo = is_signed ? "-" + std::to_string(hi + 1) : "0";
  return "expected an integer in [" + lo + ", " + std::to_string(hi) + "] for " + name;
}

const DType *lookup_type(PyObject *datatype) {
  if (!datatype || !PyUnicode_Check(datatype)) return nullptr;
  Py_ssize_t size;
  const char *name = PyUnicode_AsUTF8AndSize(datatype, &size);
  if (!name) {
    PyErr_Clear();
    return nullptr;
  }
  for (const DType &type : kTypes)
    if (std::strlen(type.name) == static_cast<size_t>(size) && std::memcmp(type.name, name, size) == 0) return &type;
  return nullptr;
}

const DType &find_type(PyObject *datatype, const std::string &where, size_t offset) {
  if (!datatype) throw JsonError(offset, where + ": 'data' needs a 'datatype', one of " + kTypeList);
  if (const DType *type = lookup_type(datatype)) return *type;
  throw JsonError(offset, where + ": unknown 'datatype', expected one of " + kTypeList);
}

// The shape as a tuple (new reference) and its element count, or JsonError.
PyObject *shape_tuple(PyObject *shape, const std::string &where, size_t offset, size_t &count, std::string &text) {
  const std::string what = where + ": 'shape' must be a list of at most 32 non-negative integers";
  if (!shape || !PyList_Check(shape) || static_cast<size_t>(PyList_GET_SIZE(shape)) > kMaxDims)
    throw JsonError(offset, what);
  const Py_ssize_t ndim = PyList_GET_SIZE(shape);
  uint64_t product = 1;
  bool zero = false;
  text = "[";
  for (Py_ssize_t k = 0; k < ndim; ++k) {
    PyObject *item = PyList_GET_ITEM(shape, k);
    if (!PyLong_CheckExact(item)) throw JsonError(offset, what);
    int overflow = 0;
    const long long dim = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow > 0) throw JsonError(offset, where + ": 'shape' is too large");
    if (overflow < 0 || dim < 0) throw JsonError(offset, what);
    if (dim == 0) zero = true;
    else if (__builtin_mul_overflow(product, static_cast<uint64_t>(dim), &product) || product > (uint64_t{1} << 62))
      throw JsonError(offset, where + ": 'shape' is too large");
    text += (k ? ", " : "") + std::to_string(dim);
  }
  text += "]";
  count = zero ? 0 : static_cast<size_t>(product);
  PyObject *tuple = PyList_AsTuple(shape);
  if (!tuple) throw std::bad_alloc();
  return tuple;
}

size_t element_offset(const TensorTokens &t, size_t index, const Cursor &body) {
  TensorTokens again;
  again.record_offsets = true;
  Cursor c{body.begin, t.start, body.end};
  std::string scratch;
  tokenize(c, 0, again, scratch);
  return index < again.offsets.size() ? again.offsets[index] : static_cast<size_t>(t.start - body.begin);
}

struct Ref {  // a new reference, released unless taken
  PyObject *p;
  ~Ref() { Py_XDECREF(p); }
  PyObject *take() { return std::exchange(p, nullptr); }
};

bool direct(Cursor &c, int depth, const DType &type, void *out, size_t count) {
  return visit_numeric(type, out, [&](auto *typed) { return read_direct(c, depth, typed, count); });
}

struct Buffer {  // a writable view of a new array, released on every way out
  Py_buffer view{};
  bool held = false;
  ~Buffer() {
    if (held) PyBuffer_Release(&view);
  }
};

}  // namespace

PyObject *tensor_direct(Cursor &c, int depth, PyObject *datatype, PyObject *shape, bool release_gil) {
  const DType *type = lookup_type(datatype);
  if (!type || type->kind == Kind::Bool || type->kind == Kind::Bytes) return nullptr;
  size_t count;
  std::string text;
  Ref tuple{nullptr};
  try {
    tuple.p = shape_tuple(shape, "", 0, count, text);
  } catch (const JsonError &) {
    return nullptr;
  }
  // Each value takes a digit and a separator at least: a shape the rest of the body cannot hold is
  // never allocated (the token path counts the values first and says what is wrong).
  if (count > static_cast<size_t>(c.end - c.p) / 2) return nullptr;
  Ref array{PyObject_CallFunctionObjArgs(np_cache.empty, tuple.p, np_cache.dtypes[type - kTypes], nullptr)};
  Buffer buffer;
  if (!array.p || PyObject_GetBuffer(array.p, &buffer.view, PyBUF_WRITABLE) < 0) {
    PyErr_Clear();
    return nullptr;
  }
  buffer.held = true;
  const char *start = c.p;
  bool ok;
  if (release_gil) {
    PyThreadState *state = PyEval_SaveThread();
    try {
      ok = direct(c, depth, *type, buffer.view.buf, count);
    } catch (...) {
      PyEval_RestoreThread(state);
      throw;
    }
    PyEval_RestoreThread(state);
  } else {
    ok = direct(c, depth, *type, buffer.view.buf, count);
  }
  if (!ok) {
    c.p = start;
    return nullptr;
  }
  return array.take();
}

bool init_numpy() {
  PyObject *module = PyImport_ImportModule("numpy");
  if (!module) return false;
  PyObject *dtype = PyObject_GetAttrString(module, "dtype");
  np_cache.empty = PyObject_GetAttrString(module, "empty");
  Py_DECREF(module);
  bool ok = dtype && np_cache.empty;
  for (size_t i = 0; i < kNumTypes && ok; ++i)
    ok = (np_cache.dtypes[i] = PyObject_CallFunction(dtype, "s", kTypes[i].numpy)) != nullptr;
  Py_XDECREF(dtype);
  return ok;
}

void tokenize_data(Cursor &c, int depth, TensorTokens &tokens) {
  std::string scratch;
  tokens.start = c.p;
  tokenize(c, depth, tokens, scratch);
}

PyObject *tensor_from_tokens(const TensorTokens &t, PyObject *input, size_t index, size_t object_offset,
                             const Cursor &c) {
  const std::string where = "inputs[" + std::to_string(index) + "]";
  const DType &type = find_type(PyDict_GetItemString(input, "datatype"), where, object_offset);
  size_t count;
  std::string shape_text;
  Ref shape{shape_tuple(PyDict_GetItemString(input, "shape"), where, object_offset, count, shape_text)};
  const size_t data_offset = static_cast<size_t>(t.start - c.begin);
  if (t.kinds.size() != count)
    throw JsonError(data_offset, where + ".data: shape " + shape_text + " needs " + std::to_string(count) +
                                     " values, 'data' has " + std::to_string(t.kinds.size()));
  const NumPy &np = np_cache;
  const size_t type_index = static_cast<size_t>(&type - kTypes);
  Bad bad;
  Ref array{nullptr};
  if (type.kind == Kind::Bytes) {
    Ref flat{PyObject_CallFunction(np.empty, "nO", static_cast<Py_ssize_t>(count), np.dtypes[type_index])};
    if (!flat.p) return nullptr;
    for (size_t i = 0; i < count && bad.index == kNone; ++i) {
      if (t.kinds[i] != Leaf::String) {
        bad = {i, Why::NotString};
        break;
      }
      uint64_t size;
      std::memcpy(&size, t.strings.data() + t.values[i], sizeof size);
      PyObject *item = PyBytes_FromStringAndSize(t.strings.data() + t.values[i] + sizeof size, size);
      if (!item || PySequence_SetItem(flat.p, static_cast<Py_ssize_t>(i), item) < 0) {
        Py_XDECREF(item);
        return nullptr;
      }
      Py_DECREF(item);
    }
    if (bad.index == kNone) array.p = PyObject_CallMethod(flat.p, "reshape", "(O)", shape.p);
  } else {
    array.p = PyObject_CallFunctionObjArgs(np.empty, shape.p, np.dtypes[type_index], nullptr);
    if (!array.p) return nullptr;
    Py_buffer view;
    if (PyObject_GetBuffer(array.p, &view, PyBUF_WRITABLE) < 0) return nullptr;
    if (count >= kReleaseAbove) {
      Py_BEGIN_ALLOW_THREADS
      bad = fill(t, type, view.buf);
      Py_END_ALLOW_THREADS
    } else {
      bad = fill(t, type, view.buf);
    }
    PyBuffer_Release(&view);
  }
  if (bad.index != kNone)
    throw JsonError(element_offset(t, bad.index, c),
                    where + ".data[" + std::to_string(bad.index) + "]: " + expected(type, bad.why));
  return array.take();
}

}  // namespace fleet::json
