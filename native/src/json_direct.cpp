// The direct path of a numeric tensor's `data`: when the input's datatype and
// shape came before it (the usual key order), numbers go straight from the
// text into the final array, with no token buffer and no second pass.
#include <cmath>
#include <limits>
#include <type_traits>

#include "json_direct.hpp"
#include "json_number.hpp"

namespace fleet::json {
namespace {

// A number as the fast lexer saw it: value w * 10^exp10, sign apart.
struct Token {
  uint64_t w;
  int64_t exp10;
  bool negative, integer;
};

inline unsigned digit_value(char c) { return static_cast<unsigned char>(c - '0'); }

// The number at p if it is a plain one (at most 19 significant digits, a short
// exponent), else null, and the exact lexer takes it. Reads at most ~80 bytes
// from p: the caller makes sure kSlack bytes are there, so no read here needs
// a bounds check.
constexpr ptrdiff_t kSlack = 128;

[[gnu::always_inline]] inline const char *fast_token(const char *p, Token &t) {
  const bool negative = *p == '-';
  p += negative;
  unsigned d = digit_value(*p);
  if (d > 9) return nullptr;
  uint64_t w = d;
  int significant = d != 0;
  ++p;
  if (d == 0) {
    if (digit_value(*p) <= 9) return nullptr;  // a leading zero: the exact lexer says what is wrong
  } else {
    while ((d = digit_value(*p)) <= 9) {
      if (++significant > 19) return nullptr;
      w = w * 10 + d, ++p;
    }
  }
  int64_t exp10 = 0;
  bool integer = true;
  if (*p == '.') {
    integer = false;
    const char *frac = ++p;
    if (w == 0)
      while (*p == '0')
        if (++p - frac > 32) return nullptr;
    const char *digits = p;
    if constexpr (kLittleEndian) {
      // Eight bytes at a time; the run's last (partial) word is parsed shifted
      // behind '0's, so a run of any length takes no data-dependent branch.
      for (int words = 0;; ++words) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        const uint64_t other = non_digits(v);
        if (other == 0) {
          if (words == 2) return nullptr;  // 24 digits or more: the exact way
          w = w * 100000000u + parse_eight(v), p += 8;
          continue;
        }
        const unsigned n = static_cast<unsigned>(__builtin_ctzll(other)) >> 3;
        const unsigned drop = 8 * (8 - n);
        w = w * kPow10Int[n] + parse_eight(((v << (drop / 2)) << (drop / 2)) | (kZeros >> (8 * n)));
        p += n;
        break;
      }
    } else {
      while ((d = digit_value(*p)) <= 9) {
        w = w * 10 + d, ++p;
        if (p - digits > 19) return nullptr;
      }
    }
    significant += static_cast<int>(p - digits);
    if (p == frac || significant > 19) return nullptr;
    exp10 = -(p - frac);
  }
  if ((*p | 0x20) == 'e') {
    integer = false;
    ++p;
    const bool exp_negative = *p == '-';
    p += (*p == '-' || *p == '+');
    if ((d = digit_value(*p)) > 9) return nullptr;
    int64_t e = d;
    while ((d = digit_value(*++p)) <= 9)
      if ((e = e * 10 + d) > 100000) return nullptr;
    exp10 += exp_negative ? -e : e;
  }
  t = {w, exp10, negative, integer};
  return p;
}

template <typename T>
constexpr bool kIsFloat = std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, Half>;

// Rounds a double to the target once; false when it overflows (the exact path reports it).
template <typename T>
inline bool store_double(double d, T &out) {
  if constexpr (std::is_same_v<T, Half>) {
    out.bits = double_to_half_bits(d);
    return (out.bits & 0x7C00) != 0x7C00;
  } else {
    out = static_cast<T>(d);
    return std::isfinite(out);
  }
}

template <typename T>
inline bool store_integer(bool negative, uint64_t magnitude, T &out) {
  if (!negative) {
    if (magnitude > static_cast<uint64_t>(std::numeric_limits<T>::max())) return false;
    out = static_cast<T>(magnitude);
    return true;
  }
  if constexpr (std::is_unsigned_v<T>) {
    if (magnitude != 0) return false;
    out = 0;
    return true;
  } else {
    if (magnitude > static_cast<uint64_t>(std::numeric_limits<T>::max()) + 1) return false;
    out = static_cast<T>(-static_cast<int64_t>(magnitude - 1) - 1);
    return true;
  }
}

// 10^-k rounded to the nearest double.
constexpr double kInvPow10[] = {1e-0,  1e-1,  1e-2,  1e-3,  1e-4,  1e-5,  1e-6,  1e-7,  1e-8,  1e-9,  1e-10, 1e-11,
                                1e-12, 1e-13, 1e-14, 1e-15, 1e-16, 1e-17, 1e-18, 1e-19, 1e-20, 1e-21, 1e-22};

// float32(the correctly rounded double of w * 10^exp10) without computing that
// double: q = double(w) * double(10^exp10) is within 4.5 double ulps of it
// (three roundings, each at most half an ulp, relative 2^-53), so both round
// to the same float unless a float rounding boundary (a double whose 29 bits
// below float precision are 1 followed by 28 zeros) lies within that distance
// of q. Those rare ones, and what is outside the range here, go the exact way.
[[gnu::always_inline]] inline bool fast_float32(uint64_t w, int64_t exp10, float &out) {
  if (exp10 < -22 || exp10 > 22 || w > static_cast<uint64_t>(INT64_MAX)) return false;
  const double q = static_cast<double>(static_cast<int64_t>(w)) * (exp10 < 0 ? kInvPow10[-exp10] : kPow10[exp10]);
  uint64_t bits;
  std::memcpy(&bits, &q, sizeof bits);
  const uint64_t below = bits & ((uint64_t{1} << 29) - 1);
  const uint64_t distance = below > (uint64_t{1} << 28) ? below - (uint64_t{1} << 28) : (uint64_t{1} << 28) - below;
  if (distance <= 16) return false;
  out = static_cast<float>(q);
  return true;
}

template <typename T>
inline bool store_token(const Token &t, T &out) {
  if constexpr (std::is_same_v<T, float>) {
    if (!t.integer && t.w != 0 && fast_float32(t.w, t.exp10, out)) {
      if (t.negative) out = -out;
      return std::isfinite(out);
    }
  }
  if constexpr (kIsFloat<T>) {
    double d;
    if (t.integer) {
      d = static_cast<double>(t.w);  // an integer -0 is 0, as orjson reads it
      if (t.negative) d = -d + 0.0;
    } else if (t.w == 0) {
      d = t.negative ? -0.0 : 0.0;
    } else {
      if (!fast_double(t.w, t.exp10, d)) return false;
      if (t.negative) d = -d;
    }
    return store_double(d, out);
  } else {
    return t.integer && store_integer(t.negative, t.w, out);
  }
}

template <typename T>
inline bool store_number(const Number &n, T &out) {
  if constexpr (kIsFloat<T>) {
    const double d = n.kind == NumberKind::Int ? static_cast<double>(n.i)
                     : n.kind == NumberKind::UInt ? static_cast<double>(n.u) : n.d;
    return store_double(d, out);
  } else {
    if (n.kind == NumberKind::Int)
      return store_integer(n.i < 0, n.i < 0 ? 0 - static_cast<uint64_t>(n.i) : static_cast<uint64_t>(n.i), out);
    return n.kind == NumberKind::UInt && store_integer(false, n.u, out);
  }
}

template <typename T>
class Direct {
 public:
  Direct(Cursor &c, T *out, size_t count) : c_(c), out_(out), count_(count) {}

