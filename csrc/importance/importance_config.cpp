#include "importance/importance_config.h"

#include <fmt/ranges.h>  // fmt::join (in fmt/format.h before fmt 11)

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/files.h"
#include "common/json_integer.h"
#include "common/runtime.h"

namespace gradq {
namespace fs = std::filesystem;

const std::vector<std::string> kScoreSignals = {"rtn",         "upgrade",          "disable",           "noise",
                                                "weight_magnitude", "activation_sq_mean", "gradient_magnitude", "fisher"};

const char* score_normalization_name(ScoreNormalization n) {
  switch (n) {
    case ScoreNormalization::kMax: return "max";
    case ScoreNormalization::kRank: return "rank";
  }
  return "?";
}

void ImportanceConfig::validate() const {
  double total = 0;
  for (const auto& [signal, w] : weights) {
    GRADQ_CHECK(std::find(kScoreSignals.begin(), kScoreSignals.end(), signal) != kScoreSignals.end(),
                "unknown score signal '{}' (expected one of: {})", signal, fmt::join(kScoreSignals, ", "));
    GRADQ_CHECK(std::isfinite(w) && w >= 0, "weight of '{}' must be a finite number >= 0, got {}", signal, w);
    total += w;
  }
  GRADQ_CHECK(total > 0, "the score weights must not all be zero (got {} weights summing to {})", weights.size(), total);
  GRADQ_CHECK(rtn_score_bits == 2 || rtn_score_bits == 4 || rtn_score_bits == 8,
              "rtn_score_bits must be 2, 4 or 8 (the RTN probes measured), got {}", rtn_score_bits);
  GRADQ_CHECK(moderate_above >= -1 && moderate_above <= stable_above && stable_above <= 1,
              "stability thresholds must satisfy -1 <= moderate_above <= stable_above <= 1, got {} and {}",
              moderate_above, stable_above);
}

ImportanceConfig load_importance_config(const std::string& path) {
  GRADQ_CHECK(fs::exists(path), "importance config '{}' does not exist (the default is {})", path,
              default_importance_config_path());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("importance config '{}' is not valid JSON: {}", path, e.what()));
  }
  GRADQ_CHECK(j.is_object(), "importance config '{}' must be a JSON object, got {}", path, j.type_name());
  ImportanceConfig c;
  auto number = [&](const nlohmann::json& v, const std::string& key) {
    GRADQ_CHECK(v.is_number(), "importance config '{}': '{}' must be a number, got {}", path, key, v.dump());
    return v.get<double>();
  };
  const std::vector<std::string> keys = {"weights", "normalization", "rtn_score_bits", "stability"};
  for (const auto& [key, value] : j.items()) {
    if (key.rfind("_comment", 0) == 0) continue;
    if (key == "weights") {
      GRADQ_CHECK(value.is_object(), "importance config '{}': 'weights' must be an object, got {}", path, value.dump());
      c.weights.clear();
      for (const auto& [signal, w] : value.items())
        if (signal.rfind("_comment", 0) != 0) c.weights[signal] = number(w, "weights." + signal);
    } else if (key == "normalization") {
      GRADQ_CHECK(value.is_string() && (value == "max" || value == "rank"),
                  "importance config '{}': 'normalization' must be \"max\" or \"rank\", got {}", path, value.dump());
      c.normalization = value == "max" ? ScoreNormalization::kMax : ScoreNormalization::kRank;
    } else if (key == "rtn_score_bits") {
      GRADQ_CHECK(value.is_number_integer(), "importance config '{}': 'rtn_score_bits' must be 2, 4 or 8, got {}",
                  path, value.dump());
      c.rtn_score_bits = json_integer<int>(value, "rtn_score_bits");
    } else if (key == "stability") {
      GRADQ_CHECK(value.is_object(), "importance config '{}': 'stability' must be an object, got {}", path, value.dump());
      for (const auto& [k, v] : value.items()) {
        if (k == "stable_above") c.stable_above = number(v, "stability.stable_above");
        else if (k == "moderate_above") c.moderate_above = number(v, "stability.moderate_above");
        else GRADQ_CHECK(k.rfind("_comment", 0) == 0, "importance config '{}': unknown key 'stability.{}' (expected "
                         "stable_above, moderate_above)", path, k);
      }
    } else {
      throw Error(fmt::format("importance config '{}': unknown key '{}' (expected one of: {})", path, key,
                              fmt::join(keys, ", ")));
    }
  }
  try {
    c.validate();
  } catch (const Error& e) {
    throw Error(fmt::format("importance config '{}': {}", path, e.what()));
  }
  return c;
}

std::string configs_dir() {
  if (const char* env = std::getenv("GRADQ_CONFIGS")) return env;
  // Installed: <prefix>/share/gradq/assets -> <prefix>/share/gradq/configs.
  // Source tree: <src>/third_party/assets -> <src>/configs.
  fs::path assets = fs::path(assets_dir()).lexically_normal();
  if (assets.filename().empty()) assets = assets.parent_path();  // "dir/" names "dir"
  for (const fs::path& candidate : {assets.parent_path() / "configs", assets.parent_path().parent_path() / "configs"})
    if (fs::exists(candidate / "importance.json")) return candidate.string();
  return (assets.parent_path().parent_path() / "configs").string();
}

std::string default_importance_config_path() { return configs_dir() + "/importance.json"; }

}  // namespace gradq
