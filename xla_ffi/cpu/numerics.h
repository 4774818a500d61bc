// Bit-exact number formats of the protocol on the host: bf16, float8_e4m3fn, and the per-128-channel fp8 scales.
//
// Everything is float32 IEEE arithmetic with one rounding per operation (the module is built with
// -ffp-contract=off, so no multiply-add is fused); the semantics are those of jax_ll_ep/fp8.py and tests/oracle.py.
#pragma once

#include <stdint.h>
#include <string.h>

#include <cmath>

#include "jax_ll_ep/layout.h"

namespace jax_ll_ep::cpu {

inline uint32_t float_bits(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof(b));
  return b;
}

inline float bits_float(uint32_t b) {
  float f;
  memcpy(&f, &b, sizeof(f));
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest, ties to even (what numpy/ml_dtypes astype(bfloat16) does); NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t b = float_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

// float32 -> float8_e4m3fn, round to nearest even. The caller clips to [-448, 448] first (the format has no
// infinity; 448 is its largest finite value), so rounding never carries past the largest code 0x7e.
inline uint8_t float_to_e4m3fn(float v) {
  const uint32_t b = float_bits(v);
  const uint8_t sign = static_cast<uint8_t>((b >> 24) & 0x80u);
  const uint32_t a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7f;  // NaN
  const float av = bits_float(a);
  if (av >= 448.0f) return sign | 0x7e;
  if (av < 0.015625f) {
    // Below the smallest normal 2^-6 the codes are multiples of 2^-9 (code m = m * 2^-9; m = 8 is 2^-6 itself,
    // whose code 0x08 is the same number). av * 512 is exact: a power-of-two scale of a float32.
    const float q = av * 512.0f;
    uint32_t m = static_cast<uint32_t>(q);
    const float frac = q - static_cast<float>(m);  // exact: q < 8 has at most 23 fraction bits
    if (frac > 0.5f || (frac == 0.5f && (m & 1u))) ++m;
    return sign | static_cast<uint8_t>(m);
  }
  // Normal: keep 3 of float32's 23 mantissa bits, rounding the other 20 to nearest even. A carry out of the
  // mantissa lands in the exponent field, which is exactly the next binade.
  const int32_t exponent = static_cast<int32_t>(a >> 23) - 127;  // -6..8
  uint32_t keep = (a & 0x7fffffu) >> 20;
  const uint32_t rest = a & 0xfffffu;
  if (rest > 0x80000u || (rest == 0x80000u && (keep & 1u))) ++keep;
  return sign | static_cast<uint8_t>((static_cast<uint32_t>(exponent + 7) << 3) + keep);
}

// The smallest integer e with 2^e >= q, read exactly from the bits of the float32 q (q > 0, normal).
inline int32_t ceil_log2(float q) {
  const uint32_t b = float_bits(q);
  const int32_t exponent = static_cast<int32_t>((b >> 23) & 0xffu) - 127;
  return exponent + ((b & 0x7fffffu) != 0 ? 1 : 0);
}

// Quantizes one token of H bf16 values to e4m3 data and H/128 float32 scales (the wire format: always float32;
// the receiver converts to UE8M0 when asked). Per 128-channel block:
//   amax = max(max_i |x_i|, 1e-4);  float: scale = amax / 448, inv = 448 / amax;
//   pow2/ue8m0: e = ceil_log2(amax / 448), scale = 2^e, inv = 2^-e;
//   data_i = e4m3fn(clip(x_i * inv, -448, 448)).
// Non-finite inputs give unspecified (but in-bounds) results.
inline void quantize_fp8_token(const uint16_t* x, int32_t hidden, Fp8Mode mode, uint8_t* data, float* scales) {
  for (int32_t block = 0; block * kScaleBlock < hidden; ++block) {
    const int32_t begin = block * kScaleBlock;
    const int32_t end = begin + kScaleBlock < hidden ? begin + kScaleBlock : hidden;
    float amax = 0.0f;
    for (int32_t i = begin; i < end; ++i) amax = std::fmax(amax, std::fabs(bf16_to_float(x[i])));
    amax = std::fmax(amax, 1e-4f);
    float scale, inv;
    if (mode == Fp8Mode::kFloatScale) {
      scale = amax / 448.0f;
      inv = 448.0f / amax;
    } else {
      const int32_t e = ceil_log2(amax / 448.0f);
      scale = std::ldexp(1.0f, e);
      inv = std::ldexp(1.0f, -e);
    }
    scales[block] = scale;
    for (int32_t i = begin; i < end; ++i) {
      const float v = bf16_to_float(x[i]) * inv;
      data[i] = float_to_e4m3fn(v < -448.0f ? -448.0f : (v > 448.0f ? 448.0f : v));
    }
  }
}

// UE8M0 byte of a power-of-two float32 scale 2^e: e + 127, which is the float's biased exponent field.
inline uint8_t ue8m0_of(float pow2_scale) { return static_cast<uint8_t>((float_bits(pow2_scale) >> 23) & 0xffu); }

}  // namespace jax_ll_ep::cpu
