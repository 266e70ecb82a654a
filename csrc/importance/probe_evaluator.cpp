#include "importance/probe_evaluator.h"

#include <cmath>

#include "common/error.h"
#include "common/timing.h"

namespace gradq {

ProbeEvaluator::ProbeEvaluator(const CausalLM& reference, Windows windows, int64_t subsets, EvaluatorOptions options)
    : evaluator_(std::move(windows), options) {
  const int64_t n = evaluator_.windows().size();
  GRADQ_CHECK(subsets >= 1, "expected at least 1 calibration subset, got {}", subsets);
  GRADQ_CHECK(n >= subsets, "expected at least as many calibration windows as subsets ({}), got {} windows", subsets, n);
  const Windows& w = evaluator_.windows();
  const int64_t ctx = w.inputs.size(1);
  scored_mask_ = at::arange(ctx, at::kLong).unsqueeze(0) >= w.score_from.unsqueeze(1);
  at::Tensor per_window = scored_mask_.sum(1);
  int64_t tokens = 0;
  for (int64_t k = 0; k <= subsets; ++k) {
    const int64_t begin = k * n / subsets;
    subset_window_begin_.push_back(begin);
    subset_token_begin_.push_back(tokens);
    if (k < subsets) tokens += per_window.slice(0, begin, (k + 1) * n / subsets).sum().item<int64_t>();
  }
  for (int64_t k = 0; k < subsets; ++k)
    GRADQ_CHECK(subset_tokens(k) > 0, "calibration subset {} scores no tokens (windows [{}, {})): use fewer subsets or "
                "more windows", k, subset_windows(k).first, subset_windows(k).second);

  const auto start = Clock::now();
  c10::InferenceMode guard;
  // The same reference GradualEvaluator::set_reference(model) computes, built here to time its pass.
  Reference computed;
  computed.log_probs = evaluator_.scored_log_probs(reference, &forward_seconds_);
  computed.targets = w.targets.index({scored_mask_});
  computed.windows_fingerprint = w.inputs;
  evaluator_.set_reference(std::move(computed));
  const Reference& ref = *evaluator_.reference();
  GRADQ_CHECK(ref.log_probs.size(0) == tokens, "internal: reference has {} scored tokens, the subsets {}",
              ref.log_probs.size(0), tokens);
  ref_probs_ = ref.log_probs.exp();
  ref_neg_entropy_ = (ref_probs_ * ref.log_probs).sum(-1);
  targets_ = ref.targets.unsqueeze(1);
  ref_nll_ = -ref.log_probs.gather(1, targets_).squeeze(1);
  reference_ppl_ = std::exp(ref_nll_.to(at::kDouble).mean().item<double>());
  passes_ = 1;
  seconds_ = seconds_since(start);
}

std::pair<int64_t, int64_t> ProbeEvaluator::subset_windows(int64_t k) const {
  GRADQ_CHECK(k >= 0 && k < subsets(), "expected a subset index in [0, {}), got {}", subsets(), k);
  return {subset_window_begin_[k], subset_window_begin_[k + 1]};
}

int64_t ProbeEvaluator::subset_tokens(int64_t k) const {
  GRADQ_CHECK(k >= 0 && k < subsets(), "expected a subset index in [0, {}), got {}", subsets(), k);
  return subset_token_begin_[k + 1] - subset_token_begin_[k];
}

ProbeMeasure ProbeEvaluator::measure(const CausalLM& model) const {
  const auto start = Clock::now();
  c10::InferenceMode guard;
  double forward = 0;
  at::Tensor lp = evaluator_.scored_log_probs(model, &forward);
  GRADQ_CHECK(lp.sizes() == ref_probs_.sizes(), "the probed model scored {} tokens x {} logits, the reference {} x {}",
              lp.size(0), lp.size(1), ref_probs_.size(0), ref_probs_.size(1));
  // KL(P_ref || P) = sum p_ref log p_ref - sum p_ref log p, per token (clamped: rounding can go below 0).
  at::Tensor kl = (ref_neg_entropy_ - (ref_probs_ * lp).sum(-1)).clamp_min(0).to(at::kDouble);
  at::Tensor nll = -lp.gather(1, targets_).squeeze(1).to(at::kDouble);
  ProbeMeasure m;
  m.kl = kl.mean().item<double>();
  m.delta_ppl = std::exp(nll.mean().item<double>()) - reference_ppl_;
  for (int64_t k = 0; k < subsets(); ++k)
    m.subset_kl.push_back(kl.slice(0, subset_token_begin_[k], subset_token_begin_[k + 1]).mean().item<double>());
  ++passes_;
  forward_seconds_ += forward;
  seconds_ += seconds_since(start);
  return m;
}

}  // namespace gradq
