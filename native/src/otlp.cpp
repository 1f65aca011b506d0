// OTLP span encoding (`native._core.otlp_spans`): the ScopeSpans.spans fields of fleet's finished traces, the
// same bytes as serving/telemetry/otlp.py's `_spans` (the reference; tests compare the two), written straight
// from the `Trace` records (serving/telemetry/tracing.py) in one pass, about a sixth of the Python encoder's time.
//
// A Trace has: trace_id (int, 128 bit), span_id, parent_id (int, 64 bit; parent 0: a root), name (str), kind
// (an opentelemetry SpanKind: its .value + 1 is OTLP's), start_ns, end_ns (monotonic ns; offset_ns added),
// attributes (dict or None: `fleet.<key>` = value, None values left out), links (list of (trace id, span id)
// or None), error (str or None: the status), children (list of (name, start_ns, end_ns, span id or 0: a
// random one)).
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>

#include "kernels.hpp"

namespace fleet {

namespace {

struct Names {
  PyObject *trace_id, *span_id, *parent_id, *name, *kind, *start_ns, *end_ns, *attributes, *links, *error,
      *children, *value;
};

const Names &names() {
  static const Names n = {
      PyUnicode_InternFromString("trace_id"), PyUnicode_InternFromString("span_id"),
      PyUnicode_InternFromString("parent_id"), PyUnicode_InternFromString("name"),
      PyUnicode_InternFromString("kind"), PyUnicode_InternFromString("start_ns"),
      PyUnicode_InternFromString("end_ns"), PyUnicode_InternFromString("attributes"),
      PyUnicode_InternFromString("links"), PyUnicode_InternFromString("error"),
      PyUnicode_InternFromString("children"), PyUnicode_InternFromString("value")};
  return n;
}

// A new reference from getattr, or a Python error turned into a C++ one.
struct Ref {
  PyObject *p;
  explicit Ref(PyObject *obj) : p(obj) {
    if (p == nullptr) throw nb::python_error();
  }
  Ref(const Ref &) = delete;
  Ref &operator=(const Ref &) = delete;
  ~Ref() { Py_XDECREF(p); }
};

void varint(std::string &out, uint64_t n) {
  while (n > 0x7F) {
    out.push_back(static_cast<char>((n & 0x7F) | 0x80));
    n >>= 7;
  }
  out.push_back(static_cast<char>(n));
}

void fixed64(std::string &out, uint64_t v) {  // little-endian
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

void fixed32(std::string &out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

void big_endian64(std::string &out, uint64_t v) {
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

void field(std::string &out, char tag, const char *data, size_t size) {  // length-delimited
  out.push_back(tag);
  varint(out, size);
  out.append(data, size);
}

uint64_t u64(PyObject *obj, const char *what) {
  if (!PyLong_Check(obj)) throw nb::type_error((std::string("otlp_spans: ") + what + " must be an int").c_str());
  return PyLong_AsUnsignedLongLongMask(obj);  // ids are 64 bit; times fit
}

bool truthy(PyObject *obj) {
  const int value = PyObject_IsTrue(obj);
  if (value < 0) throw nb::python_error();
  return value == 1;
}

uint64_t u64_attr(PyObject *trace, PyObject *name, const char *what) {
  Ref v(PyObject_GetAttr(trace, name));
  return u64(v.p, what);
}

// "\x0a\x10" + the 128-bit trace id, big-endian.
void trace_id_field(std::string &out, PyObject *trace_id) {
  if (!PyLong_Check(trace_id)) throw nb::type_error("otlp_spans: trace_id must be an int");
  unsigned char bytes[16];
#if PY_VERSION_HEX >= 0x030D0000
  const int failed = _PyLong_AsByteArray(reinterpret_cast<PyLongObject *>(trace_id), bytes, 16, /*little_endian=*/0,
                                         /*is_signed=*/0, /*with_exceptions=*/1);
#else
  const int failed = _PyLong_AsByteArray(reinterpret_cast<PyLongObject *>(trace_id), bytes, 16, /*little_endian=*/0,
                                         /*is_signed=*/0);
#endif
  if (failed < 0) throw nb::python_error();
  out.append("\x0a\x10", 2);
  out.append(reinterpret_cast<const char *>(bytes), 16);
}

std::string_view utf8(PyObject *s, const char *what) {
  if (!PyUnicode_Check(s)) throw nb::type_error((std::string("otlp_spans: ") + what + " must be a str").c_str());
  Py_ssize_t size = 0;
  const char *data = PyUnicode_AsUTF8AndSize(s, &size);
  if (data == nullptr) throw nb::python_error();
  return {data, static_cast<size_t>(size)};
}

// AnyValue of an attribute, as `_any_value`: bool, int (64-bit two's complement), float, else str(value).
void any_value(std::string &out, PyObject *value) {
  if (PyBool_Check(value)) {
    out.append(value == Py_True ? "\x10\x01" : "\x10\x00", 2);
  } else if (PyLong_Check(value)) {
    out.push_back('\x18');
    varint(out, PyLong_AsUnsignedLongLongMask(value));
  } else if (PyFloat_Check(value)) {
    out.push_back('\x21');
    const double d = PyFloat_AS_DOUBLE(value);
    uint64_t bits;
    std::memcpy(&bits, &d, 8);
    fixed64(out, bits);
  } else {
    Ref text(PyObject_Str(value));
    const std::string_view s = utf8(text.p, "str(attribute)");
    field(out, '\x0a', s.data(), s.size());
  }
}

// Span.attributes (field 9): KeyValue{key "fleet.<key>", value}.
void attributes(std::string &out, PyObject *dict) {
  if (!PyDict_Check(dict)) throw nb::type_error("otlp_spans: attributes must be a dict or None");
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  std::string kv, any;
  while (PyDict_Next(dict, &pos, &key, &value)) {
    if (value == Py_None) continue;
    const std::string_view k = utf8(key, "an attribute's name");
    kv.clear();
    any.clear();
    kv.push_back('\x0a');
    varint(kv, k.size() + 6);
    kv.append("fleet.", 6);
    kv.append(k.data(), k.size());
    any_value(any, value);
    field(kv, '\x12', any.data(), any.size());
    field(out, '\x4a', kv.data(), kv.size());
  }
}

// OTLP's kind of a SpanKind member: its .value + 1 (the SDK's INTERNAL is 0, OTLP's 1). Enum's .value is a
// Python-level property: the few members seen are remembered (they live as long as the interpreter).
uint64_t kind_value(PyObject *kind) {
  static PyObject *seen[8] = {};
  static uint64_t values[8] = {};
  for (int i = 0; i < 8 && seen[i] != nullptr; ++i)
    if (seen[i] == kind) return values[i];
  Ref value(PyObject_GetAttr(kind, names().value));
  const uint64_t otlp = u64(value.p, "kind.value") + 1;
  for (int i = 0; i < 8; ++i) {
    if (seen[i] == nullptr) {
      Py_INCREF(kind);
      seen[i] = kind;
      values[i] = otlp;
      break;
    }
  }
  return otlp;
}

size_t varint_size(uint64_t n) {
  size_t size = 1;
  while (n > 0x7F) {
    n >>= 7;
    ++size;
  }
  return size;
}

std::mt19937_64 &rng() {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  return gen;
}

void flags(std::string &out, bool remote) {
  out.append("\x85\x01", 2);
  fixed32(out, remote ? 0x300 : 0x100);
}

void times(std::string &out, uint64_t start, uint64_t end) {
  out.push_back('\x39');
  fixed64(out, start);
  out.push_back('\x41');
  fixed64(out, end);
}

void encode_trace(std::string &out, PyObject *trace, uint64_t offset, std::string &body) {
  const Names &n = names();
  Ref trace_id(PyObject_GetAttr(trace, n.trace_id));
  const uint64_t span_id = u64_attr(trace, n.span_id, "span_id");
  const uint64_t parent_id = u64_attr(trace, n.parent_id, "parent_id");
  Ref name(PyObject_GetAttr(trace, n.name));
  Ref kind(PyObject_GetAttr(trace, n.kind));
  const uint64_t start = u64_attr(trace, n.start_ns, "start_ns") + offset;
  const uint64_t end = u64_attr(trace, n.end_ns, "end_ns") + offset;
  Ref attrs(PyObject_GetAttr(trace, n.attributes));
  Ref links(PyObject_GetAttr(trace, n.links));
  Ref error(PyObject_GetAttr(trace, n.error));
  Ref children(PyObject_GetAttr(trace, n.children));

  body.clear();
  trace_id_field(body, trace_id.p);
  const size_t ids_end = body.size();  // the children repeat the trace id's field
  body.append("\x12\x08", 2);
  big_endian64(body, span_id);
  if (parent_id != 0) {
    body.append("\x22\x08", 2);
    big_endian64(body, parent_id);
  }
  const std::string_view name_text = utf8(name.p, "name");
  field(body, '\x2a', name_text.data(), name_text.size());
  body.push_back('\x30');
  varint(body, kind_value(kind.p));
  times(body, start, end);
  if (attrs.p != Py_None && truthy(attrs.p)) attributes(body, attrs.p);
  if (links.p != Py_None) {
    PyObject *seq = links.p;
    if (!PyList_Check(seq)) throw nb::type_error("otlp_spans: links must be a list or None");
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(seq); ++i) {
      PyObject *link = PyList_GET_ITEM(seq, i);
      if (!PyTuple_Check(link) || PyTuple_GET_SIZE(link) != 2)
        throw nb::type_error("otlp_spans: a link must be a (trace id, span id) tuple");
      body.append("\x6a", 1);
      body.push_back(static_cast<char>(18 + 10 + 5));  // trace id, span id, flags
      trace_id_field(body, PyTuple_GET_ITEM(link, 0));
      body.append("\x12\x08", 2);
      big_endian64(body, u64(PyTuple_GET_ITEM(link, 1), "a link's span id"));
      body.push_back('\x35');  // Link.flags (field 6): a span of this process
      fixed32(body, 0x100);
    }
  }
  if (error.p != Py_None && truthy(error.p)) {
    const std::string_view message = utf8(error.p, "error");
    std::string status;
    field(status, '\x12', message.data(), message.size());
    status.append("\x18\x02", 2);  // STATUS_CODE_ERROR
    field(body, '\x7a', status.data(), status.size());
  }
  flags(body, parent_id != 0);  // a parent is remote: the client, the ingress
  field(out, '\x12', body.data(), body.size());

  if (!PyList_Check(children.p)) throw nb::type_error("otlp_spans: children must be a list");
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(children.p); ++i) {
    PyObject *child = PyList_GET_ITEM(children.p, i);
    if (!PyTuple_Check(child) || PyTuple_GET_SIZE(child) != 4)
      throw nb::type_error("otlp_spans: a child must be a (name, start_ns, end_ns, span id) tuple");
    const std::string_view child_name = utf8(PyTuple_GET_ITEM(child, 0), "a child's name");
    uint64_t child_id = u64(PyTuple_GET_ITEM(child, 3), "a child's span id");
    while (child_id == 0) child_id = rng()();
    const uint64_t child_start = u64(PyTuple_GET_ITEM(child, 1), "a child's start_ns") + offset;
    const uint64_t child_end = u64(PyTuple_GET_ITEM(child, 2), "a child's end_ns") + offset;
    // Every field but the name has a fixed size: the span's length is known before it is written.
    out.push_back('\x12');
    varint(out, ids_end + 10 + 10 + 1 + varint_size(child_name.size()) + child_name.size() + 2 + 18 + 6);
    out.append(body.data(), ids_end);  // the trace id's field
    out.append("\x12\x08", 2);
    big_endian64(out, child_id);
    out.append("\x22\x08", 2);
    big_endian64(out, span_id);
    field(out, '\x2a', child_name.data(), child_name.size());
    out.append("\x30\x01", 2);  // SPAN_KIND_INTERNAL
    times(out, child_start, child_end);
    flags(out, false);
  }
}

}  // namespace

nb::bytes otlp_spans(nb::handle traces, nb::handle offset_ns) {
  if (!PyList_Check(traces.ptr())) throw nb::type_error("otlp_spans: traces must be a list of Trace records");
  if (!PyLong_Check(offset_ns.ptr())) throw nb::type_error("otlp_spans: offset_ns must be an int");
  const uint64_t offset = PyLong_AsUnsignedLongLongMask(offset_ns.ptr());  // two's complement: a negative adds
  std::string out, body;
  const Py_ssize_t n = PyList_GET_SIZE(traces.ptr());
  out.reserve(static_cast<size_t>(n) * 300);
  for (Py_ssize_t i = 0; i < n; ++i) encode_trace(out, PyList_GET_ITEM(traces.ptr(), i), offset, body);
  return nb::bytes(out.data(), out.size());
}

}  // namespace fleet
