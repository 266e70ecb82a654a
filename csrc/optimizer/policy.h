#pragma once
// Precision policies (configs/policies/*.json).
//
// Constraint policy: rules that bound the levels a weight may take in a search, by name:
//   {"format": "gradq-policy", "rules": [{"pattern": "REGEX", "min": "int8", "max": "fp16"}, ...]}
// A weight matching several rules must satisfy all of them. "min"/"max" are level names of the
// ladder prune < int2 < int3 < int4 < int8 < fp16 < bf16 < fp32 (quant_spec.h). In a pattern,
// {first_block} and {last_block} stand for the model's first and last block prefix ("layers.0").
//
// Dynamic policy: no search; units are assigned by importance share:
//   {"format": "gradq-dynamic-policy", "high_share": 0.2, "high": "fp16", "low_share": 0.4,
//    "low": "b4g128", "middle": "b8g128"}
// The top high_share of the units (by combined importance score) get "high", the bottom low_share
// "low", the rest "middle".

#include <regex>
#include <string>
#include <vector>

#include "model/quantizable_model.h"
#include "optimizer/plan.h"
#include "quant/quant_spec.h"

namespace gradq {

QuantLevel parse_quant_level(const std::string& name);

struct PolicyRule {
  std::string pattern;  ///< as written, before {first_block}/{last_block} substitution
  QuantLevel min = QuantLevel::kPrune;
  QuantLevel max = QuantLevel::kFp32;
};

class PrecisionPolicy {
 public:
  PrecisionPolicy() = default;
  /// Throws gradq::Error naming the file and the bad field.
  static PrecisionPolicy load(const std::string& path);
  static PrecisionPolicy from_json(const std::string& text);

  /// Binds the block placeholders to `model` (compiles the patterns); needed before allows().
  void bind(const QuantizableModel& model);
  /// True when every rule matching `name` admits `level`.
  bool allows(const std::string& name, QuantLevel level) const;
  /// Lowest level `name` may take (the largest "min" of its rules).
  QuantLevel min_level(const std::string& name) const;
  const std::vector<PolicyRule>& rules() const { return rules_; }

 private:
  std::vector<PolicyRule> rules_;
  std::vector<std::regex> compiled_;
};

struct DynamicPolicy {
  double high_share = 0.2;
  double low_share = 0.4;
  QuantSpec high{QuantLevel::kFp16};
  QuantSpec middle{QuantLevel::kInt8, 128};
  QuantSpec low{QuantLevel::kInt4, 128};
  static DynamicPolicy load(const std::string& path);
  static DynamicPolicy from_json(const std::string& text);
  /// The plan for weights ranked least important first (`order`): the last high_share of them
  /// (rounded up) at `high`, the first low_share (rounded, at most what is left) at `low`, the rest at
  /// `middle`, every entry with `method`.
  Plan plan(const std::vector<std::string>& order, RoundingMethod method) const;
};

}  // namespace gradq
