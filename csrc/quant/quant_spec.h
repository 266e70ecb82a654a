#pragma once
// The one definition of gradq's weight formats and of their storage accounting.
//
// A quantized weight W [out_features, in_features] is stored as
//   codes  uint8  [out_features, quant_row_bytes(in_features, bits)]  bit stream per row (quant_math.h)
//   scales fp16 or fp32 [out_features, n_groups]
//   zeros  uint8  [out_features, n_groups]   asymmetric only; symmetric uses the fixed 2^(bits-1)
// Groups run along in_features; n_groups = ceil(in_features / group_size) and the last group may
// be partial (172 inputs with group 32: five groups of 32 and one of 12). Nothing is padded except
// each packed row to a whole byte.
// The level ladder a search walks: prune < int2 < int3 < int4 < int8 < fp16/bf16 < fp32.

#include <cstdint>
#include <string>

namespace gradq {

enum class QuantLevel : int8_t {
  kPrune = 0,  ///< weight removed: zero contribution, stores nothing
  kInt2,
  kInt3,
  kInt4,
  kInt8,
  kFp16,
  kBf16,
  kFp32,
};

/// Group size meaning "one group per row".
constexpr int64_t kWholeRow = 0;

struct QuantSpec {
  QuantLevel level = QuantLevel::kInt4;
  int64_t group_size = 128;   ///< 16, 32, 64, 128 or kWholeRow; integer levels only
  bool symmetric = false;     ///< integer levels only
  bool fp16_scale = true;     ///< scales stored as fp16 (default) or fp32

  /// True for the integer (group-quantized) levels.
  bool is_integer() const;
  /// Bits of one code; throws for non-integer levels.
  int bits() const;
  /// Groups per row for a row of `in_features`.
  int64_t n_groups(int64_t in_features) const;
  /// Effective group length along a row of `in_features` (group_size, or in_features for kWholeRow).
  int64_t group_len(int64_t in_features) const;
  /// Exact storage of a [out_features, in_features] tensor in this format, in bytes: codes (padded
  /// rows), scales and zero points for integer levels; the element size for float levels; 0 for prune.
  int64_t storage_bytes(int64_t out_features, int64_t in_features) const;
  /// storage_bytes * 8 / (out_features * in_features).
  double bits_per_weight(int64_t out_features, int64_t in_features) const;
  /// Throws gradq::Error naming the valid choices when the spec is not a supported combination.
  void validate() const;
  /// Short name: "b4g128", "b3g32s" (symmetric), "b8grow", "b4g64-f32" (fp32 scales), "fp16",
  /// "bf16", "fp32", "prune". parse_quant_spec() reads the same names.
  std::string name() const;

  bool operator==(const QuantSpec& o) const;
  bool operator!=(const QuantSpec& o) const { return !(*this == o); }
};

/// Parses QuantSpec::name() strings; throws gradq::Error with the grammar on bad input.
QuantSpec parse_quant_spec(const std::string& name);

/// Level for an integer bit width (2, 3, 4, 8); throws otherwise.
QuantLevel quant_level_for_bits(int bits);

/// "int4", "fp16", "prune", ...
const char* quant_level_name(QuantLevel level);

}  // namespace gradq
