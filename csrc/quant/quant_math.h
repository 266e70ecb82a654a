#pragma once
// The element math of gradq's group quantization, written once. The scalar reference, the
// vectorized CPU path and the CUDA kernels all call these functions, so the CPU tests cover the
// exact arithmetic the GPU runs. This header compiles without CUDA and without torch.
//
// Numerics, chosen so that every implementation produces bit-identical codes:
//  * rounding is round half to even (quant_rint; rintf for the per-group zero point), the same on
//    host and device;
//  * a group is quantized with the scale *as stored* (fp16 by default), so dequantization of the
//    stored codes reproduces the search's fake-quant weights exactly;
//  * quantize multiplies by inv_scale = 1.0f / scale (IEEE division, never fast-math), rounds that
//    product, and adds the zero point after rounding. The product must be rounded on its own: an
//    FMA contraction of w * inv_scale into quant_rint's addition changes codes near .5. Device code
//    uses __fmul_rn, which nvcc never contracts; host code is compiled with -ffp-contract=off
//    (CMakeLists.txt), which matters once a CPU target has FMA (x86-64-v3 and up);
//  * dequantize is one multiply: scale * (code - zero).

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GRADQ_HD __host__ __device__ __forceinline__
#else
#define GRADQ_HD inline
#endif

namespace gradq {

/// The code widths of gradq's formats (quant_spec.h): 2, 3, 4, 5, 6 and 8 bits.
GRADQ_HD constexpr bool quant_bits_supported(int64_t bits) {
  return bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8;
}

/// Largest code of a `bits`-bit format (codes are unsigned, 0 .. 2^bits - 1).
GRADQ_HD int quant_max_code(int bits) { return (1 << bits) - 1; }

// ---- fp16 storage of scales (IEEE binary16, round to nearest even) -----------------------------
// Written with integer ops so host and device give the same bits without cuda_fp16.h, and without
// branches (selects only), so that a loop over groups vectorizes: the quantizer computes every
// group's parameters of a row in one such loop (row_params.cpp).

GRADQ_HD uint32_t quant_float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

GRADQ_HD float quant_bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

GRADQ_HD uint16_t float_to_half_bits(float f) {
  const uint32_t x = quant_float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t abs = x & 0x7fffffffu;
  // Normal halves (|f| >= 2^-14): drop 13 mantissa bits rounding half to even (a carry moves into
  // the exponent, as it should), then rebias the exponent from 127 to 15.
  const uint32_t normal = ((abs + 0xfffu + ((abs >> 13) & 1u)) >> 13) - (112u << 10);
  // Subnormal halves (|f| < 2^-14) are multiples of 2^-24, the spacing of floats in [0.5, 1): adding
  // 0.5 rounds |f| to that grid (half to even, the default rounding mode), and the bits above 0.5's
  // count the multiples, up to 0x400, the smallest normal half.
  const uint32_t subnormal = quant_float_bits(quant_bits_float(abs) + 0.5f) - 0x3f000000u;
  uint32_t h = abs < 0x38800000u ? subnormal : normal;
  h = abs >= 0x477ff000u ? 0x7c00u : h;  // rounds to >= 65520, or inf: inf
  h = abs > 0x7f800000u ? 0x7e00u : h;   // NaN: a quiet NaN
  return static_cast<uint16_t>(sign | h);
}

GRADQ_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (static_cast<uint32_t>(h) >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  // Both cases are computed and one selected: a compiler may not if-convert a float operation it
  // would have to move out of a branch (it could trap), and then the loop does not vectorize.
  const uint32_t subnormal = quant_float_bits(static_cast<float>(mant) * 5.9604644775390625e-8f);  // mant * 2^-24
  uint32_t x = ((exp + 112u) << 23) | (mant << 13);   // normal
  x = exp == 0x1fu ? 0x7f800000u | (mant << 13) : x;  // inf, NaN
  x = exp == 0u ? subnormal : x;                      // zero, subnormal
  return quant_bits_float(sign | x);
}

/// The value a scale takes once stored: rounded through fp16, or kept as fp32.
GRADQ_HD float quant_round_scale(float scale, bool fp16_scale) {
  return fp16_scale ? half_bits_to_float(float_to_half_bits(scale)) : scale;
}

// ---- Group parameters ---------------------------------------------------------------------------

/// Parameters of one group as stored: scale (already rounded to its storage type) and the integer
/// zero point as a float (asymmetric: 0 .. max_code; symmetric: fixed 2^(bits-1)).
struct GroupParams {
  float scale;
  float zero;
};

/// Asymmetric (min-max) parameters for a group whose values span [lo, hi]. The range is widened to
/// include 0 (as GPTQ does) so that an all-constant group is reproduced exactly and a zero scale
/// only happens for an all-zero group. Clipping searches pass a shrunken [lo, hi].
/// The zero point of a group whose values span [lo, hi] (lo as given to quant_asym_params) when
/// its scale is `scale` as stored: rint(-min(lo, 0) / scale), clamped to the codes 0 .. max_code.
/// With the min-max scale the clamp never acts (-lo <= hi - lo = max_code * scale, up to the
/// scale's rounding); with a scale rounded below the range (a k-format sub-scale) it keeps the
/// zero point a code, and the codes then clamp the end of the range that does not fit. A zero
/// point in 0 .. max_code is what lets the default formats store it in `bits` bits.
GRADQ_HD float quant_asym_zero(float lo, float scale, int bits) {
  lo = lo < 0.f ? lo : 0.f;
  const float max_code = static_cast<float>(quant_max_code(bits));
  // Selects, not branches, so that a loop over groups vectorizes; for a zero scale the quotient is
  // NaN and not selected.
  float zero = rintf(-lo / scale);
  zero = zero > 0.f ? zero : 0.f;
  zero = zero < max_code ? zero : max_code;
  return scale > 0.f ? zero : 0.f;
}

GRADQ_HD GroupParams quant_asym_params(float lo, float hi, int bits, bool fp16_scale) {
  lo = lo < 0.f ? lo : 0.f;
  hi = hi > 0.f ? hi : 0.f;
  const float max_code = static_cast<float>(quant_max_code(bits));
  const float scale = quant_round_scale((hi - lo) / max_code, fp16_scale);
  return {scale, quant_asym_zero(lo, scale, bits)};
}

/// The fixed zero point of the symmetric formats, 2^(bits-1); it is not stored.
GRADQ_HD float quant_sym_zero(int bits) { return static_cast<float>(1 << (bits - 1)); }

/// Symmetric parameters (llama.cpp q4_0 style): the element of largest magnitude, `signed_absmax`
/// with its sign, maps exactly to code 0, so the full code range is used on the side that needs it.
/// Codes represent scale * (code - 2^(bits-1)).
GRADQ_HD GroupParams quant_sym_params(float signed_absmax, int bits, bool fp16_scale) {
  const float half_range = quant_sym_zero(bits);
  const float scale = quant_round_scale(signed_absmax / -half_range, fp16_scale);
  return {scale, half_range};
}

/// The `signed_absmax` of a group whose values span [lo, hi]: the larger-magnitude end with its
/// sign, the positive end on a tie. Deriving it from (lo, hi) rather than from "the first element
/// of largest magnitude" makes it independent of the order in which an implementation (scalar,
/// SIMD lanes, CUDA warp reduction) visits the group; widening to include 0 also fixes the sign
/// of an all-zero group's scale.
GRADQ_HD float quant_sym_signed_absmax(float lo, float hi) {
  lo = lo < 0.f ? lo : 0.f;
  hi = hi > 0.f ? hi : 0.f;
  return hi >= -lo ? hi : lo;
}

// ---- Sub-scales (k6/k8 formats, quant_spec.h) --------------------------------------------------
// A group's scale is stored as an unsigned sub-scale code q (sub_bits wide) of its super-group's
// fp16 super-scale d: scale = d * q. d maps the super-group's largest min-max scale to the largest
// code, so sub-scales are relative to it as llama.cpp's Q4_K 6-bit scales are. d * q is exact in
// float (11 significant bits times at most 8), so every implementation gets the same scale.

/// Largest sub-scale code of a `sub_bits`-wide sub-scale.
GRADQ_HD int quant_max_sub_scale(int sub_bits) { return (1 << sub_bits) - 1; }

/// Super-scale of a super-group whose largest group scale (unrounded) is `max_scale`, as stored (fp16).
/// A super-group of tiny weights (largest scale below about 2^-25 times the largest sub-scale code)
/// would round it to 0 and zero every group; the smallest fp16 subnormal, 2^-24, keeps their scales
/// nonzero (each group's sub-scale code is then clamped, quant_sub_scale_code).
GRADQ_HD float quant_super_scale(float max_scale, int sub_bits) {
  const float d = quant_round_scale(max_scale / static_cast<float>(quant_max_sub_scale(sub_bits)), /*fp16_scale=*/true);
  constexpr float kSmallestHalf = 5.9604644775390625e-8f;  // 2^-24
  return max_scale > 0.f && d == 0.f ? kSmallestHalf : d;
}

/// Sub-scale code of a group scale `scale` (unrounded, >= 0) against the stored super-scale `d`:
/// rint(scale / d) clamped to 1 .. max (a nonzero scale never becomes 0, which would zero the whole
/// group); 0 for a zero scale or a zero d (an all-zero super-group).
GRADQ_HD uint32_t quant_sub_scale_code(float scale, float d, int sub_bits) {
  const float max_sub = static_cast<float>(quant_max_sub_scale(sub_bits));
  float q = rintf(scale / d);
  q = q > 1.f ? q : 1.f;
  q = q < max_sub ? q : max_sub;
  return scale > 0.f && d > 0.f ? static_cast<uint32_t>(static_cast<int32_t>(q)) : 0u;
}

/// The scale a sub-scale code stands for.
GRADQ_HD float quant_sub_scale_value(uint32_t code, float d) { return d * static_cast<float>(code); }

/// 1 / scale, or 0 for a zero scale (every element of such a group is 0 and maps to the zero point).
GRADQ_HD float quant_inv_scale(float scale) { return scale != 0.f ? 1.0f / scale : 0.f; }

/// Round half to even, as rintf, for |x| <= 2^22: adding 1.5 * 2^23 moves x to where the spacing of
/// floats is 1, so the addition itself rounds (in the default rounding mode) and the subtraction is
/// exact. Beyond 2^22 the result is not rintf's but keeps its side: >= 2^22 for x >= 2^22 and
/// <= -2^22 for x <= -2^22 (infinities stay), which is all quant_code needs. Unlike rintf it
/// vectorizes on baseline x86-64 (SSE2 has no round instruction).
GRADQ_HD float quant_rint(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (x + kMagic) - kMagic;
}

/// Code of one element: clamp(rint(w * inv_scale) + zero, 0, max_code). Where quant_rint is not
/// exact (|w * inv_scale| > 2^22) the clamp gives the same end code, since zero <= 255. The integer
/// conversion goes through int32, which SIMD units have. The clamp is written as max and min
/// exactly (`a > b ? a : b`), so compilers emit SIMD max/min instead of compare-and-blend (GCC
/// does not when built with -fno-trapping-math: see row_params.h).
GRADQ_HD uint32_t quant_code(float w, float inv_scale, float zero, int bits) {
  const float max_code = static_cast<float>(quant_max_code(bits));
#if defined(__CUDA_ARCH__)
  const float scaled = __fmul_rn(w, inv_scale);  // never fused with quant_rint's addition
#else
  const float scaled = w * inv_scale;  // not fused either: -ffp-contract=off (see the top of this file)
#endif
  float q = quant_rint(scaled) + zero;
  q = q > 0.f ? q : 0.f;
  q = q < max_code ? q : max_code;
  return static_cast<uint32_t>(static_cast<int32_t>(q));
}

/// Value of one code.
GRADQ_HD float quant_dequant(uint32_t code, float scale, float zero) {
  return scale * (static_cast<float>(code) - zero);
}

// ---- Code packing -------------------------------------------------------------------------------
// Each row of a packed weight is a little-endian bit stream: code i of the row occupies bits
// [i*bits, i*bits + bits) counted from bit 0 of byte 0. Rows are padded to whole bytes, so
// row_bytes = ceil(in_features * bits / 8). For 4 bits, byte j holds code 2j in its low nibble and
// code 2j+1 in its high nibble; 3-bit codes may straddle a byte boundary:
//
//   3-bit, 8 codes in 3 bytes:  byte0 = c2[1:0] c1[2:0] c0[2:0]   (msb .. lsb)
//                               byte1 = c5[0]   c4[2:0] c3[2:0] c2[2]
//                               byte2 = c7[2:0] c6[2:0] c5[2:1]

/// Bytes of one packed row of `in_features` codes.
GRADQ_HD int64_t quant_row_bytes(int64_t in_features, int bits) { return (in_features * bits + 7) / 8; }

/// ORs code i into a zero-initialised packed row.
GRADQ_HD void quant_pack_code(uint8_t* row, int64_t i, int bits, uint32_t code) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  row[byte] = static_cast<uint8_t>(row[byte] | ((code << shift) & 0xffu));
  if (shift + bits > 8) row[byte + 1] = static_cast<uint8_t>(row[byte + 1] | (code >> (8 - shift)));
}

