#pragma once
// The budget allocator: per-weight error curves in, the cheapest plan whose predicted KL meets a
// limit out (and the dual: the least predicted KL within a byte limit).
//
// A curve holds, for one weight, the KL measured with that weight alone at each candidate format
// (every other weight in full precision) and the bytes the format stores. The prediction for a mix
// is the sum of the weights' KLs. Only the lower convex hull of each curve matters: a point above
// the hull is never the best use of its bytes. On the hulls, the greedy that starts every weight at
// its cheapest point and repeatedly takes the upgrade with the most KL recovered per byte is exact
// for the convexified problem (each step is a Lagrangian optimum); real mixes are not additive
// (docs/BENCHMARKS.md), which PrecisionOptimizer::allocate() corrects with whole-model measurements.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "quant/quantized_tensor.h"

namespace gradq {

struct CurvePoint {
  QuantSpec spec;
  RoundingMethod method = RoundingMethod::kRtn;
  int64_t bytes = 0;  ///< stored bytes of the weight in `spec`
  double kl = 0;      ///< model KL with this weight alone in `spec` (>= 0; noise below 0 is clamped)
  /// The first-order change of the calibration windows' mean NLL with this weight alone in `spec`
  /// (SearchOptions::first_order_weight; 0 when not measured). Either sign.
  double first_order = 0;
};

/// Per weight name: its candidates (any order).
using ErrorCurves = std::map<std::string, std::vector<CurvePoint>>;

/// KL recovered per byte by moving from `cheaper` to `dearer` (which stores more).
double kl_per_byte(const CurvePoint& cheaper, const CurvePoint& dearer);

/// The lower convex hull of `points` in (bytes, kl), cheapest first: bytes rise and KL falls along
/// it, and KL recovered per byte falls from each segment to the next. Equal bytes keep the lower KL
/// (the earlier point on a tie). Throws gradq::Error when `points` is empty.
std::vector<CurvePoint> lower_hull(std::vector<CurvePoint> points);

struct Allocation {
  std::map<std::string, size_t> choice;  ///< per weight: index into its hull
  std::map<std::string, std::vector<CurvePoint>> hulls;
  int64_t bytes = 0;
  double predicted_kl = 0;  ///< sum of the chosen points' KL
  const CurvePoint& chosen(const std::string& name) const { return hulls.at(name).at(choice.at(name)); }
};

/// The fewest bytes whose predicted KL is at most `max_kl` (on the hulls; every weight at its most
/// accurate point when even that does not meet it).
Allocation allocate_for_kl(const ErrorCurves& curves, double max_kl);

/// The least predicted KL within `max_bytes` (every weight at its cheapest point when even that
/// does not fit). Upgrades that do not fit are skipped, cheaper ones after them still taken.
Allocation allocate_for_bytes(const ErrorCurves& curves, int64_t max_bytes);

}  // namespace gradq
