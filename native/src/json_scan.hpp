// JSON lexing for parse_v2_json: numbers, strings, whitespace. Accepts and
// rejects what orjson does (RFC 8259, strict UTF-8, no NaN/Infinity, numbers
// that overflow a double rejected, integers beyond 64 bits read as floats).
// Every read is bounds-checked against `end`; errors throw JsonError with the
// byte offset into the body.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fleet::json {

struct JsonError : std::exception {
  size_t offset;
  std::string message;  // what was expected
  JsonError(size_t offset, std::string message) : offset(offset), message(std::move(message)) {}
  const char *what() const noexcept override { return message.c_str(); }
  std::string text() const { return "byte " + std::to_string(offset) + ": " + message; }
};

constexpr int kMaxDepth = 1024;  // orjson's: 1024 nested arrays/objects parse, 1025 do not

enum class NumberKind : uint8_t { Int, UInt, Float };

struct Number {
  NumberKind kind;
  union {
    int64_t i;   // Int: an integer token in int64
    uint64_t u;  // UInt: an integer token above INT64_MAX, within uint64
    double d;    // Float: a fraction or exponent, or an integer beyond 64 bits
  };
};

// The text being read; offsets in errors are from `begin`.
struct Cursor {
  const char *begin, *p, *end;
  [[noreturn]] void fail(const char *at, std::string what) const {
    throw JsonError(static_cast<size_t>(at - begin), std::move(what));
  }
  bool at_end() const { return p >= end; }
  void skip_ws() {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) ++p;
  }
  // The next non-blank byte; fails with "expected <what>" at the end.
  char peek(const char *what) {
    skip_ws();
    if (p >= end) fail(p, std::string("unexpected end of data, expected ") + what);
    return *p;
  }
  // Reads one of true/false/null (p at its first byte).
  void literal(const char *word, size_t size);
};

// Reads the number at c.p ('-' or a digit) and leaves c.p after it.
Number scan_number(Cursor &c);

// Reads the string at c.p (the opening quote) and leaves c.p after the closing
// one. Sets (start, size) to its bytes when it has no escapes (then `decoded`
// is untouched), else decodes it as UTF-8 into `decoded` and sets start to null.
void scan_string(Cursor &c, const char *&start, size_t &size, std::string &decoded);

// Validates the value at c.p (any JSON value, nesting from `depth`) without
// building it: what a tensor's `data` holds that no datatype accepts.
void skip_value(Cursor &c, int depth);

// IEEE binary16 bits of a double, rounded to nearest even as NumPy does.
uint16_t double_to_half_bits(double value);

}  // namespace fleet::json
