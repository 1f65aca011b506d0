// parse_v2_json: a KServe v2 infer request body to Python objects, as
// orjson.loads would build them, except that each `inputs[i]["data"]` is a
// NumPy array of the input's datatype and shape.
#include <cstring>
#include <optional>
#include <string>

#include "common.hpp"
#include "json_scan.hpp"
#include "json_tensor.hpp"
#include "kernels.hpp"

namespace fleet {
namespace {

using json::Cursor;
using json::JsonError;
using json::kMaxDepth;

// Bodies smaller than this are read with the GIL held: a release costs more
// than it frees, and taking the GIL back may wait behind another thread.
constexpr ptrdiff_t kReleaseAbove = 32 * 1024;

nb::object steal_or_throw(PyObject *p) {
  if (!p) throw nb::python_error();
  return nb::steal(p);
}

// Data problems (a wrong datatype, shape or value) are not raised where they
// are found: a later duplicate key may replace the input or the whole
// `inputs`, as it would in orjson's result. They are kept here and raised
// once the document has parsed, for the `inputs` that stands.
using Deferred = std::optional<JsonError>;

class Reader {
 public:
  Reader(const char *data, size_t size) : c_{data, data, data + size} {}

  nb::object document() {
    Deferred deferred;
    nb::object result = c_.peek("a JSON value") == '{' ? top_object(deferred) : value(0);
    c_.skip_ws();
    if (!c_.at_end()) c_.fail(c_.p, "unexpected content after the document");
    if (deferred) throw *deferred;
    return result;
  }

 private:
  Cursor c_;
  std::string scratch_;
  json::TensorTokens tokens_;

  nb::object value(int depth) {
    const char ch = c_.peek("a JSON value");
    switch (ch) {
      case '{': return object(depth, nullptr, [&](PyObject *dict, PyObject *key, bool, int inner) {
          set(dict, key, value(inner));
        });
      case '[': return array(depth, [&](PyObject *list, int inner) { append(list, value(inner)); });
      case '"': return string();
      case 't': c_.literal("true", 4); return nb::borrow(Py_True);
      case 'f': c_.literal("false", 5); return nb::borrow(Py_False);
      case 'n': c_.literal("null", 4); return nb::none();
      default: break;
    }
    if (ch != '-' && !(ch >= '0' && ch <= '9')) c_.fail(c_.p, "expected a JSON value");
    const json::Number n = json::scan_number(c_);
    switch (n.kind) {
      case json::NumberKind::Int: return steal_or_throw(PyLong_FromLongLong(n.i));
      case json::NumberKind::UInt: return steal_or_throw(PyLong_FromUnsignedLongLong(n.u));
      default: return steal_or_throw(PyFloat_FromDouble(n.d));
    }
  }

  nb::object string() {
    const char *s;
    size_t n;
    json::scan_string(c_, s, n, scratch_);
    if (!s) s = scratch_.data();
    return steal_or_throw(PyUnicode_DecodeUTF8(s, static_cast<Py_ssize_t>(n), "strict"));
  }

  static void set(PyObject *dict, PyObject *key, const nb::object &v) {
    if (PyDict_SetItem(dict, key, v.ptr()) < 0) throw nb::python_error();
  }
  static void append(PyObject *list, const nb::object &v) {
    if (PyList_Append(list, v.ptr()) < 0) throw nb::python_error();
  }

  // An object at c_.p; on_member(dict, key, key == special, depth) reads each value.
  template <typename F>
  nb::object object(int depth, const char *special, F &&on_member) {
    if (depth + 1 > kMaxDepth) c_.fail(c_.p, "nesting depth limit (1024) exceeded");
    ++c_.p;
    nb::object dict = steal_or_throw(PyDict_New());
    char ch = c_.peek("a string key or '}'");
    if (ch == '}') {
      ++c_.p;
      return dict;
    }
    for (;;) {
      if (ch != '"') c_.fail(c_.p, "expected a string key");
      const char *s;
      size_t n;
      json::scan_string(c_, s, n, scratch_);
      if (!s) s = scratch_.data();
      const bool is_special = special && n == std::char_traits<char>::length(special) && std::memcmp(s, special, n) == 0;
      nb::object key = steal_or_throw(PyUnicode_DecodeUTF8(s, static_cast<Py_ssize_t>(n), "strict"));
      if (c_.peek("':'") != ':') c_.fail(c_.p, "expected ':' after an object key");
      ++c_.p;
      on_member(dict.ptr(), key.ptr(), is_special, depth + 1);
      ch = c_.peek("',' or '}'");
      ++c_.p;
      if (ch == '}') return dict;
      if (ch != ',') c_.fail(c_.p - 1, "expected ',' or '}'");
      ch = c_.peek("a string key");
    }
  }