/// Packs 8 codes into exactly `bits` bytes at out (8 codes always fill whole bytes, and groups
/// start at multiples of 16 codes, so every full chunk of a group is byte-aligned). Same bytes as
/// eight quant_pack_code calls on zeroed memory, written without reading them.
GRADQ_HD void quant_pack8(const uint32_t* codes, int bits, uint8_t* out) {
  uint64_t v = 0;
  for (int k = 0; k < 8; ++k) v |= static_cast<uint64_t>(codes[k]) << (k * bits);
  for (int b = 0; b < bits; ++b) out[b] = static_cast<uint8_t>(v >> (8 * b));
}

/// Byte j of a packed row when the code width divides 8 (2, 4 or 8 bits): `codes` points at code
/// j * 8 / bits, and the byte holds that code and the next ones, the first in the low bits. The
/// same bytes as quant_pack8, in a form that vectorizes across bytes (its 64-bit shifts do not).
GRADQ_HD uint8_t quant_pack_byte(const uint32_t* codes, int bits) {
  uint32_t byte = 0;
  for (int k = 0; k < 8 / bits; ++k) byte |= codes[k] << (k * bits);
  return static_cast<uint8_t>(byte);
}

/// The codes of one byte of a packed row when the code width divides 8 (the inverse of
/// quant_pack_byte): 8 / bits codes, the first from the low bits.
GRADQ_HD void quant_unpack_byte(uint8_t byte, int bits, uint32_t* codes) {
  const uint32_t mask = static_cast<uint32_t>(quant_max_code(bits));
  for (int k = 0; k < 8 / bits; ++k) codes[k] = (static_cast<uint32_t>(byte) >> (k * bits)) & mask;
}

/// Unpacks the 8 codes of `bits` bytes at in (the inverse of quant_pack8).
GRADQ_HD void quant_unpack8(const uint8_t* in, int bits, uint32_t* codes) {
  uint64_t v = 0;
  for (int b = 0; b < bits; ++b) v |= static_cast<uint64_t>(in[b]) << (8 * b);
  const uint64_t mask = static_cast<uint64_t>(quant_max_code(bits));
  for (int k = 0; k < 8; ++k) codes[k] = static_cast<uint32_t>((v >> (k * bits)) & mask);
}

/// Reads code i of a packed row.
GRADQ_HD uint32_t quant_unpack_code(const uint8_t* row, int64_t i, int bits) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint32_t v = static_cast<uint32_t>(row[byte]) >> shift;
  if (shift + bits > 8) v |= static_cast<uint32_t>(row[byte + 1]) << (8 - shift);
  return v & static_cast<uint32_t>(quant_max_code(bits));
}

}  // namespace gradq
