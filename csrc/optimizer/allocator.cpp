#include "optimizer/allocator.h"

#include <algorithm>
#include <queue>
#include <tuple>

#include "common/error.h"

namespace gradq {
namespace {

// The greedy both allocations share: every weight at its cheapest hull point, then upgrades in
// order of KL recovered per byte while `take(allocation, weight, next point)` says yes; a refused
// upgrade ends that weight's upgrades (its later ones recover less per byte and cost more).
template <typename Take, typename Done>
Allocation greedy(const ErrorCurves& curves, Take take, Done done) {
  Allocation a;
  // (rate, name) with the highest rate first; ties go to the smaller name so the result does not
  // depend on the heap's order.
  using Upgrade = std::pair<double, std::string>;
  auto later = [](const Upgrade& x, const Upgrade& y) { return x.first < y.first || (x.first == y.first && x.second > y.second); };
  std::priority_queue<Upgrade, std::vector<Upgrade>, decltype(later)> upgrades(later);
  auto push_next = [&](const std::string& name) {
    const auto& hull = a.hulls.at(name);
    const size_t i = a.choice.at(name);
    if (i + 1 < hull.size()) upgrades.emplace(kl_per_byte(hull[i], hull[i + 1]), name);
  };
  for (const auto& [name, points] : curves) {
    a.hulls[name] = lower_hull(points);
    a.choice[name] = 0;
    a.bytes += a.hulls[name][0].bytes;
    a.predicted_kl += a.hulls[name][0].kl;
  }
  for (const auto& [name, points] : curves) push_next(name);
  while (!upgrades.empty() && !done(a)) {
    const std::string name = upgrades.top().second;
    upgrades.pop();
    const CurvePoint& from = a.chosen(name);
    const CurvePoint& to = a.hulls.at(name)[a.choice.at(name) + 1];
    if (!take(a, from, to)) continue;
    a.bytes += to.bytes - from.bytes;
    a.predicted_kl += to.kl - from.kl;
    ++a.choice[name];
    push_next(name);
  }
  return a;
}

}  // namespace

double kl_per_byte(const CurvePoint& cheaper, const CurvePoint& dearer) {
  return (cheaper.kl - dearer.kl) / double(dearer.bytes - cheaper.bytes);
}

std::vector<CurvePoint> lower_hull(std::vector<CurvePoint> points) {
  GRADQ_CHECK(!points.empty(), "a weight's error curve needs at least one point, got none");
  for (CurvePoint& p : points) p.kl = std::max(p.kl, 0.0);
  std::stable_sort(points.begin(), points.end(), [](const CurvePoint& a, const CurvePoint& b) {
    return std::tie(a.bytes, a.kl) < std::tie(b.bytes, b.kl);
  });
  // Drop points that store more without a lower KL, then the ones above a segment between two others.
  std::vector<CurvePoint> falling;
  for (const CurvePoint& p : points)
    if (falling.empty() || (p.bytes > falling.back().bytes && p.kl < falling.back().kl)) falling.push_back(p);
  std::vector<CurvePoint> hull;
  for (const CurvePoint& p : falling) {
    // The last hull point is not on the hull when the rate to p from the one before it is at least
    // the rate to the last point: its segment would then bend upward.
    while (hull.size() >= 2 && kl_per_byte(hull[hull.size() - 2], p) >= kl_per_byte(hull[hull.size() - 2], hull.back())) hull.pop_back();
    hull.push_back(p);
  }
  return hull;
}

Allocation allocate_for_kl(const ErrorCurves& curves, double max_kl) {
  return greedy(
      curves, [](const Allocation&, const CurvePoint&, const CurvePoint&) { return true; },
      [max_kl](const Allocation& a) { return a.predicted_kl <= max_kl; });
}

Allocation allocate_for_bytes(const ErrorCurves& curves, int64_t max_bytes) {
  return greedy(
      curves,
      [max_bytes](const Allocation& a, const CurvePoint& from, const CurvePoint& to) {
        return a.bytes + (to.bytes - from.bytes) <= max_bytes;
      },
      [](const Allocation&) { return false; });
}

}  // namespace gradq
