// A v2 input's `data` array: tokenized without Python objects (the GIL may be
// released meanwhile), then converted to a NumPy array of the input's
// `datatype` and `shape` once the input object is complete (JSON objects have
// no key order, so `datatype` may come after `data`).
#pragma once

#include <Python.h>

#include <string>
#include <vector>

#include "json_scan.hpp"

namespace fleet::json {

enum class Leaf : uint8_t { Int, UInt, Float, True, False, String, Null, Object };

struct TensorTokens {
  std::vector<Leaf> kinds;        // one per leaf, nested lists flattened in order
  std::vector<uint64_t> values;   // Int/UInt/Float bits; String: offset of its entry in `strings`
  std::string strings;            // each string leaf: 8-byte length, then its UTF-8 bytes
  std::vector<size_t> offsets;    // byte offset of each leaf, kept only when `record_offsets`
  bool record_offsets = false;
  const char *start = nullptr;    // the '[' of `data`

  void clear() {
    kinds.clear(), values.clear(), strings.clear(), offsets.clear();
    start = nullptr;
  }
};

// Reads the array at c.p ('[', inside `depth` open containers) into `tokens`.
// Makes no Python calls. Throws JsonError for malformed JSON only: what the
// datatype accepts is checked by tensor_from_tokens.
void tokenize_data(Cursor &c, int depth, TensorTokens &tokens);

// Looks up numpy.empty and the dtypes; false with a Python error set on failure.
bool init_numpy();

// The direct path, when the input's `datatype` and `shape` came before its
// `data` (at c.p): a NumPy array read straight from the text, or null (no
// Python error set, c.p unchanged) when they are not a numeric datatype and a
// valid shape, or when the data is anything but that many numbers the type
// takes; then the exact way (tokenize_data, tensor_from_tokens) reads it.
PyObject *tensor_direct(Cursor &c, int depth, PyObject *datatype, PyObject *shape, bool release_gil);

// The NumPy array for input `index` (its dict `input`, already parsed, gives
// `datatype` and `shape`), or JsonError naming the input and the element.
// Holds the GIL; `c` is the body's cursor, to find an element's offset.
// Returns null with a Python error set when NumPy fails (e.g. MemoryError).
PyObject *tensor_from_tokens(const TensorTokens &tokens, PyObject *input, size_t index, size_t object_offset,
                             const Cursor &c);

}  // namespace fleet::json
