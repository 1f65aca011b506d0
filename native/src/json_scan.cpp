// JSON lexing: see json_scan.hpp.
#include "json_scan.hpp"

#include "json_number.hpp"

#include <cfloat>
#include <clocale>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include <locale.h>

namespace fleet::json {
namespace {

// Correctly rounded double of a decimal token, the slow and rare way: glibc's
// strtod (exact for any length) in the C locale, on a NUL-terminated copy.
double strtod_c(const char *start, const char *stop) {
  static locale_t c_locale = newlocale(LC_ALL_MASK, "C", static_cast<locale_t>(0));
  std::string copy(start, stop);
  return strtod_l(copy.c_str(), nullptr, c_locale);
}

// One UTF-8 encoded character at p (a byte >= 0x80), validated strictly as
// Python and orjson do (no overlongs, no surrogates, nothing past U+10FFFF).
const char *utf8_char(const Cursor &c, const char *p) {
  const auto *u = reinterpret_cast<const unsigned char *>(p);
  const size_t left = static_cast<size_t>(c.end - p);
  auto cont = [&](size_t i, unsigned lo = 0x80, unsigned hi = 0xBF) { return i < left && u[i] >= lo && u[i] <= hi; };
  const unsigned b = u[0];
  if (b >= 0xC2 && b <= 0xDF) {
    if (cont(1)) return p + 2;
  } else if (b == 0xE0) {
    if (cont(1, 0xA0) && cont(2)) return p + 3;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    if (cont(1) && cont(2)) return p + 3;
  } else if (b == 0xED) {
    if (cont(1, 0x80, 0x9F) && cont(2)) return p + 3;
  } else if (b == 0xF0) {
    if (cont(1, 0x90) && cont(2) && cont(3)) return p + 4;
  } else if (b >= 0xF1 && b <= 0xF3) {
    if (cont(1) && cont(2) && cont(3)) return p + 4;
  } else if (b == 0xF4) {
    if (cont(1, 0x80, 0x8F) && cont(2) && cont(3)) return p + 4;
  }
  c.fail(p, "invalid UTF-8 in a string");
}

unsigned hex4(const Cursor &c, const char *p) {
  if (c.end - p < 4) c.fail(p, "unexpected end of data, expected 4 hex digits after \\u");
  unsigned v = 0;
  for (int i = 0; i < 4; ++i) {
    char h = p[i];
    unsigned d = is_digit(h) ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10 : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : 16;
    if (d == 16) c.fail(p, "expected 4 hex digits after \\u");
    v = v * 16 + d;
  }
  return v;
}

void append_utf8(std::string &out, unsigned cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// The escape at p (after the backslash), appended to out; returns past it.
const char *escape(const Cursor &c, const char *p, std::string &out) {
  if (p >= c.end) c.fail(p, "unexpected end of data in an escape");
  switch (*p) {
    case '"': out += '"'; return p + 1;
    case '\\': out += '\\'; return p + 1;
    case '/': out += '/'; return p + 1;
    case 'b': out += '\b'; return p + 1;
    case 'f': out += '\f'; return p + 1;
    case 'n': out += '\n'; return p + 1;
    case 'r': out += '\r'; return p + 1;
    case 't': out += '\t'; return p + 1;
    case 'u': break;
    default: c.fail(p - 1, "invalid escape in a string");
  }
  unsigned cp = hex4(c, p + 1);
  p += 5;
  if (cp >= 0xDC00 && cp <= 0xDFFF) c.fail(p - 6, "a low surrogate escape without a high one");
  if (cp >= 0xD800 && cp <= 0xDBFF) {
    if (c.end - p < 2 || p[0] != '\\' || p[1] != 'u') c.fail(p - 6, "a high surrogate escape without a low one");
    unsigned low = hex4(c, p + 2);
    if (low < 0xDC00 || low > 0xDFFF) c.fail(p, "expected a low surrogate escape");
    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    p += 6;
  }
  append_utf8(out, cp);
  return p;
}

}  // namespace

void Cursor::literal(const char *word, size_t size) {
  if (static_cast<size_t>(end - p) < size || std::memcmp(p, word, size) != 0)
    fail(p, "expected a JSON value");
  p += size;
}

Number scan_number(Cursor &c) {
  const char *start = c.p, *p = c.p, *const end = c.end;
  const bool negative = *p == '-';
  p += negative;
  if (p >= end) c.fail(p, "unexpected end of data, expected a digit after '-'");
  if (!is_digit(*p)) c.fail(p, "expected a digit");
  uint64_t w = 0;
  const char *int_start = p;
  p = digit_run(p, end, w);
  const size_t int_digits = static_cast<size_t>(p - int_start);
  if (*int_start == '0' && int_digits > 1) c.fail(int_start, "a number may not start with 0 followed by digits");
  bool integer = true;
  size_t frac_digits = 0;
  if (p < end && *p == '.') {
    integer = false;
    const char *frac = ++p;
    p = digit_run(p, end, w);
    frac_digits = static_cast<size_t>(p - frac);
    if (frac_digits == 0)
      c.fail(p, p < end ? "expected a digit after '.'" : "unexpected end of data, expected a digit after '.'");
  }
  int64_t exponent = 0;
  if (p < end && (*p == 'e' || *p == 'E')) {
    integer = false;
    bool exp_negative = false;
    if (++p < end && (*p == '+' || *p == '-')) exp_negative = *p++ == '-';
    if (p >= end) c.fail(p, "unexpected end of data, expected an exponent");
    if (!is_digit(*p)) c.fail(p, "expected a digit in the exponent");
    for (; p < end && is_digit(*p); ++p)
      if (exponent < 100000000) exponent = exponent * 10 + (*p - '0');
    if (exp_negative) exponent = -exponent;
  }
  c.p = p;

  Number out;
  if (integer) {
    if (int_digits <= 19) {  // w is exact
      if (!negative && w <= static_cast<uint64_t>(INT64_MAX)) {
        out.kind = NumberKind::Int, out.i = static_cast<int64_t>(w);
        return out;
      }
      if (!negative) {
        out.kind = NumberKind::UInt, out.u = w;
        return out;
      }
      if (w <= static_cast<uint64_t>(INT64_MAX)) {
        out.kind = NumberKind::Int, out.i = -static_cast<int64_t>(w);
        return out;
      }
      if (w == static_cast<uint64_t>(INT64_MAX) + 1) {
        out.kind = NumberKind::Int, out.i = INT64_MIN;
        return out;
      }
    } else if (int_digits == 20 && !negative) {  // maybe within uint64: exactly, with overflow checks
      uint64_t exact = 0;
      bool overflow = false;
      for (const char *q = int_start; q < int_start + 20; ++q)
        overflow |= __builtin_mul_overflow(exact, 10u, &exact) | __builtin_add_overflow(exact, *q - '0', &exact);
      if (!overflow) {
        out.kind = NumberKind::UInt, out.u = exact;
        return out;
      }
    }
  }
  out.kind = NumberKind::Float;
  bool exact = int_digits + frac_digits <= 19;  // then w holds every digit
  if (!exact) {  // still exact if leading zeros (0.000...) leave at most 19 digits that count
    size_t zeros = 0;
    if (*int_start == '0') {
      zeros = 1;
      for (const char *q = int_start + 2; q < int_start + 1 + 1 + frac_digits && *q == '0'; ++q) ++zeros;
    }
    exact = int_digits + frac_digits - zeros <= 19;
  }
  double value;
  if (exact && w == 0) {
    value = 0.0;
  } else if (!exact || !fast_double(w, exponent - static_cast<int64_t>(frac_digits), value)) {
    value = std::fabs(strtod_c(start, p));
    if (std::isinf(value)) c.fail(start, "number is too large for a double");
  }
  out.d = negative ? -value : value;
  return out;
}

void scan_string(Cursor &c, const char *&start, size_t &size, std::string &decoded) {
  const char *const s = c.p + 1, *const end = c.end;
  const char *p = s;
  for (;;) {  // the common case: no escapes, bytes as they are
    if (p >= end) c.fail(c.p, "unexpected end of data in a string");
    const auto ch = static_cast<unsigned char>(*p);
    if (ch == '"') {
      start = s, size = static_cast<size_t>(p - s), c.p = p + 1;
      return;
    }
    if (ch == '\\') break;
    if (ch < 0x20) c.fail(p, "control character in a string");
    p = ch < 0x80 ? p + 1 : utf8_char(c, p);
  }
  decoded.assign(s, p);
  for (;;) {
    if (p >= end) c.fail(c.p, "unexpected end of data in a string");
    const auto ch = static_cast<unsigned char>(*p);
    if (ch == '"') break;
    if (ch == '\\') {
      p = escape(c, p + 1, decoded);
    } else if (ch < 0x20) {
      c.fail(p, "control character in a string");
    } else if (ch < 0x80) {
      decoded += static_cast<char>(ch);
      ++p;
    } else {
      const char *next = utf8_char(c, p);
      decoded.append(p, next);
      p = next;
    }
  }
  start = nullptr, size = decoded.size(), c.p = p + 1;
}

void skip_value(Cursor &c, int depth) {
  const char ch = c.peek("a JSON value");
  if (ch == '{' || ch == '[') {
    if (depth + 1 > kMaxDepth) c.fail(c.p, "nesting depth limit (1024) exceeded");
    const char close = ch == '{' ? '}' : ']';
    ++c.p;
    if (c.peek(ch == '{' ? "a string key or '}'" : "a JSON value or ']'") == close) {
      ++c.p;
      return;
    }
    std::string scratch;
    for (;;) {
      if (ch == '{') {
        if (c.peek("a string key") != '"') c.fail(c.p, "expected a string key");
        const char *s;
        size_t n;
        scan_string(c, s, n, scratch);
        if (c.peek("':'") != ':') c.fail(c.p, "expected ':' after an object key");
        ++c.p;
      }
      skip_value(c, depth + 1);
      const char next = c.peek(ch == '{' ? "',' or '}'" : "',' or ']'");
      ++c.p;
      if (next == close) return;
      if (next != ',') c.fail(c.p - 1, ch == '{' ? "expected ',' or '}'" : "expected ',' or ']'");
    }
  }
  if (ch == '"') {
    const char *s;
    size_t n;
    std::string scratch;
    scan_string(c, s, n, scratch);
  } else if (ch == 't') {
    c.literal("true", 4);
  } else if (ch == 'f') {
    c.literal("false", 5);
  } else if (ch == 'n') {
    c.literal("null", 4);
  } else if (ch == '-' || is_digit(ch)) {
    scan_number(c);
  } else {
    c.fail(c.p, "expected a JSON value");
  }
}

uint16_t double_to_half_bits(double value) {
  uint64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const auto sign = static_cast<uint16_t>((bits >> 48) & 0x8000);
  const int exponent = static_cast<int>((bits >> 52) & 0x7FF);
  const uint64_t mantissa = bits & 0xFFFFFFFFFFFFFull;
  if (exponent == 0x7FF) return sign | 0x7C00 | (mantissa ? 0x200 : 0);  // inf, NaN
  const int e = exponent - 1023;
  if (e > 15) return sign | 0x7C00;
  uint64_t kept, rest, half;
  uint32_t h;
  if (e >= -14) {  // a normal half before rounding; a carry rounds into the exponent (up to inf)
    kept = mantissa >> 42, rest = mantissa & ((uint64_t{1} << 42) - 1), half = uint64_t{1} << 41;
    h = (static_cast<uint32_t>(e + 15) << 10) | static_cast<uint32_t>(kept);
  } else if (e >= -25) {  // a subnormal half (units of 2^-24), or the smallest normal after rounding
    const uint64_t significand = mantissa | (uint64_t{1} << 52);
    const int shift = 28 - e;  // 43..53
    kept = significand >> shift, rest = significand & ((uint64_t{1} << shift) - 1), half = uint64_t{1} << (shift - 1);
    h = static_cast<uint32_t>(kept);
  } else {
    return sign;
  }
  if (rest > half || (rest == half && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

}  // namespace fleet::json
