#include "optimizer/budget.h"

#include <fmt/ranges.h>

#include <vector>

#include "common/error.h"

namespace gradq {

void Budget::validate() const {
  GRADQ_CHECK(!max_ppl_increase || *max_ppl_increase > 0, "--max-ppl-increase must be > 0, got {}", *max_ppl_increase);
  GRADQ_CHECK(!max_kl || *max_kl > 0, "--max-kl must be > 0 nats, got {}", *max_kl);
  GRADQ_CHECK(!target_memory_reduction || (*target_memory_reduction > 0 && *target_memory_reduction < 1),
              "--target-memory-reduction must be in (0, 1), got {}", *target_memory_reduction);
  GRADQ_CHECK(!safety || *safety >= 1, "--safety must be >= 1, got {}", safety.value_or(0));
  GRADQ_CHECK(max_ppl_increase || max_kl, "a quality budget is needed: --max-ppl-increase and/or --max-kl");
}

double ppl_increase(const EvalResult& result) {
  GRADQ_CHECK(result.reference_ppl.has_value(), "ppl_increase needs a result evaluated against a reference");
  return result.ppl.value / result.reference_ppl->value - 1.0;
}

bool Budget::quality_met(const EvalResult& result, double divisor) const {
  GRADQ_CHECK(!max_kl || result.kl.has_value(), "a KL budget needs a result evaluated against a reference");
  return quality_met(result.kl ? result.kl->mean.value : 0.0, max_ppl_increase ? ppl_increase(result) : 0.0, divisor);
}

bool Budget::quality_met(double kl, double ppl_increase, double divisor) const {
  // Written as !(x <= limit) so that a NaN result (non-finite logits) fails the budget.
  if (max_ppl_increase && !(ppl_increase <= *max_ppl_increase / divisor)) return false;
  if (max_kl && !(kl <= *max_kl / divisor)) return false;
  return true;
}

std::string Budget::describe() const {
  std::vector<std::string> parts;
  if (max_ppl_increase) parts.push_back(fmt::format("perplexity +{:.2f}%", 100 * *max_ppl_increase));
  if (max_kl) parts.push_back(fmt::format("KL {:.4g} nats/token", *max_kl));
  if (target_memory_reduction) parts.push_back(fmt::format("{:.0f}% smaller than fp16", 100 * *target_memory_reduction));
  return fmt::to_string(fmt::join(parts, ", "));
}

}  // namespace gradq
