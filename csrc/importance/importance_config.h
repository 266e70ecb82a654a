#pragma once
// How the ImportanceAnalyzer folds its probes into one combined score: the weights, the
// normalization and the stability thresholds, read from a JSON file under configs/
// (configs/importance.json is the default; configs/README.md documents every key).
//
// Combined score of a unit (computed separately for layers and for blocks, since a block contains
// its layers and their probe values are not on one scale):
//   score(u) = sum_p w_p * norm_p(u) / sum_p w_p
// where p runs over the signals with a non-zero weight (kScoreSignals) and norm_p maps the raw
// values of p over the units of one kind into [0, 1]:
//   "max":  v / max_u v            (values below 0 count as 0; all-zero signals give 0)
//   "rank": (rank of v, ascending, ties averaged) / (n - 1); a single unit gives 1
// "max" keeps ratios (a unit twice as sensitive scores twice as high) but lets one outlier squeeze
// the rest; "rank" is robust to outliers and forgets magnitudes. The raw values stay in the JSON
// either way, so a consumer can renormalize.

#include <map>
#include <string>
#include <vector>

namespace gradq {

enum class ScoreNormalization { kMax, kRank };
const char* score_normalization_name(ScoreNormalization n);

/// Signals a combined score can weight, in the order they are reported:
///   rtn       KL of the unit alone round-to-nearest quantized at `rtn_score_bits`
///   upgrade   KL recovered by raising the unit from 4 to 8 bits in an all-4-bit model
///   disable   KL with the unit disabled (layer pruned, block removed from the residual stream)
///   noise     KL with Gaussian noise of alpha * std(W) on the unit
///   weight_magnitude, activation_sq_mean, gradient_magnitude, fisher   the static signals
extern const std::vector<std::string> kScoreSignals;

struct ImportanceConfig {
  /// Weight of each signal (a key of kScoreSignals); missing signals weigh 0. Defaults: the issue's
  /// RTN 0.40, upgrade 0.25, disable 0.20, noise 0.15.
  std::map<std::string, double> weights = {{"rtn", 0.40}, {"upgrade", 0.25}, {"disable", 0.20}, {"noise", 0.15}};
  ScoreNormalization normalization = ScoreNormalization::kMax;
  /// Which RTN probe (8, 4 or 2 bits) the "rtn" signal reads.
  int rtn_score_bits = 4;
  /// Stability verdict from the mean pairwise Spearman correlation of the subset rankings:
  /// "stable" above `stable_above`, "moderate" from `moderate_above` to it, "unstable" below.
  double stable_above = 0.7;
  double moderate_above = 0.4;

  /// Throws gradq::Error naming the bad key or value.
  void validate() const;
};

/// Reads and validates a config file. Unknown keys are errors (a typo must not silently fall back to
/// a default); "_comment" keys are ignored. Throws gradq::Error naming the path and the problem.
ImportanceConfig load_importance_config(const std::string& path);

/// The configs/ directory: $GRADQ_CONFIGS, else share/gradq/configs next to the installed assets,
/// else configs/ of the source tree (both found from common/runtime.h's assets_dir()).
std::string configs_dir();
/// configs_dir() + "/importance.json".
std::string default_importance_config_path();

}  // namespace gradq