  bool read(int depth) { return array(depth) && n_ == count_; }

 private:
  Cursor &c_;
  T *out_;
  size_t count_, n_ = 0;

  // The array at c_.p. Plain numbers are read in a tight loop on a local
  // pointer; anything else goes through the cursor's exact (checked) way.
  bool array(int depth) {
    if (depth + 1 > kMaxDepth) return false;
    ++c_.p;  // '['
    if (c_.peek("a JSON value or ']'") == ']') {
      ++c_.p;
      return true;
    }
    const char *const end = c_.end;
    const char *p = c_.p;
    for (;;) {
      Token t;
      const char *q;
      if (end - p >= kSlack && (q = fast_token(p, t)) && n_ < count_ && store_token(t, out_[n_])) {
        ++n_;
        p = q;
      } else {
        c_.p = p;
        if (c_.peek("a JSON value") == '[') {
          if (!array(depth + 1)) return false;
        } else if (n_ >= count_ || !number(out_[n_++])) {
          return false;
        }
        p = c_.p;
      }
      if (p < end && *p == ',') {
        ++p;
        continue;
      }
      c_.p = p;
      const char next = c_.peek("',' or ']'");
      p = ++c_.p;
      if (next == ']') return true;
      if (next != ',') return false;
    }
  }

  bool number(T &out) {
    if (*c_.p != '-' && !is_digit(*c_.p)) return false;  // not a number: the exact path says so
    return store_number(scan_number(c_), out);
  }
};

}  // namespace

template <typename T>
bool read_direct(Cursor &c, int depth, T *out, size_t count) {
  return Direct<T>(c, out, count).read(depth);
}

template bool read_direct(Cursor &, int, float *, size_t);
template bool read_direct(Cursor &, int, double *, size_t);
template bool read_direct(Cursor &, int, Half *, size_t);
template bool read_direct(Cursor &, int, int8_t *, size_t);
template bool read_direct(Cursor &, int, int16_t *, size_t);
template bool read_direct(Cursor &, int, int32_t *, size_t);
template bool read_direct(Cursor &, int, int64_t *, size_t);
template bool read_direct(Cursor &, int, uint8_t *, size_t);
template bool read_direct(Cursor &, int, uint16_t *, size_t);
template bool read_direct(Cursor &, int, uint32_t *, size_t);
template bool read_direct(Cursor &, int, uint64_t *, size_t);

}  // namespace fleet::json
