// Decimal digits to numbers, shared by the JSON lexer (json_scan.cpp) and the
// direct tensor reader (json_direct.cpp). Header-only so that both inline it.
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>

namespace fleet::json {

inline bool is_digit(char c) { return static_cast<unsigned char>(c - '0') < 10; }

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
constexpr bool kLittleEndian = true;
#else
constexpr bool kLittleEndian = false;
#endif

inline constexpr uint64_t kZeros = 0x3030303030303030ull;  // "00000000"

// The number written by eight ASCII digits, first digit most significant
// (fast_float's SWAR parse).
inline uint64_t parse_eight(uint64_t v) {
  v -= kZeros;
  v = (v * 10) + (v >> 8);
  const uint64_t mask = 0x000000FF000000FFull;
  const uint64_t mul1 = 0x000F424000000064ull;  // 100 + (1000000 << 32)
  const uint64_t mul2 = 0x0000271000000001ull;  // 1 + (10000 << 32)
  return (((v & mask) * mul1) + (((v >> 16) & mask) * mul2)) >> 32;
}

// Per byte of v: 0 where it is an ASCII digit. A carry out of a non-digit byte
// may spoil the bytes after it (in memory), never the ones before.
inline uint64_t non_digits(uint64_t v) {
  return ((v & 0xF0F0F0F0F0F0F0F0ull) | (((v + 0x0606060606060606ull) & 0xF0F0F0F0F0F0F0F0ull) >> 4)) ^
         0x3333333333333333ull;
}

inline constexpr uint64_t kPow10Int[] = {1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000};

// Reads the run of digits at p, appending them to w (wrapping: the caller
// knows from the digit count when w is exact). Eight bytes at a time: the
// first non-digit among them ends the run, and the digits before it are
// parsed in one go, shifted to the end of a word of '0's; so a run of any
// length costs the same few branches.
inline const char *digit_run(const char *p, const char *end, uint64_t &w) {
  if constexpr (kLittleEndian) {
    while (end - p >= 8) {
      uint64_t v;
      std::memcpy(&v, p, 8);
      const uint64_t other = non_digits(v);
      if (other == 0) {
        w = w * 100000000u + parse_eight(v);
        p += 8;
        continue;
      }
      const unsigned n = static_cast<unsigned>(__builtin_ctzll(other)) >> 3;  // digits before it: 0..7
      const unsigned drop = 8 * (8 - n);                                       // bits of the bytes after
      const uint64_t kept = ((v << (drop / 2)) << (drop / 2)) | (kZeros >> (8 * n));
      w = w * kPow10Int[n] + parse_eight(kept);
      return p + n;
    }
  }
  while (p < end && is_digit(*p)) w = w * 10 + static_cast<unsigned>(*p++ - '0');
  return p;
}

inline constexpr double kPow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                             1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

// w * 10^exp10 correctly rounded, or false when the fast ways cannot tell.
inline bool fast_double(uint64_t w, int64_t exp10, double &out) {
  // Clinger: w and 10^|exp10| are exact doubles, one IEEE operation rounds once.
  if (w <= (uint64_t{1} << 53) && exp10 >= -22 && exp10 <= 22) {
    double v = static_cast<double>(w);
    out = exp10 < 0 ? v / kPow10[-exp10] : v * kPow10[exp10];
    return true;
  }
#if defined(__x86_64__) && LDBL_MANT_DIG == 64
  // x87 extended precision: w (< 2^64) and 10^|exp10| (exp10 <= 27) are exact,
  // so r is the exact value rounded once to 64 bits. Rounding r to 53 bits is
  // then correct unless r sits exactly on a midpoint between two doubles
  // (its 11 dropped bits are 10000000000): those go the slow way. One path
  // for all, so that no branch depends on the digits.
  static constexpr long double kPow10L[] = {1e0L,  1e1L,  1e2L,  1e3L,  1e4L,  1e5L,  1e6L,  1e7L,  1e8L,  1e9L,
                                            1e10L, 1e11L, 1e12L, 1e13L, 1e14L, 1e15L, 1e16L, 1e17L, 1e18L, 1e19L,
                                            1e20L, 1e21L, 1e22L, 1e23L, 1e24L, 1e25L, 1e26L, 1e27L};
  if (exp10 >= -27 && exp10 <= 27) {
    long double r = w <= static_cast<uint64_t>(INT64_MAX) ? static_cast<long double>(static_cast<int64_t>(w))
                                                          : static_cast<long double>(w);
    r = exp10 < 0 ? r / kPow10L[-exp10] : r * kPow10L[exp10];
    uint64_t mantissa;
    std::memcpy(&mantissa, &r, sizeof mantissa);
    if ((mantissa & 0x7FF) == 0x400) return false;
    out = static_cast<double>(r);
    return true;
  }
#endif
  // Clinger: w and 10^|exp10| are exact doubles, one IEEE operation rounds once.
  if (w <= (uint64_t{1} << 53) && exp10 >= -22 && exp10 <= 22) {
    double v = static_cast<double>(w);
    out = exp10 < 0 ? v / kPow10[-exp10] : v * kPow10[exp10];
    return true;
  }
  return false;
}

}  // namespace fleet::json
