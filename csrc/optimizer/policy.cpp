#include "optimizer/policy.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "common/files.h"

namespace gradq {
namespace {

nlohmann::json parse_json(const std::string& text, const char* what) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{} is not valid JSON: {}", what, e.what()));
  }
}

std::string regex_escape(const std::string& s) {
  static const std::regex special(R"([.^$|()\[\]{}*+?\\])");
  return std::regex_replace(s, special, R"(\$&)");
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size())) s.replace(pos, from.size(), to);
}

// Runs a reader over parsed JSON, turning a field of the wrong JSON type (a number where a level
// name belongs, ...) into gradq::Error naming `what`.
template <typename Read>
auto reading(const char* what, Read read) {
  try {
    return read();
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("malformed {}: {}", what, e.what()));
  }
}

template <typename T>
T with_path(const std::string& path, T (*parse)(const std::string&)) {
  try {
    return parse(read_file(path));
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", path, e.what()));
  }
}

}  // namespace

QuantLevel parse_quant_level(const std::string& name) {
  std::string names;
  for (QuantLevel level : kQuantLevels) {
    if (name == quant_level_name(level)) return level;
    names += (names.empty() ? "" : ", ") + std::string(quant_level_name(level));
  }
  throw Error(fmt::format("unknown precision level '{}': expected one of {}", name, names));
}

PrecisionPolicy PrecisionPolicy::load(const std::string& path) { return with_path(path, &PrecisionPolicy::from_json); }

PrecisionPolicy PrecisionPolicy::from_json(const std::string& text) {
  const nlohmann::json j = parse_json(text, "policy");
  return reading("policy", [&] {
    GRADQ_CHECK(j.is_object() && j.value("format", "") == "gradq-policy",
                "not a constraint policy: expected \"format\": \"gradq-policy\"");
    GRADQ_CHECK(j.contains("rules") && j["rules"].is_array(), "policy has no \"rules\" array");
    PrecisionPolicy policy;
    for (const auto& r : j["rules"]) {
      GRADQ_CHECK(r.is_object() && r.contains("pattern") && r["pattern"].is_string(),
                  "each policy rule needs a string \"pattern\", got {}", r.dump());
      PolicyRule rule;
      rule.pattern = r["pattern"].get<std::string>();
      if (r.contains("min")) rule.min = parse_quant_level(r["min"].get<std::string>());
      if (r.contains("max")) rule.max = parse_quant_level(r["max"].get<std::string>());
      GRADQ_CHECK(rule.min <= rule.max, "policy rule '{}': min {} is above max {}", rule.pattern,
                  quant_level_name(rule.min), quant_level_name(rule.max));
      policy.rules_.push_back(rule);
    }
    return policy;
  });
}

void PrecisionPolicy::bind(const QuantizableModel& model) {
  compiled_.clear();
  const auto& blocks = model.blocks();
  for (const PolicyRule& rule : rules_) {
    std::string pattern = rule.pattern;
    if (pattern.find("{first_block}") != std::string::npos || pattern.find("{last_block}") != std::string::npos)
      GRADQ_CHECK(!blocks.empty(), "policy rule '{}' names a block but the model has no blocks", rule.pattern);
    if (!blocks.empty()) {
      replace_all(pattern, "{first_block}", regex_escape(blocks.front().name));
      replace_all(pattern, "{last_block}", regex_escape(blocks.back().name));
    }
    try {
      compiled_.emplace_back(pattern, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      throw Error(fmt::format("policy rule pattern '{}' is not a valid regex: {}", rule.pattern, e.what()));
    }
  }
}

bool PrecisionPolicy::allows(const std::string& name, QuantLevel level) const {
  GRADQ_CHECK(compiled_.size() == rules_.size(), "PrecisionPolicy::allows called before bind()");
  for (size_t i = 0; i < rules_.size(); ++i)
    if (std::regex_search(name, compiled_[i]) && (level < rules_[i].min || level > rules_[i].max)) return false;
  return true;
}

QuantLevel PrecisionPolicy::min_level(const std::string& name) const {
  GRADQ_CHECK(compiled_.size() == rules_.size(), "PrecisionPolicy::min_level called before bind()");
  QuantLevel lowest = QuantLevel::kPrune;
  for (size_t i = 0; i < rules_.size(); ++i)
    if (std::regex_search(name, compiled_[i]) && rules_[i].min > lowest) lowest = rules_[i].min;
  return lowest;
}

DynamicPolicy DynamicPolicy::load(const std::string& path) { return with_path(path, &DynamicPolicy::from_json); }

DynamicPolicy DynamicPolicy::from_json(const std::string& text) {
  const nlohmann::json j = parse_json(text, "dynamic policy");
  return reading("dynamic policy", [&] {
    GRADQ_CHECK(j.is_object() && j.value("format", "") == "gradq-dynamic-policy",
                "not a dynamic policy: expected \"format\": \"gradq-dynamic-policy\"");
    DynamicPolicy p;
    p.high_share = j.value("high_share", p.high_share);
    p.low_share = j.value("low_share", p.low_share);
    GRADQ_CHECK(p.high_share >= 0 && p.low_share >= 0 && p.high_share + p.low_share <= 1,
                "dynamic policy shares must be >= 0 and sum to at most 1, got high {} + low {}", p.high_share, p.low_share);
    if (j.contains("high")) p.high = parse_quant_spec(j["high"].get<std::string>());
    if (j.contains("middle")) p.middle = parse_quant_spec(j["middle"].get<std::string>());
    if (j.contains("low")) p.low = parse_quant_spec(j["low"].get<std::string>());
    return p;
  });
}

Plan DynamicPolicy::plan(const std::vector<std::string>& order, RoundingMethod method) const {
  const auto n = static_cast<int64_t>(order.size());
  const auto n_high = static_cast<int64_t>(std::ceil(high_share * n));
  const auto n_low = std::min(n - n_high, static_cast<int64_t>(std::llround(low_share * n)));
  Plan plan;
  for (int64_t i = 0; i < n; ++i)
    plan.entries.push_back({order[i], i < n_low ? low : i >= n - n_high ? high : middle, method});
  return plan;
}

}  // namespace gradq
