#pragma once
// The one definition of gradq's weight formats and of their storage accounting.
//
// A quantized weight W [out_features, in_features] is stored as
//   codes      uint8 [out, quant_row_bytes(in_features, bits)]       bit stream per row (quant_math.h)
//   scales     fp16 or fp32 [out, n_groups]                         direct scales (the default), or
//              fp16 [out, n_super_groups]                           super-scales (k6/k8 formats)
//   sub_scales uint8 [quant_row_bytes(out * n_groups, sub_scale_bits)]  k6/k8 formats only
//   zeros      uint8 [quant_row_bytes(out * n_groups, zero_bits)]   asymmetric only; symmetric uses
//              (8-bit zero points: [out, n_groups], the same bytes)   the fixed 2^(bits-1)
// Groups run along in_features; n_groups = ceil(in_features / group_size) and the last group may
// be partial (172 inputs with group 32: five groups of 32 and one of 12). Nothing is padded except
// each packed row to a whole byte.
//
// Side information (names: parse_quant_spec; b4g32 is 4-bit codes in groups of 32; codes are 2, 3,
// 4, 5, 6 or 8 bits wide):
//   b4g32      asymmetric, zero points at the code width (4 bits here), fp16 scales. The zero point
//              of quant_asym_params is always in 0 .. 2^bits - 1 (the group's range is widened to
//              include 0), so b bits hold it exactly: same values as z8, fewer bytes.
//   b4g32z8    the same values with each zero point in a byte of its own: the layout of gradq
//              checkpoints written before b-bit zeros (gradq::linear reads it with zero_bits = 8).
//   b4g32s     symmetric: no zero point stored.
//   b4g32k6    K-quant style (llama.cpp Q4_K): each group's scale is a 6-bit (k8: 8-bit) unsigned
//              sub-scale times one fp16 super-scale per super-group of kSuperGroup inputs of a row:
//              scale = super_scale * sub_scale. Asymmetric, zero points at the code width.
//   -f32       suffix: fp32 scales instead of fp16 (not with k6/k8, whose super-scale is fp16).
//
// Zero points and sub-scales are little-endian bit streams over the whole tensor, one field per
// group in row-major order: the field of group g of row r occupies bits [k*w, k*w + w) from bit 0 of
// byte 0, k = r * n_groups + g, w = zero_bits or sub_scale_bits, padded to a whole byte once per
// tensor, not per row: on rows of 64 inputs with one group (b4g64) a per-row byte would cost a 4-bit
// zero point 8 bits. With w = 8 this is the [out, n_groups] byte array of earlier checkpoints, whose
// shape z8 tensors keep. One row of b3g32k6 with in_features = 172 (6 groups, 1 super-group):
//
//   codes       65 bytes   byte0 = c2[1:0] c1[2:0] c0[2:0], ...  (msb .. lsb, as quant_math.h draws)
//   scales       2 bytes   fp16 super-scale d of inputs 0..171
//   sub_scales   5 bytes   byte0 = q1[1:0] q0[5:0], byte1 = q2[3:0] q1[5:2], byte2 = q3[5:0] q2[5:4], ...
//   zeros        3 bytes   byte0 = z2[1:0] z1[2:0] z0[2:0], byte1 = z5[0] z4 z3 z2[2], byte2 = 000000 z5[2:1]
//   group g: w_i = d * q_g * (c_i - z_g); 65 + 2 + 5 + 3 = 75 bytes for 172 weights, 3.49 bits each
// (a second row's zero points would continue in byte2 at bit 2: z6[2:0] at bits 2..4, ...)

// The level ladder a search walks: prune < int2 < int3 < int4 < int5 < int6 < int8 < fp16/bf16 < fp32.
// 5- and 6-bit codes (llama.cpp's Q5_K/Q6_K, exllamav2's 5/6-bit) are the step between 4 and 8 bits
// that tight budgets need: at +1% perplexity on stories260K without them the search could only
// choose between 8.25-bit and 5.25-bit weights (docs/BENCHMARKS.md, "5- and 6-bit formats").

#include <cstdint>
#include <string>

