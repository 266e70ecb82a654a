#include "importance/probe_evaluator.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/error.h"
#include "common/timing.h"

namespace gradq {

const char* measurement_name(Measurement m) {
  switch (m) {
    case Measurement::kWhole: return "whole";
    case Measurement::kExact: return "exact";
    case Measurement::kLocal: return "local";
  }
  return "?";
}

Measurement parse_measurement(const std::string& name) {
  for (Measurement m : {Measurement::kWhole, Measurement::kExact, Measurement::kLocal})
    if (name == measurement_name(m)) return m;
  throw Error(fmt::format("unknown measurement '{}' (expected whole, exact or local)", name));
}

ProbeEvaluator::ProbeEvaluator(const QuantizableModel& reference, Windows windows, int64_t subsets,
                               EvaluatorOptions options)
    : evaluator_(std::move(windows), options) {
  const int64_t n = evaluator_.windows().size();
  GRADQ_CHECK(subsets >= 1, "expected at least 1 calibration subset, got {}", subsets);
  GRADQ_CHECK(n >= subsets, "expected at least as many calibration windows as subsets ({}), got {} windows", subsets, n);
  scored_mask_ = evaluator_.windows().scored_mask();
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
  if (const ModelStages* stages = reference.stages()) {
    // One pass fills the block-input cache, and the reference comes from the head's cached input
    // (a head reference keeps the cache itself).
    const auto t0 = Clock::now();
    cache_ = std::make_shared<BlockInputCache>(*stages, evaluator_.windows().inputs, options.batch);
    const double cache_seconds = seconds_since(t0);
    evaluator_.set_reference(reference, cache_, &forward_seconds_);
    forward_seconds_ += cache_seconds;
    local_factors_.assign(cache_->num_blocks(), std::numeric_limits<double>::quiet_NaN());
  } else {
    evaluator_.set_reference(reference, nullptr, &forward_seconds_);
  }
  const Reference& ref = *evaluator_.reference();
  GRADQ_CHECK(ref.tokens() == tokens, "internal: reference has {} scored tokens, the subsets {}", ref.tokens(), tokens);
  ref_nll_ = -ref.target_log_probs;
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

ProbeMeasure ProbeEvaluator::measure_logits(const LogitsSource& source) const {
  const auto start = Clock::now();
  c10::InferenceMode guard;
  double forward = 0;
  // Scored batch by batch against the reference (the evaluator's KL routine): a candidate's
  // [tokens, vocab] float32 log-probabilities were held whole here before, 524 MB for 16 windows of
  // 256 tokens at a 32,000-token vocabulary.
  const GradualEvaluator::TokenScores scores = evaluator_.token_scores(source, &forward);
  ProbeMeasure m;
  m.kl = scores.kl.mean().item<double>();
  m.delta_ppl = std::exp(scores.nll.mean().item<double>()) - reference_ppl_;
  for (int64_t k = 0; k < subsets(); ++k)
    m.subset_kl.push_back(scores.kl.slice(0, subset_token_begin_[k], subset_token_begin_[k + 1]).mean().item<double>());
  ++passes_;
  forward_seconds_ += forward;
  seconds_ += seconds_since(start);
  return m;
}

ProbeMeasure ProbeEvaluator::measure(const QuantizableModel& model) const {
  return measure_logits(evaluator_.whole_model(model));
}

ProbeMeasure ProbeEvaluator::measure_exact(int64_t block) const {
  GRADQ_CHECK(cache_, "exact measurements need the model as stages; this model has none");
  return measure_logits([&](int64_t b, int64_t) { return cache_->logits_from(block, cache_->chunk_of(b)); });
}

double ProbeEvaluator::local_error(int64_t block) const {
  GRADQ_CHECK(cache_, "local measurements need the model as stages; this model has none");
  const auto start = Clock::now();
  const double e = cache_->local_error(block).mean().item<double>();
  ++passes_;
  seconds_ += seconds_since(start);
  return e;
}

double ProbeEvaluator::local_factor(int64_t block) const {
  GRADQ_CHECK(cache_, "local measurements need the model as stages; this model has none");
  GRADQ_CHECK(block >= 0 && block < static_cast<int64_t>(local_factors_.size()), "expected a block in [0, {}), got {}",
              local_factors_.size(), block);
  GRADQ_CHECK(!std::isnan(local_factors_[block]), "block {} has no calibrated local factor yet", block);
  return local_factors_[block];
}

void ProbeEvaluator::set_local_factor(int64_t block, double factor) {
  GRADQ_CHECK(cache_, "local measurements need the model as stages; this model has none");
  GRADQ_CHECK(block >= 0 && block < static_cast<int64_t>(local_factors_.size()), "expected a block in [0, {}), got {}",
              local_factors_.size(), block);
  GRADQ_CHECK(std::isfinite(factor) && factor >= 0, "a local factor must be finite and >= 0, got {}", factor);
  local_factors_[block] = factor;
}

ProbeMeasure ProbeEvaluator::measure_local(int64_t block) const {
  const double factor = local_factor(block);
  const auto start = Clock::now();
  const at::Tensor per_window = cache_->local_error(block);
  const at::Tensor tokens = evaluator_.scored_tokens_per_window();
  auto weighted = [&](int64_t begin, int64_t end) { return token_weighted_mean(per_window, tokens, begin, end); };
  ProbeMeasure m;
  m.local_error = weighted(0, per_window.size(0));
  m.kl = factor * m.local_error;
  m.delta_ppl = reference_ppl_ * std::expm1(m.kl);  // if the KL were all a shift of the target's NLL
  for (int64_t k = 0; k < subsets(); ++k) {
    const auto [b, e] = subset_windows(k);
    m.subset_kl.push_back(factor * weighted(b, e));
  }
  ++passes_;
  seconds_ += seconds_since(start);
  return m;
}

ProbeMeasure ProbeEvaluator::measure(const QuantizableModel& model, Measurement how, int64_t block) const {
  if (how == Measurement::kWhole) return measure(model);
  GRADQ_CHECK(block >= 0, "{} measurements need a block, got {}", measurement_name(how), block);
  return how == Measurement::kExact ? measure_exact(block) : measure_local(block);
}

}  // namespace gradq
