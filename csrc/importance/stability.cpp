#include "importance/stability.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/error.h"

namespace gradq {

std::vector<double> average_ranks(const std::vector<double>& values) {
  const size_t n = values.size();
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return values[a] < values[b]; });
  std::vector<double> ranks(n);
  for (size_t i = 0; i < n;) {
    size_t j = i;
    while (j + 1 < n && values[order[j + 1]] == values[order[i]]) ++j;
    const double rank = (static_cast<double>(i) + static_cast<double>(j)) / 2.0 + 1.0;
    for (size_t t = i; t <= j; ++t) ranks[order[t]] = rank;
    i = j + 1;
  }
  return ranks;
}

double spearman(const std::vector<double>& a, const std::vector<double>& b) {
  GRADQ_CHECK(a.size() == b.size(), "Spearman correlation needs equal sizes, got {} and {}", a.size(), b.size());
  GRADQ_CHECK(a.size() >= 2, "Spearman correlation needs at least 2 values, got {}", a.size());
  const std::vector<double> ra = average_ranks(a), rb = average_ranks(b);
  const double n = static_cast<double>(a.size());
  const double ma = std::accumulate(ra.begin(), ra.end(), 0.0) / n, mb = std::accumulate(rb.begin(), rb.end(), 0.0) / n;
  double sab = 0, saa = 0, sbb = 0;
  for (size_t i = 0; i < ra.size(); ++i) {
    sab += (ra[i] - ma) * (rb[i] - mb);
    saa += (ra[i] - ma) * (ra[i] - ma);
    sbb += (rb[i] - mb) * (rb[i] - mb);
  }
  if (saa == 0 && sbb == 0) return 1.0;  // both constant: the same (empty) ordering
  if (saa == 0 || sbb == 0) return 0.0;
  return sab / std::sqrt(saa * sbb);
}

StabilityReport rank_stability(const std::vector<std::vector<double>>& scores, double stable_above,
                               double moderate_above) {
  StabilityReport r;
  r.subsets = static_cast<int64_t>(scores.size());
  r.units = scores.empty() ? 0 : static_cast<int64_t>(scores.front().size());
  for (const auto& s : scores)
    GRADQ_CHECK(static_cast<int64_t>(s.size()) == r.units, "every subset must score the same {} units, got {}", r.units,
                s.size());
  if (r.subsets < 2 || r.units < 2) {
    r.verdict = "n/a";
    return r;
  }
  for (size_t i = 0; i < scores.size(); ++i)
    for (size_t j = i + 1; j < scores.size(); ++j) r.pairs.push_back(spearman(scores[i], scores[j]));
  r.spearman_mean = std::accumulate(r.pairs.begin(), r.pairs.end(), 0.0) / static_cast<double>(r.pairs.size());
  r.spearman_min = *std::min_element(r.pairs.begin(), r.pairs.end());
  r.verdict = r.spearman_mean > stable_above ? "stable" : r.spearman_mean >= moderate_above ? "moderate" : "unstable";
  return r;
}

std::string stability_advice(const std::string& verdict) {
  if (verdict == "stable") return "the ranking holds across calibration subsets";
  if (verdict == "moderate") return "use more samples (--calib-windows) before trusting the finer ranks";
  if (verdict == "unstable") return "the ranking changes with the data: use many more samples (--calib-windows)";
  return "needs at least 2 subsets and 2 units";
}

Distribution describe(const std::vector<double>& values, const std::vector<std::string>& names, size_t n_extreme) {
  GRADQ_CHECK(values.size() == names.size(), "expected one name per value, got {} values and {} names", values.size(),
              names.size());
  GRADQ_CHECK(!values.empty(), "cannot describe an empty set of values");
  Distribution d;
  const size_t n = values.size();
  d.count = static_cast<int64_t>(n);
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // Highest first; ties keep the input order so the listing is deterministic.
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return values[a] > values[b]; });
  d.max = values[order.front()];
  d.min = values[order.back()];
  d.median = n % 2 ? values[order[n / 2]] : (values[order[n / 2 - 1]] + values[order[n / 2]]) / 2;
  d.mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(n);
  double var = 0;
  for (double v : values) var += (v - d.mean) * (v - d.mean);
  d.std = std::sqrt(var / static_cast<double>(n));
  if (d.min > 0) d.max_min_ratio = d.max / d.min;
  const size_t m = std::min(n_extreme, n);
  for (size_t i = 0; i < m; ++i) d.top.push_back(names[order[i]]);
  for (size_t i = 0; i < m; ++i) d.bottom.push_back(names[order[n - 1 - i]]);
  return d;
}

}  // namespace gradq