  // An array at c_.p; on_element(list, depth) reads each element.
  template <typename F>
  nb::object array(int depth, F &&on_element) {
    if (depth + 1 > kMaxDepth) c_.fail(c_.p, "nesting depth limit (1024) exceeded");
    ++c_.p;
    nb::object list = steal_or_throw(PyList_New(0));
    if (c_.peek("a JSON value or ']'") == ']') {
      ++c_.p;
      return list;
    }
    for (;;) {
      on_element(list.ptr(), depth + 1);
      const char ch = c_.peek("',' or ']'");
      ++c_.p;
      if (ch == ']') return list;
      if (ch != ',') c_.fail(c_.p - 1, "expected ',' or ']'");
    }
  }

  // The document's root object: its "inputs", if a list, is read as tensors.
  nb::object top_object(Deferred &deferred) {
    return object(0, "inputs", [&](PyObject *dict, PyObject *key, bool is_inputs, int depth) {
      if (!is_inputs) return set(dict, key, value(depth));
      deferred.reset();  // a repeated key: the last one stands
      if (c_.peek("a JSON value") != '[') return set(dict, key, value(depth));
      size_t index = 0;
      set(dict, key, array(depth, [&](PyObject *list, int inner) {
            if (c_.peek("a JSON value") == '{') append(list, input_object(inner, index, deferred));
            else append(list, value(inner));
            ++index;
          }));
    });
  }

  // inputs[index]: its "data", if a list, becomes an array. Straight from the
  // text when "datatype" and "shape" came first; else (or if a later key
  // replaced them) from tokens once the whole object is read.
  nb::object input_object(int depth, size_t index, Deferred &deferred) {
    const char *open = c_.p;
    enum class Data { Absent, Ready, List, Other } data = Data::Absent;
    const char *data_at = nullptr;
    int data_depth = 0;
    nb::object used_datatype, used_shape;  // what a Ready array was read with, held so identity is meaningful
    nb::object dict = object(depth, "data", [&](PyObject *d, PyObject *key, bool is_data, int inner) {
      if (!is_data) return set(d, key, value(inner));
      data_at = c_.p;
      data_depth = inner;
      if (c_.peek("a JSON value") != '[') {
        data = Data::Other;
        return set(d, key, value(inner));
      }
      const bool release = c_.end - c_.p >= kReleaseAbove;
      PyObject *datatype = PyDict_GetItemString(d, "datatype"), *shape = PyDict_GetItemString(d, "shape");
      if (datatype && shape) {
        if (PyObject *array = json::tensor_direct(c_, inner, datatype, shape, release)) {
          data = Data::Ready;
          used_datatype = nb::borrow(datatype);
          used_shape = nb::borrow(shape);
          return set(d, key, nb::steal(array));
        }
      }
      data = Data::List;
      set(d, key, nb::none());  // holds the key's place; the array replaces it
      tokenize(inner, release);
    });
    if (deferred) return dict;  // an earlier input failed: that error stands
    if (data == Data::Ready) {
      if (PyDict_GetItemString(dict.ptr(), "datatype") == used_datatype.ptr() &&
          PyDict_GetItemString(dict.ptr(), "shape") == used_shape.ptr())
        return dict;
      Cursor again{c_.begin, data_at, c_.end};  // a later key changed what the data means
      std::swap(c_, again);
      c_.skip_ws();
      tokenize(data_depth, false);
      std::swap(c_, again);
      data = Data::List;
    }
    if (data == Data::Other) {
      deferred = JsonError(static_cast<size_t>(data_at - c_.begin),
                           "inputs[" + std::to_string(index) + "].data: expected a list");
    } else if (data == Data::List) {
      try {
        PyObject *array = json::tensor_from_tokens(tokens_, dict.ptr(), index, static_cast<size_t>(open - c_.begin), c_);
        if (!array) throw nb::python_error();
        nb::object owned = nb::steal(array);
        if (PyDict_SetItemString(dict.ptr(), "data", array) < 0) throw nb::python_error();
      } catch (const JsonError &e) {
        deferred = e;
      }
    }
    return dict;
  }

  void tokenize(int depth, bool release_gil) {
    tokens_.clear();
    if (release_gil) {
      nb::gil_scoped_release release;
      json::tokenize_data(c_, depth, tokens_);
    } else {
      json::tokenize_data(c_, depth, tokens_);
    }
  }
};

// The body's bytes, held for the call.
struct Body {
  Py_buffer view{};
  explicit Body(nb::handle obj) {
    PyObject *p = obj.ptr();
    if (!(PyBytes_Check(p) || PyByteArray_Check(p) || PyMemoryView_Check(p)) ||
        PyObject_GetBuffer(p, &view, PyBUF_C_CONTIGUOUS) < 0) {
      PyErr_Clear();
      throw nb::type_error("body: expected bytes, bytearray or a C-contiguous memoryview");
    }
  }
  ~Body() { PyBuffer_Release(&view); }
};

}  // namespace

nb::object parse_v2_json(nb::handle body_obj) {
  Body body(body_obj);
  Reader reader(static_cast<const char *>(body.view.buf), static_cast<size_t>(body.view.len));
  try {
    return reader.document();
  } catch (const JsonError &e) {
    throw nb::value_error(e.text().c_str());
  }
}

}  // namespace fleet
