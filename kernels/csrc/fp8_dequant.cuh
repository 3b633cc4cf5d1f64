// e4m3 -> bf16 dequantization of the FP8 latent cache (the 656-byte row, config.h), written as
// __host__ __device__ functions so that a host program (tests/kernels/fp8_twin.cpp) checks them
// byte for byte against kvpager.fp8.dequantize with the very code the kernel runs.
//
// Why bit moves and not converts: Hopper has no e4m3 -> bf16 convert, and the chain
// e4m3 -> f16 -> f32 -> bf16 runs on the narrow conversion pipe (the published FP8 decode's
// bottleneck, KERNEL-NOTES.md). Moving an e4m3 byte's 7 magnitude bits to bits 10..4 of a 16-bit
// lane, its sign to bit 15, gives the bf16 whose value is exactly value * 2^-120: the exponent
// biases are 7 and 127, the mantissa is 3 bits wide in both places, and e4m3 subnormals land on bf16
// subnormals with the same mantissa. A bf16 multiply by 2^120 restores the value exactly
// (|value| <= 448), a second by the group's power-of-two scale scales it exactly (one multiply by
// scale * 2^120 when that is a bf16: scales up to 2^7). Three integer ops on the ALU pipe and one or
// two HMUL2 per two values; a row of zero bytes (zero-filled past the sequence end)
// dequantizes to +0 with a +0 scale, so no NaN of the pool can reach the MMAs.
//
// One deviation from kvpager.fp8.dequantize, by design: the e4m3 NaN codes 0x7F / 0xFF read as
// +-480 * scale (NaN only when the scale is NaN). No quantizer writes them beside a usable scale:
// every stored value is <= 448 by construction of the scale, and a non-finite input makes the
// scale itself NaN, which does propagate. Checking for them would cost ~40 % more integer ops.
// Scales that are not powers of two are rounded to bf16 before the multiply.
#pragma once
#include <cstdint>
#include <cstring>

#include "config.h"  // KVPAGER_HD: host and device, or host only for the twins

#ifdef __CUDACC__
#include <cuda_bf16.h>
#endif

namespace kvpager {

// PRMT (byte permute, default mode): byte i of the result is byte n & 7 of {y:x}, n = (s >> 4i) & 15;
// when n & 8, the byte is that byte's sign replicated (0x00 or 0xFF).
KVPAGER_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#ifdef __CUDA_ARCH__
  uint32_t r;  // prmt.b32 itself: __byte_perm ignores the sign-replicate bit of the selector
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(x), "r"(y), "r"(s));
  return r;
#else
  const uint64_t v = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t n = (s >> (4 * i)) & 15;
    uint32_t b = uint32_t(v >> (8 * (n & 7))) & 0xFF;
    if (n & 8) b = (b & 0x80) ? 0xFF : 0x00;
    r |= b << (8 * i);
  }
  return r;
#endif
}

#ifndef __CUDA_ARCH__
// Host twins of the two bf16 instructions used below (round to nearest even, as the GPU does).
inline float bf16_bits_to_float(uint32_t h) {
  const uint32_t u = h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFFu;  // NaN: the GPU's canonical bf16 NaN
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
#endif

// (a.lo * b.lo, a.hi * b.hi) in bf16, rounded to nearest even; subnormals are kept.
KVPAGER_HD uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
#else
  // bf16 x bf16 fits a float's 24-bit significand, so the float product rounded once is the
  // bf16 instruction's result.
  const uint32_t lo = float_to_bf16_bits(bf16_bits_to_float(a & 0xFFFFu) * bf16_bits_to_float(b & 0xFFFFu));
  const uint32_t hi = float_to_bf16_bits(bf16_bits_to_float(a >> 16) * bf16_bits_to_float(b >> 16));
  return lo | (hi << 16);
#endif
}

// A float32 scale as bf16 in both halves of a bf16x2 (exact for the format's power-of-two scales).
KVPAGER_HD uint32_t bf16x2_splat(float scale) {
#ifdef __CUDA_ARCH__
  const uint32_t h = __bfloat16_as_ushort(__float2bfloat16_rn(scale));
#else
  const uint32_t h = float_to_bf16_bits(scale);
#endif
  return h | (h << 16);
}

// Bytes kFirstByte and kFirstByte + 1 of x (two e4m3 values) as the bf16x2 (first in the low half)
// of value * 2^-120, exactly, in 3 ops: PRMT sign-extends each byte to its 16-bit lane, a 4-bit left
// shift puts the 7 magnitude bits at 10..4 and a copy of the sign at 15 (the bits that cross into
// the next lane, and the byte's own sign at bit 11, are cleared by the mask).
template <int kFirstByte>
KVPAGER_HD uint32_t e4m3x2_to_bf16x2_unscaled(uint32_t x) {
  static_assert(kFirstByte == 0 || kFirstByte == 2, "a 32-bit word holds two pairs");
  constexpr uint32_t kSelector = kFirstByte == 0 ? 0x9180u : 0xB3A2u;  // byte, its sign, next byte, its sign
  return (byte_perm(x, 0u, kSelector) << 4) & 0x87F087F0u;
}

// Scales up to 2^7 let the two multiplies fold into one: scale * 2^120 is then still a bf16, and
// the single product is the same exact value, so both forms give the same bits. (NaN: not folded.)
KVPAGER_HD bool fp8_scale_folds(float scale) { return scale <= kFp8FoldMaxScale; }

// Four e4m3 values (one 32-bit word of a row, the first value in the low byte) times the group's
// scale -> two bf16x2: lo = (v0, v1), hi = (v2, v3). factor2 (dequant_factor) is the scale as
// bf16x2, times 2^120 when kFolded.
template <bool kFolded>
KVPAGER_HD void dequant_e4m3x4(uint32_t x, uint32_t factor2, uint32_t& lo, uint32_t& hi) {
  if constexpr (kFolded) {
    lo = bf16x2_mul(e4m3x2_to_bf16x2_unscaled<0>(x), factor2);
    hi = bf16x2_mul(e4m3x2_to_bf16x2_unscaled<2>(x), factor2);
  } else {
    lo = bf16x2_mul(bf16x2_mul(e4m3x2_to_bf16x2_unscaled<0>(x), kBf16x2TwoPow120), factor2);
    hi = bf16x2_mul(bf16x2_mul(e4m3x2_to_bf16x2_unscaled<2>(x), kBf16x2TwoPow120), factor2);
  }
}

template <bool kFolded>
KVPAGER_HD uint32_t dequant_factor(float scale) {
  return bf16x2_splat(kFolded ? scale * kTwoPow120 : scale);
}

// The 16 latent bytes x of one row (16-byte aligned, within one scale group) as 8 bf16x2 words
// w[k] = (value[2k], value[2k + 1]) * scale: what one lane of the kernel holds per key tile.
// kFolded needs fp8_scale_folds(scale).
template <bool kFolded>
KVPAGER_HD void dequant_16(const uint32_t (&x)[4], float scale, uint32_t (&w)[8]) {
  const uint32_t factor2 = dequant_factor<kFolded>(scale);
#pragma unroll
  for (int i = 0; i < 4; ++i) dequant_e4m3x4<kFolded>(x[i], factor2, w[2 * i], w[2 * i + 1]);
}

}  // namespace kvpager
