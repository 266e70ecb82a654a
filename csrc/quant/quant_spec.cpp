#include "quant/quant_spec.h"

#include <regex>

#include "common/error.h"
#include "quant/quant_math.h"

namespace gradq {

bool QuantSpec::is_integer() const {
  return level == QuantLevel::kInt2 || level == QuantLevel::kInt3 || level == QuantLevel::kInt4 ||
         level == QuantLevel::kInt5 || level == QuantLevel::kInt6 || level == QuantLevel::kInt8;
}

int QuantSpec::bits() const {
  switch (level) {
    case QuantLevel::kInt2: return 2;
    case QuantLevel::kInt3: return 3;
    case QuantLevel::kInt4: return 4;
    case QuantLevel::kInt5: return 5;
    case QuantLevel::kInt6: return 6;
    case QuantLevel::kInt8: return 8;
    default: throw Error(fmt::format("bits() asked of non-integer level {}", quant_level_name(level)));
  }
}

int64_t QuantSpec::group_len(int64_t in_features) const {
  return group_size == kWholeRow ? in_features : group_size;
}

int64_t QuantSpec::n_groups(int64_t in_features) const {
  const int64_t g = group_len(in_features);
  return g == 0 ? 0 : (in_features + g - 1) / g;
}

int QuantSpec::zero_bits() const {
  if (symmetric) return 0;
  return zero_8bit ? kZeroBits8 : bits();
}

int64_t QuantSpec::n_super_groups(int64_t in_features) const {
  return sub_scale_bits == 0 ? 0 : (in_features + kSuperGroup - 1) / kSuperGroup;
}

int64_t QuantSpec::scale_cols(int64_t in_features) const {
  return sub_scale_bits == 0 ? n_groups(in_features) : n_super_groups(in_features);
}

int64_t QuantSpec::storage_bytes(int64_t out_features, int64_t in_features) const {
  switch (level) {
    case QuantLevel::kPrune: return 0;
    case QuantLevel::kFp16:
    case QuantLevel::kBf16: return out_features * in_features * 2;
    case QuantLevel::kFp32: return out_features * in_features * 4;
    default: break;
  }
  const int64_t groups = n_groups(in_features);
  const int64_t codes = out_features * quant_row_bytes(in_features, bits());
  const int64_t scales = out_features * scale_cols(in_features) * (fp16_scale ? 2 : 4);
  const int64_t sub_scales = quant_row_bytes(out_features * groups, sub_scale_bits);
  const int64_t zeros = quant_row_bytes(out_features * groups, zero_bits());
  return codes + scales + sub_scales + zeros;
}

double QuantSpec::bits_per_weight(int64_t out_features, int64_t in_features) const {
  const int64_t n = out_features * in_features;
  return n == 0 ? 0.0 : 8.0 * static_cast<double>(storage_bytes(out_features, in_features)) / static_cast<double>(n);
}

void QuantSpec::validate() const {
  if (!is_integer()) return;
  GRADQ_CHECK(group_size == kWholeRow || group_size == 16 || group_size == 32 || group_size == 64 ||
                  group_size == 128,
              "group size must be one of 16, 32, 64, 128 or whole row (0), got {}", group_size);
  GRADQ_CHECK(!(zero_8bit && symmetric), "z8 (8-bit zero points) needs an asymmetric format; symmetric formats store no zero points");
  GRADQ_CHECK(!(zero_8bit && bits() == 8), "z8 with 8-bit codes is the default layout already: write b8g{} without z8",
              group_size == kWholeRow ? std::string("row") : std::to_string(group_size));
  GRADQ_CHECK(sub_scale_bits == 0 || sub_scale_bits == kSubScaleBits6 || sub_scale_bits == kSubScaleBits8,
              "sub-scale bits must be 0 (direct scales), 6 or 8, got {}", sub_scale_bits);
  if (sub_scale_bits != 0) {
    // Unsigned sub-scales cannot carry the sign of a symmetric scale (quant_sym_params).
    GRADQ_CHECK(!symmetric, "k{} sub-scales need an asymmetric format (b<bits>g<size>k{}), got a symmetric one",
                sub_scale_bits, sub_scale_bits);
    GRADQ_CHECK(fp16_scale, "k{} formats store a fp16 super-scale; -f32 does not combine with them", sub_scale_bits);
    GRADQ_CHECK(group_size != kWholeRow, "k{} formats need groups of 16, 32, 64 or 128 inside super-groups of {}, got whole-row groups",
                sub_scale_bits, kSuperGroup);
    GRADQ_CHECK(!zero_8bit, "k{} formats store zero points at the code width; z8 does not combine with them", sub_scale_bits);
  }
}

std::string QuantSpec::name() const {
  if (!is_integer()) return quant_level_name(level);
  std::string n = fmt::format("b{}g{}", bits(), group_size == kWholeRow ? std::string("row") : std::to_string(group_size));
  if (symmetric) n += "s";
  if (zero_8bit) n += "z8";
  if (sub_scale_bits != 0) n += "k" + std::to_string(sub_scale_bits);
  if (!fp16_scale) n += "-f32";
  return n;
}

bool QuantSpec::operator==(const QuantSpec& o) const {
  if (level != o.level) return false;
  if (!is_integer()) return true;
  return group_size == o.group_size && symmetric == o.symmetric && fp16_scale == o.fp16_scale &&
         zero_8bit == o.zero_8bit && sub_scale_bits == o.sub_scale_bits;
}

QuantLevel quant_level_for_bits(int bits) {
  switch (bits) {
    case 2: return QuantLevel::kInt2;
    case 3: return QuantLevel::kInt3;
    case 4: return QuantLevel::kInt4;
    case 5: return QuantLevel::kInt5;
    case 6: return QuantLevel::kInt6;
    case 8: return QuantLevel::kInt8;
    default: throw Error(fmt::format("bits must be one of {}, got {}", quant_integer_bits_names(), bits));
  }
}

std::string quant_integer_level_names() {
  std::string names;
  for (QuantLevel level : kQuantLevels)
    if (QuantSpec{level}.is_integer()) names += (names.empty() ? "" : ", ") + std::string(quant_level_name(level));
  return names;
}

std::string quant_integer_bits_names() {
  std::string names;
  for (QuantLevel level : kQuantLevels)
    if (QuantSpec{level}.is_integer()) names += (names.empty() ? "" : ", ") + std::to_string(QuantSpec{level}.bits());
  return names;
}

const char* quant_level_name(QuantLevel level) {
  switch (level) {
    case QuantLevel::kPrune: return "prune";
    case QuantLevel::kInt2: return "int2";
    case QuantLevel::kInt3: return "int3";
    case QuantLevel::kInt4: return "int4";
    case QuantLevel::kInt5: return "int5";
    case QuantLevel::kInt6: return "int6";
    case QuantLevel::kInt8: return "int8";
    case QuantLevel::kFp16: return "fp16";
    case QuantLevel::kBf16: return "bf16";
    case QuantLevel::kFp32: return "fp32";
  }
  return "?";
}

QuantSpec parse_quant_spec(const std::string& name) {
  QuantSpec spec;
  if (name == "prune" || name == "fp16" || name == "bf16" || name == "fp32") {
    spec.level = name == "prune" ? QuantLevel::kPrune
                 : name == "fp16" ? QuantLevel::kFp16
                 : name == "bf16" ? QuantLevel::kBf16
                                  : QuantLevel::kFp32;
    return spec;
  }
  // At most two digits of bits (std::stoi would throw its own exception beyond int), and a length
  // check first: libstdc++'s regex matcher recurses once per character of the name.
  static const std::regex re("^b([0-9]{1,2})g(16|32|64|128|row)(s?)(z8)?(k6|k8)?(-f32)?$");
  std::smatch m;
  GRADQ_CHECK(name.size() <= 32 && std::regex_match(name, m, re),
              "cannot parse quantization spec '{}': expected b<bits>g<16|32|64|128|row>[s|z8|k6|k8][-f32] "
              "(e.g. b4g128, b3g32s, b4g32z8, b4g16k6, b8grow) or one of fp16, bf16, fp32, prune",
              name);
  spec.level = quant_level_for_bits(std::stoi(m[1].str()));
  spec.group_size = m[2].str() == "row" ? kWholeRow : std::stoll(m[2].str());
  spec.symmetric = !m[3].str().empty();
  spec.zero_8bit = m[4].matched;
  spec.sub_scale_bits = m[5].matched ? std::stoi(m[5].str().substr(1)) : 0;
  spec.fp16_scale = !m[6].matched;
  spec.validate();
  return spec;
}

}  // namespace gradq
