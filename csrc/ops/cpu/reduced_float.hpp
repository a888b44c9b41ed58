// bfloat16 and float16 on the CPU without compiler support for 16-bit floats: the bits, and exact
// conversions to float and back with round-to-nearest-even, as torch converts.
#pragma once

#include <cstdint>
#include <cstring>

namespace starfast {
namespace ops {

struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float to_float(BFloat16 value) { return bits_float(uint32_t(value.bits) << 16); }

inline BFloat16 to_bfloat16(float value) {
  if (value != value) return {uint16_t(0x7FC0)};  // a quiet NaN
  const uint32_t bits = float_bits(value);
  return {uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16)};
}

inline float to_float(Float16 value) {
  const uint32_t sign = uint32_t(value.bits & 0x8000u) << 16;
  const uint32_t exponent = (value.bits >> 10) & 0x1Fu;
  const uint32_t mantissa = value.bits & 0x3FFu;
  if (exponent == 0x1Fu) return bits_float(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  const float magnitude = float(mantissa) * 0x1p-24f;  // zero or subnormal: exact
  return sign ? -magnitude : magnitude;
}

inline Float16 to_float16(float value) {
  const uint32_t bits = float_bits(value);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return {uint16_t(sign | 0x7E00u)};  // NaN
  if (magnitude >= 0x477FF000u) return {uint16_t(sign | 0x7C00u)};  // rounds to >= 65520: inf
  if (magnitude >= 0x38800000u) {  // a normal half (>= 2^-14): rebias, round 23 -> 10 bits
    const uint32_t rebiased = magnitude - 0x38000000u;
    return {uint16_t(sign | ((rebiased + 0xFFFu + ((rebiased >> 13) & 1u)) >> 13))};
  }
  if (magnitude <= 0x33000000u) return {sign};  // <= 2^-25 (a tie with 0 goes to the even 0)
  // A subnormal half: the value in units of 2^-24 is significand * 2^(exponent - 126).
  const uint32_t exponent = magnitude >> 23;  // 102..112
  const uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - exponent;  // 14..24
  uint32_t units = significand >> shift;
  const uint32_t remainder = significand & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (remainder > half || (remainder == half && (units & 1u))) ++units;
  return {uint16_t(sign | units)};
}

}  // namespace ops
}  // namespace starfast
