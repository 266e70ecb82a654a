#pragma once
// The user's quality and size budget, and how a measurement is judged against it.
//
// Quality is measured against the full-precision model on the same windows: relative perplexity
// increase PPL/PPL_ref - 1, and mean KL(P_ref || P_model) per token in nats. Memory reduction is
// 1 - bytes/fp16_bytes over the quantizable weights (plan.h: PlanSize), i.e. against those
// weights stored in fp16; reports also give the change against the input checkpoint file.
// The search judges calibration measurements against the quality budget divided by `safety`, so
// that the plan keeps a margin for the held-out validation, which uses the full budget.

#include <optional>
#include <string>

#include "eval/evaluator.h"

namespace gradq {

struct Budget {
  std::optional<double> max_ppl_increase;         ///< relative, e.g. 0.05 for +5%
  std::optional<double> max_kl;                   ///< nats per token
  std::optional<double> target_memory_reduction;  ///< e.g. 0.6 for 60% smaller than fp16
  /// The search divides the quality limits by this; held-out validation keeps the budget. Unset:
  /// the search strategy's own (SearchOptions::safety_used).
  std::optional<double> safety;

  /// Throws gradq::Error for non-positive limits, a reduction outside (0, 1), or safety < 1.
  void validate() const;
  /// True when `result` (evaluated with a reference) is within the quality limits / divisor.
  bool quality_met(const EvalResult& result, double divisor = 1.0) const;
  /// The same judgement of a predicted mean KL and perplexity increase.
  bool quality_met(double kl, double ppl_increase, double divisor = 1.0) const;
  /// "ppl +5.00%, KL 0.0100" style description of the limits.
  std::string describe() const;
};

/// PPL / PPL_ref - 1 of a result evaluated with a reference.
double ppl_increase(const EvalResult& result);

}  // namespace gradq
