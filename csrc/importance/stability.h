#pragma once
// Rank statistics of importance scores: how stable a ranking is across calibration subsets and how
// the scores are distributed.

#include <optional>
#include <string>
#include <vector>

namespace gradq {

/// Ranks 1..n of `values` in ascending order, ties sharing their average rank.
std::vector<double> average_ranks(const std::vector<double>& values);

/// Spearman's rank correlation: Pearson's correlation of the average ranks. Two constant inputs
/// correlate 1, one constant input 0. Throws for sizes that differ or are below 2.
double spearman(const std::vector<double>& a, const std::vector<double>& b);

struct StabilityReport {
  int64_t subsets = 0;                 ///< K
  int64_t units = 0;                   ///< units ranked on each subset
  std::vector<double> pairs;           ///< Spearman of each subset pair (0,1), (0,2), ..., (K-2,K-1)
  double spearman_mean = 0, spearman_min = 0;
  std::string verdict;                 ///< "stable", "moderate" or "unstable" ("n/a" when K < 2 or < 2 units)
};

/// `scores[k][u]`: the score of unit u computed on subset k alone. Verdict from the mean Spearman:
/// above `stable_above` stable, at least `moderate_above` moderate, unstable below.
StabilityReport rank_stability(const std::vector<std::vector<double>>& scores, double stable_above,
                               double moderate_above);

/// What a verdict means for the user (printed by gradq analyze).
std::string stability_advice(const std::string& verdict);

struct Distribution {
  int64_t count = 0;
  double min = 0, max = 0, median = 0, mean = 0, std = 0;  ///< std: population (divides by n)
  std::optional<double> max_min_ratio;                     ///< absent when min <= 0
  std::vector<std::string> top, bottom;                    ///< the `n_extreme` highest / lowest, highest first / lowest first
};

/// Distribution of `values` (named by `names`). Throws when the sizes differ or there are none.
Distribution describe(const std::vector<double>& values, const std::vector<std::string>& names, size_t n_extreme = 5);

}  // namespace gradq