namespace gradq {

enum class QuantLevel : int8_t {
  kPrune = 0,  ///< weight removed: zero contribution, stores nothing
  kInt2,
  kInt3,
  kInt4,
  kInt5,
  kInt6,
  kInt8,
  kFp16,
  kBf16,
  kFp32,
};

/// Group size meaning "one group per row".
constexpr int64_t kWholeRow = 0;

/// Inputs of a row that share one super-scale in the k6/k8 formats (llama.cpp's QK_K): a whole
/// number of groups of every group size, so no group straddles two super-scales.
constexpr int64_t kSuperGroup = 256;
static_assert(kSuperGroup % 128 == 0 && kSuperGroup % 64 == 0 && kSuperGroup % 32 == 0 && kSuperGroup % 16 == 0,
              "every group size divides a super-group");

/// Widths of the sub-scales of the k formats. A sub-scale is one unsigned field of a packed row,
/// at most a byte wide, like a code.
constexpr int kSubScaleBits6 = 6;
constexpr int kSubScaleBits8 = 8;
static_assert(kSubScaleBits6 <= 8 && kSubScaleBits8 <= 8, "a sub-scale is read like a code of at most 8 bits");
/// Width of a zero point in the z8 formats (and of a byte).
constexpr int kZeroBits8 = 8;

struct QuantSpec {
  QuantLevel level = QuantLevel::kInt4;
  int64_t group_size = 128;   ///< 16, 32, 64, 128 or kWholeRow; integer levels only
  bool symmetric = false;     ///< integer levels only
  bool fp16_scale = true;     ///< scales stored as fp16 (default) or fp32; must be true with sub-scales
  bool zero_8bit = false;     ///< asymmetric only: zero points in a byte each (z8) instead of `bits` bits
  int sub_scale_bits = 0;     ///< 0: scales stored directly; 6 or 8: sub-scales of a fp16 super-scale

  /// True for the integer (group-quantized) levels.
  bool is_integer() const;
  /// Bits of one code; throws for non-integer levels.
  int bits() const;
  /// Groups per row for a row of `in_features`.
  int64_t n_groups(int64_t in_features) const;
  /// Effective group length along a row of `in_features` (group_size, or in_features for kWholeRow).
  int64_t group_len(int64_t in_features) const;
  /// Bits of one stored zero point: 0 for symmetric formats, 8 for z8, bits() otherwise.
  int zero_bits() const;
  /// Super-groups per row (k formats; 0 otherwise).
  int64_t n_super_groups(int64_t in_features) const;
  /// Shape [rows, cols] of the scales tensor: [out, n_groups], or [out, n_super_groups] for k formats.
  int64_t scale_cols(int64_t in_features) const;
  /// Exact storage of a [out_features, in_features] tensor in this format, in bytes: codes (padded
  /// rows), scales and zero points for integer levels; the element size for float levels; 0 for prune.
  int64_t storage_bytes(int64_t out_features, int64_t in_features) const;
  /// storage_bytes * 8 / (out_features * in_features).
  double bits_per_weight(int64_t out_features, int64_t in_features) const;
  /// Throws gradq::Error naming the valid choices when the spec is not a supported combination.
  void validate() const;
  /// Short name: "b4g128", "b3g32s" (symmetric), "b4g32z8" (8-bit zero points), "b4g16k6"
  /// (6-bit sub-scales), "b8grow", "b4g64-f32" (fp32 scales), "fp16", "bf16", "fp32", "prune".
  /// parse_quant_spec() reads the same names.
  std::string name() const;

  bool operator==(const QuantSpec& o) const;
  bool operator!=(const QuantSpec& o) const { return !(*this == o); }
};

/// Parses QuantSpec::name() strings; throws gradq::Error with the grammar on bad input.
QuantSpec parse_quant_spec(const std::string& name);

/// Every level, lowest first (the ladder above).
inline constexpr QuantLevel kQuantLevels[] = {QuantLevel::kPrune, QuantLevel::kInt2, QuantLevel::kInt3,
                                              QuantLevel::kInt4,  QuantLevel::kInt5, QuantLevel::kInt6,
                                              QuantLevel::kInt8,  QuantLevel::kFp16, QuantLevel::kBf16,
                                              QuantLevel::kFp32};

/// Level for an integer bit width (2, 3, 4, 5, 6, 8); throws otherwise.
QuantLevel quant_level_for_bits(int bits);

/// The integer levels' names, "int2, int3, int4, int5, int6, int8", and their widths, "2, 3, 4, 5, 6, 8",
/// read from kQuantLevels: for the messages that name what is expected.
std::string quant_integer_level_names();
std::string quant_integer_bits_names();

/// "int4", "fp16", "prune", ...
const char* quant_level_name(QuantLevel level);

}  // namespace gradq
