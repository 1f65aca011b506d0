// The direct path of a numeric tensor's `data` (see json_direct.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "json_scan.hpp"

namespace fleet::json {

struct Half {  // FP16 storage: IEEE binary16 bits
  uint16_t bits;
};

// Reads the array at c.p (a tensor's data, inside `depth` open containers)
// into out[0..count): true when every leaf is a number that T takes and there
// are exactly `count` of them. Otherwise false with c.p anywhere in the array:
// the caller then reads it again the exact way (tokenize_data), which says
// what is wrong. Throws JsonError for malformed JSON, as that way would.
template <typename T>
bool read_direct(Cursor &c, int depth, T *out, size_t count);

}  // namespace fleet::json
