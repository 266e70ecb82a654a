#include "optimizer/precision_optimizer.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <set>

#include <fmt/ranges.h>

#include "common/error.h"
#include "eval/block_cache.h"
#include "common/timing.h"

namespace gradq {
namespace {

// The progressive search's result as an Allocation that verify_and_repair can move along: per
// weight, the states it went through (its history), cheapest first, the current one chosen. A
// state's KL is what the accepted steps down to it added on the calibration windows (measured or
// predicted, each in the model of its moment), so KL per byte between neighbours is what each step
// cost, as the allocator's hulls give it for its candidates. The ladder need not be convex: the
// repair only ever moves one state up or down it. The start state is left off where the policy does
// not allow its level and the search moved the weight off it (a policy's max bounds the repaired
// plan too, as it bounds the allocator's, whose curves leave it off the same way).
Allocation ladders(const SearchResult& result, const PrecisionPolicy& policy) {
  Allocation a;
  for (const auto& [name, states] : result.history) {
    std::vector<const SearchStep*> made;  // made[i - 1] made states[i]
    for (const SearchStep& s : result.steps)
      if (s.weight == name && s.accepted) made.push_back(&s);
    GRADQ_CHECK(made.size() + 1 == states.size(), "internal: {} has {} states after {} accepted steps", name,
                states.size(), made.size());
    std::vector<double> added{0.0};  // KL the steps down to each state added, oldest first
    for (const SearchStep* s : made) added.push_back(added.back() + (s->kl - s->kl_before));
    std::vector<CurvePoint>& ladder = a.hulls[name];
    for (size_t i = states.size(); i-- > 0;) {
      if (i == 0 && states.size() > 1 && !policy.allows(name, states[0].spec.level)) break;
      const RoundingMethod method = i == 0 ? RoundingMethod::kRtn : made[i - 1]->method;
      ladder.push_back({states[i].spec, method, states[i].storage_bytes(), added[i]});
      GRADQ_CHECK(ladder.size() == 1 || ladder.back().bytes > ladder[ladder.size() - 2].bytes,
                  "internal: {}'s states do not store more bytes at every step back", name);
    }
    a.choice[name] = 0;
    a.bytes += ladder.front().bytes;
    a.predicted_kl += ladder.front().kl;
  }
  return a;
}

QuantSpec integer_spec(int bits, int64_t group_size) {
  QuantSpec spec;
  spec.level = quant_level_for_bits(bits);
  spec.group_size = group_size;
  return spec;
}

}  // namespace

QuantSpec search_spec(int bits, int64_t group_size, const std::string& encoding) {
  QuantSpec spec = integer_spec(bits, group_size);
  if (encoding == "asym") {
  } else if (encoding == "z8") {
    spec.zero_8bit = bits != 8;  // 8-bit codes store 8-bit zero points already
  } else if (encoding == "s") {
    spec.symmetric = true;
  } else if (encoding == "k6" || encoding == "k8") {
    spec.sub_scale_bits = encoding == "k6" ? kSubScaleBits6 : kSubScaleBits8;
  } else {
    throw Error(fmt::format("unknown side-information encoding '{}': expected asym, z8, s, k6 or k8", encoding));
  }
  spec.validate();
  return spec;
}

std::vector<QuantSpec> SearchOptions::candidates(int bits, int64_t out_features, int64_t in_features) const {
  // Group sizes that span the whole row store the same codes, scales and zero points (b4g128 and
  // b4g64 on a 64-input row): one of them is a candidate, the first in group_sizes' order. On
  // stories260K, where 30 of 35 weights have 64 inputs, the duplicates were a quarter of the curves.
  auto same_on_this_row = [&](const QuantSpec& a, const QuantSpec& b) {
    if (a == b) return true;
    QuantSpec a_as_b = a;
    a_as_b.group_size = b.group_size;
    return a_as_b == b && a.n_groups(in_features) == 1 && b.n_groups(in_features) == 1;
  };
  std::vector<QuantSpec> specs;
  for (int64_t g : group_sizes)
    for (const std::string& e : encodings) {
      const QuantSpec s = search_spec(bits, g, e);
      if (std::none_of(specs.begin(), specs.end(), [&](const QuantSpec& t) { return same_on_this_row(s, t); }))
        specs.push_back(s);
    }
  std::stable_sort(specs.begin(), specs.end(), [&](const QuantSpec& a, const QuantSpec& b) {
    return a.storage_bytes(out_features, in_features) < b.storage_bytes(out_features, in_features);
  });
  return specs;
}

std::string search_strategy_name(SearchStrategy s) {
  return s == SearchStrategy::kProgressive ? "progressive" : "allocate";
}

SearchStrategy parse_search_strategy(const std::string& name) {
  if (name == "progressive") return SearchStrategy::kProgressive;
  if (name == "allocate") return SearchStrategy::kAllocate;
  throw Error(fmt::format("unknown search strategy '{}': expected progressive or allocate", name));
}

std::string candidate_measurement_name(CandidateMeasurement m) {
  return m == CandidateMeasurement::kExact ? "exact" : "local";
}

CandidateMeasurement parse_candidate_measurement(const std::string& name) {
  if (name == "exact") return CandidateMeasurement::kExact;
  if (name == "local") return CandidateMeasurement::kLocal;
  throw Error(fmt::format("unknown candidate measurement '{}': expected exact or local", name));
}

QuantSpec search_start_spec(at::ScalarType model_dtype) {
  return QuantSpec{model_dtype == at::kBFloat16 ? QuantLevel::kBf16 : QuantLevel::kFp16};
}

CandidateMeasurement SearchOptions::measurement_used() const {
  if (measurement) return *measurement;
  return strategy == SearchStrategy::kAllocate ? CandidateMeasurement::kLocal : CandidateMeasurement::kExact;
}

double safety_used(const Budget& budget, SearchStrategy strategy) {
  if (budget.safety) return *budget.safety;
  return strategy == SearchStrategy::kAllocate ? 1.0 : 1.5;
}

void SearchOptions::validate() const {
  GRADQ_CHECK(!bits.empty(), "the search needs at least one bit width");
  if (fit.inputs.defined()) {
    GRADQ_CHECK(fit.inputs.dim() == 2 && fit.inputs.scalar_type() == at::kLong && fit.inputs.numel() > 0,
                "expected fit inputs as int64 tokens [windows, ctx], neither 0, got {} [{}]",
                c10::toString(fit.inputs.scalar_type()), fmt::join(fit.inputs.sizes(), ", "));
    GRADQ_CHECK(fit.targets.defined() && fit.targets.sizes() == fit.inputs.sizes() && fit.score_from.defined() &&
                    fit.score_from.dim() == 1 && fit.score_from.size(0) == fit.inputs.size(0),
                "expected fit windows with targets [{}] and score_from [{}]", fmt::join(fit.inputs.sizes(), ", "),
                fit.inputs.size(0));
  }
  GRADQ_CHECK(std::isfinite(first_order_weight) && first_order_weight >= 0,
              "first_order_weight (--first-order-weight) must be finite and >= 0, got {}", first_order_weight);
  for (size_t i = 0; i < bits.size(); ++i) {
    quant_level_for_bits(bits[i]);
    GRADQ_CHECK(i == 0 || bits[i] < bits[i - 1], "bit widths must be listed high to low without repeats, got {}",
                fmt::join(bits, ","));
  }
  GRADQ_CHECK(!group_sizes.empty(), "the search needs at least one group size");
  for (size_t i = 0; i < group_sizes.size(); ++i) {
    integer_spec(4, group_sizes[i]).validate();
    GRADQ_CHECK(i == 0 || group_sizes[i] < group_sizes[i - 1],
                "group sizes must be listed large to small (cheapest first), got {}", fmt::join(group_sizes, ","));
  }
  GRADQ_CHECK(confirm_share > 0 && confirm_share <= 1, "confirm_share must be in (0, 1], got {}", confirm_share);
  GRADQ_CHECK(exact_band_kl >= 1 && exact_band_ppl >= 1, "exact bands must be >= 1, got {} (KL) and {} (perplexity)",
              exact_band_kl, exact_band_ppl);
  for (size_t b = 0; b < local_factors.size(); ++b)
    GRADQ_CHECK(std::isnan(local_factors[b]) || (std::isfinite(local_factors[b]) && local_factors[b] >= 0),
                "local factor of block {} must be finite and >= 0 (or NaN: calibrate), got {}", b, local_factors[b]);
  GRADQ_CHECK(std::isfinite(repair_confidence) && repair_confidence >= 0,
              "repair_confidence must be finite and >= 0, got {}", repair_confidence);
  GRADQ_CHECK(allocation_passes >= 1 && repair_failures >= 0,
              "allocation_passes must be >= 1 and repair_failures >= 0, got {} and {}", allocation_passes,
              repair_failures);
  GRADQ_CHECK(!encodings.empty(), "the search needs at least one side-information encoding");
  for (int b : bits)
    for (int64_t g : group_sizes)
      for (const std::string& e : encodings) search_spec(b, g, e);
}

bool collects_xtx_per_block(const QuantizableModel& model) {
  return model.stages() && std::all_of(model.weights().begin(), model.weights().end(),
                                       [&](const WeightInfo& w) { return model.block_position(w.block) >= 0; });
}

PrecisionOptimizer::PrecisionOptimizer(QuantizableModel& model, const GradualEvaluator& evaluator, Budget budget,
                                       SearchOptions options, PrecisionPolicy policy,
                                       const std::map<std::string, InputStats>& stats)
    : model_(model), evaluator_(evaluator), budget_(std::move(budget)), options_(std::move(options)),
      policy_(std::move(policy)), stats_(stats) {
  budget_.validate();
  options_.validate();
  GRADQ_CHECK(evaluator_.reference().has_value(), "the search's evaluator needs the full-precision reference");
  policy_.bind(model_);
  const at::ScalarType start_dtype = start_.level == QuantLevel::kBf16 ? at::kBFloat16 : at::kHalf;
  for (const WeightInfo& w : model_.weights())
    if (model_.stored_dtype(w.name, model_.parameter(w.name).scalar_type()) == start_dtype)
      start_is_loaded_.insert(w.name);
  cache_ = options_.shared_candidates ? options_.shared_candidates
                                      : std::make_shared<CandidateCache>(options_.candidate_cache_bytes, options_.candidate_spill);
  const bool uses_xtx = rounding_needs_xtx(options_.method) ||
                        (options_.trained_fallback && options_.strategy == SearchStrategy::kProgressive);
  // Every weight's X^T X given (an empty map gives none).
  const bool given_xtx = std::all_of(model_.weights().begin(), model_.weights().end(), [&](const WeightInfo& w) {
    const auto it = stats_.find(w.name);
    return it != stats_.end() && it->second.xtx.defined();
  });
  keeps_gptq_factors_ = options_.method == RoundingMethod::kGptq &&
                        !(options_.trained_fallback && options_.strategy == SearchStrategy::kProgressive);
  if (uses_xtx && !given_xtx && collects_xtx_per_block(model_)) {
    for (const WeightInfo& w : model_.weights())
      GRADQ_CHECK(model_.holds_original(w.name), "the search starts from the full-precision model, but '{}' was changed",
                  w.name);
    collects_xtx_per_block_ = true;  // the stream of block inputs starts when the first is needed
  }
}

void PrecisionOptimizer::hold(const std::string& name, const QuantizedTensor& q) {
  if (q.spec == start_ && start_is_loaded_.count(name)) {
    model_.restore(name);  // the same values as setting them, without a copy of the weight
  } else {
    model_.set_weight(name, q.dequantize());
  }
}

namespace {
std::string candidate_key(const std::string& name, const QuantSpec& spec, RoundingMethod method) {
  return name + "|" + spec.name() + "|" + rounding_method_name(method);
}
}  // namespace

void PrecisionOptimizer::forget_candidate(const std::string& name, const QuantSpec& spec, RoundingMethod method) {
  cache_->erase(candidate_key(name, spec, method));
}

QuantizedTensor PrecisionOptimizer::candidate(const std::string& name, const QuantSpec& spec, RoundingMethod method) {
  const std::string key = candidate_key(name, spec, method);
  const int64_t reads_before = cache_->spill_reads();
  if (const QuantizedTensor* cached = cache_->find(key)) {
    candidates_read_back_ += cache_->spill_reads() - reads_before;
    return *cached;
  }
  ++candidates_quantized_;
  const bool with_xtx = spec.is_integer() && rounding_needs_xtx(method);
  const GptqFactor* factor = with_xtx && method == RoundingMethod::kGptq ? gptq_factor_of(name) : nullptr;
  QuantizedTensor q;
  if (factor) {
    q = quantized_tensor_from_packed(quantize_gptq(model_.original_weight(name), spec, *factor,
                                                   options_.rounding.gptq, options_.rounding.clip));
  } else {
    const InputStats* stats = input_stats(name, with_xtx);  // kept: the block's other candidates use it
    q = quantize_weight(model_.original_weight(name), name, spec, method, stats ? *stats : InputStats(),
                        options_.rounding);
  }
  // Float levels are casts of the weight, cheap to repeat; the start state of a weight stored in 16
  // bits is the loaded weight itself, which the cache would count against its budget.
  if (spec.is_integer()) cache_->insert(key, q);
  return q;
}

const InputStats* PrecisionOptimizer::input_stats(const std::string& name, bool with_xtx) {
  const auto given = stats_.find(name);
  const InputStats* found = given == stats_.end() ? nullptr : &given->second;
  if (!with_xtx || (found && found->xtx.defined()) || !collects_xtx_per_block_) return found;
  const int64_t block = model_.block_position(model_.weights()[model_.weight_index(name)].block);
  GRADQ_CHECK(block >= 0, "internal: '{}' is outside every block, so its X^T X cannot be collected per block", name);
  const auto collected = block_stats_.find(name);
  if (block != block_stats_of_ || collected == block_stats_.end() || !collected->second.xtx.defined()) {
    // Runs `fn` with block b's weights as loaded: its own later weights' inputs depend on its earlier
    // ones, and the stream carries the full-precision model's states.
    auto with_original_block = [&](int64_t b, const std::function<void()>& fn) {
      std::vector<std::pair<std::string, at::Tensor>> changed;
      for (size_t i : model_.blocks()[static_cast<size_t>(b)].weights) {
        const std::string& w = model_.weights()[i].name;
        if (model_.holds_original(w)) continue;
        changed.emplace_back(w, model_.weight(w));
        model_.restore(w);
      }
      fn();
      for (const auto& [w, value] : changed) model_.set_weight(w, value);
    };
    const std::vector<StageState>* inputs = nullptr;
    if (loaded_inputs_ && loaded_inputs_->keeps(block)) {
      inputs = &loaded_inputs_->states(block);
    } else {
      // Blocks are asked for in order but for candidates recomputed after the cache dropped them.
      if (!original_inputs_)
        original_inputs_ = std::make_unique<BlockInputStream>(
            *model_.stages(), options_.fit_inputs_or(evaluator_.windows().inputs), evaluator_.batch());
      else if (original_inputs_->block() > block)
        original_inputs_->rewind();
      while (original_inputs_->block() < block)
        with_original_block(original_inputs_->block(), [&] { original_inputs_->advance(); });
      inputs = &original_inputs_->states();
    }
    block_stats_.clear();  // one block's X^T X at a time
    if (block != block_stats_of_) gptq_factors_.clear();  // the same block's are made from the same data
    with_original_block(block, [&] {
      block_stats_ = model_.capture_block_input_stats(block, *inputs, /*with_xtx=*/true);
    });
    block_stats_of_ = block;
  }
  return &block_stats_.at(name);
}

const GptqFactor* PrecisionOptimizer::gptq_factor_of(const std::string& name) {
  const auto given = stats_.find(name);
  if (!keeps_gptq_factors_ || !collects_xtx_per_block_ || (given != stats_.end() && given->second.xtx.defined()))
    return nullptr;
  if (const auto it = gptq_factors_.find(name); it != gptq_factors_.end()) return it->second.get();
  input_stats(name, /*with_xtx=*/true);
  // Handed over from every weight that shares it, so that it is freed as soon as the Hessian is made.
  at::Tensor xtx = block_stats_.at(name).xtx;
  std::vector<std::string> sharing;
  for (auto& [other, stats] : block_stats_)
    if (stats.xtx.defined() && stats.xtx.is_same(xtx)) {
      sharing.push_back(other);
      stats.xtx.reset();
    }
  const at::Device device = model_.original_weight(name).device();
  auto factor = std::make_shared<const GptqFactor>(gptq_factor(std::move(xtx), options_.rounding.gptq, device));
  for (const std::string& other : sharing) gptq_factors_[other] = factor;
  return factor.get();
}

void PrecisionOptimizer::release_fit_inputs() {
  original_inputs_.reset();
  block_stats_.clear();
  block_stats_of_ = -1;
  gptq_factors_.clear();
}

void PrecisionOptimizer::release_fit_statistics(const std::string& name) {
  gptq_factors_.erase(name);
  if (const auto it = block_stats_.find(name); it != block_stats_.end()) it->second.xtx.reset();
}

int64_t PrecisionOptimizer::first_stage(const std::string& name) const {
  const WeightInfo& info = model_.weights()[model_.weight_index(name)];
  const int64_t block = model_.block_position(info.block);
  if (block >= 0) return block;
  return info.role == WeightRole::kHead ? (model_.stages() ? model_.stages()->num_blocks() : 0) : -1;
}

EvalResult PrecisionOptimizer::evaluate_from(BlockInputCache* cache, int64_t from,
                                             std::vector<BlockInputCache::Trial>* trials, SearchResult& result) const {
  const int64_t blocks = model_.stages() ? model_.stages()->num_blocks() : 0;
  ++result.passes;
  result.blocks_whole += blocks;
  if (!cache) return evaluator_.evaluate(model_);
  result.blocks_run += blocks - std::max<int64_t>(from, 0);
  if (trials) trials->assign((evaluator_.windows().size() + evaluator_.batch() - 1) / evaluator_.batch(), {});
  return evaluator_.evaluate([&](int64_t begin, int64_t) {
    const int64_t chunk = cache->chunk_of(begin);
    return trials ? cache->logits_from(from, chunk, (*trials)[chunk]) : cache->logits_from(from, chunk);
  });
}

double PrecisionOptimizer::block_error(const BlockInputCache& cache, int64_t b, SearchResult& result) const {
  ++result.local_measurements;
  ++result.blocks_run;
  result.blocks_whole += cache.num_blocks();
  const at::Tensor window_tokens = evaluator_.scored_tokens_per_window();
  return token_weighted_mean(cache.local_error(b), window_tokens, 0, window_tokens.size(0));
}

SearchResult PrecisionOptimizer::search(const std::vector<std::string>& order,
                                        const std::function<void(const SearchProgress&)>& on_progress) {
  const auto start = Clock::now();
  safety_ = safety_used(budget_, SearchStrategy::kProgressive);
  SearchResult result;
  // Every weight starts at start_; `state` is what the model holds for it between candidates.
  std::map<std::string, QuantizedTensor> state;
  int64_t fp16_bytes = 0, bytes = 0, weights = 0;
  for (const WeightInfo& w : model_.weights()) {
    state[w.name] = candidate(w.name, start_, RoundingMethod::kRtn);
    hold(w.name, state[w.name]);
    result.history[w.name].push_back(state[w.name]);
    fp16_bytes += 2 * w.numel();
    bytes += state[w.name].storage_bytes();
    weights += w.numel();
  }
  for (const std::string& name : order) model_.weight_index(name);  // throws for unknown names
  auto target_met = [&] {
    return budget_.target_memory_reduction && 1.0 - double(bytes) / fp16_bytes >= *budget_.target_memory_reduction;
  };

  // The block-input cache of the current weights (see the header); null: whole passes.
  const ModelStages* stages = model_.stages();
  std::unique_ptr<BlockInputCache> block_cache;
  if (stages) {
    block_cache = std::make_unique<BlockInputCache>(*stages, evaluator_.windows().inputs, evaluator_.batch());
    result.measurement = candidate_measurement_name(options_.measurement_used());
  } else {
    result.measurement = "whole (" + model_.stages_unavailable_reason() + ")";
  }
  const bool local = block_cache && options_.measurement_used() == CandidateMeasurement::kLocal;
  const int64_t blocks = stages ? stages->num_blocks() : 0;
  std::vector<BlockInputCache::Trial> trials;
  auto evaluate_from = [&](int64_t from) { return this->evaluate_from(block_cache.get(), from, &trials, result); };

  result.calibration = evaluate_from(blocks);
  SearchProgress progress;
  progress.units = static_cast<int64_t>(order.size());
  auto record = [&](SearchStep step, const Clock::time_point& t, double quantize_seconds) {
    step.bits_per_weight = 8.0 * double(bytes) / weights;
    step.seconds = quantize_seconds + seconds_since(t);
    result.steps.push_back(step);
    progress.passes = result.passes;
    progress.seconds = seconds_since(start);
    progress.last = &result.steps.back();
    if (on_progress) on_progress(progress);
    return step.accepted;
  };
  auto keep = [&](const std::string& name, const QuantizedTensor& q) {
    bytes += q.storage_bytes() - state[name].storage_bytes();
    state[name] = q;
    result.history[name].push_back(q);
  };
  // Measures `name` at `q` (already in the model) exactly with everything else as it is; keeps it or
  // rolls it back.
  auto decide_exact = [&](const std::string& name, const QuantizedTensor& q, RoundingMethod method,
                          const Clock::time_point& t, double quantize_seconds) {
    SearchStep step;
    step.weight = name;
    step.from = state[name].spec.name();
    step.to = q.spec.name();
    step.method = method;
    step.kl_before = result.calibration.kl->mean.value;
    EvalResult r = evaluate_from(first_stage(name));
    step.kl = r.kl->mean.value;
    step.ppl_increase = ppl_increase(r);
    step.accepted = budget_.quality_met(r, safety_);
    if (step.accepted) {
      keep(name, q);
      result.calibration = std::move(r);
      if (block_cache) block_cache->commit(std::move(trials));
    } else {
      hold(name, state[name]);
    }
    return record(step, t, quantize_seconds);
  };

  // Local measurement (CandidateMeasurement::kLocal). Predictions are made against the cache, which
  // holds the model as of the last confirmation: a block's local error covers all its unconfirmed
  // changes, and the candidate adds its error beyond them.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> factors(blocks, nan);
  if (static_cast<int64_t>(options_.local_factors.size()) == blocks) factors = options_.local_factors;
  std::vector<double> pending_error(blocks, 0.0);  // local error of each block's unconfirmed changes
  struct Pending {
    std::string name;
    QuantizedTensor before, after;
    RoundingMethod method;
    size_t step;
  };
  std::vector<Pending> pending;
  double kl_scale = 1.0;     // measured / predicted, updated at every confirmation
  double nll_per_kl = 1.0;   // log(PPL / PPL_ref) per nat of KL, from the last confirmation
  auto block_error = [&](int64_t b) { return this->block_error(*block_cache, b, result); };
  auto pending_kl = [&] {
    double kl = 0;
    for (int64_t b = 0; b < blocks; ++b)
      if (pending_error[b] != 0) kl += factors[b] * pending_error[b];
    return kl_scale * kl;
  };
  // KL that still fits under the limits after the last confirmation (a perplexity limit read as KL
  // through nll_per_kl).
  auto headroom = [&] {
    const double kl = result.calibration.kl->mean.value;
    double room = std::numeric_limits<double>::infinity();
    if (budget_.max_kl) room = std::min(room, *budget_.max_kl / safety_ - kl);
    if (budget_.max_ppl_increase)
      room = std::min(room, (std::log1p(*budget_.max_ppl_increase / safety_) -
                             std::log1p(ppl_increase(result.calibration))) / nll_per_kl);
    return room;
  };
  auto confirm = [&]() {
    if (pending.empty()) return;
    int64_t from = blocks;
    for (const Pending& p : pending) from = std::min(from, first_stage(p.name));
    Confirmation c;
    c.changes = static_cast<int64_t>(pending.size());
    c.kl_before = result.calibration.kl->mean.value;
    c.predicted_kl = c.kl_before + pending_kl();
    EvalResult r = evaluate_from(from);
    c.measured_kl = r.kl->mean.value;
    const double predicted = c.predicted_kl - c.kl_before, measured = c.measured_kl - c.kl_before;
    // Rescale the predictions for what one block's error does not see (errors of several blocks
    // compound); bounded, since one confirmation of small changes is mostly noise.
    if (predicted > 0 && measured > 0) kl_scale *= std::clamp(measured / predicted, 0.5, 2.0);
    if (c.measured_kl > 0 && ppl_increase(r) > 0)
      nll_per_kl = std::clamp(std::log1p(ppl_increase(r)) / c.measured_kl, 0.25, 4.0);
    std::fill(pending_error.begin(), pending_error.end(), 0.0);
    c.kept = budget_.quality_met(r, safety_);
    result.confirmations.push_back(c);
    std::vector<Pending> changes = std::move(pending);
    pending.clear();
    if (c.kept) {
      result.calibration = std::move(r);
      block_cache->commit(std::move(trials));
      return;
    }
    // Over budget: back to the confirmed model (the cache still describes it), then each change
    // again, measured exactly, in the order it was accepted.
    for (auto it = changes.rbegin(); it != changes.rend(); ++it) {
      bytes += it->before.storage_bytes() - state[it->name].storage_bytes();
      state[it->name] = it->before;
      result.history[it->name].pop_back();
      hold(it->name, it->before);
      result.steps[it->step].accepted = false;
      result.steps[it->step].taken_back = true;
    }
    for (const Pending& p : changes) {
      hold(p.name, p.after);
      decide_exact(p.name, p.after, p.method, Clock::now(), 0.0);
    }
  };

  // Measures `name` at `q` with everything else as it is; accepts (keeps it) or rolls back.
  auto try_candidate = [&](const std::string& name, const QuantizedTensor& q, RoundingMethod method,
                           double quantize_seconds) {
    const auto t = Clock::now();
    const int64_t b = first_stage(name);
    if (!local || b < 0 || b >= blocks) {
      confirm();  // exact measurements start from a confirmed model
      hold(name, q);
      return decide_exact(name, q, method, t, quantize_seconds);
    }
    if (std::isnan(factors[b])) {
      // Calibration: this change alone, measured exactly and locally.
      confirm();
      hold(name, q);
      const double error = block_error(b);
      const double kl_before = result.calibration.kl->mean.value;
      const bool accepted = decide_exact(name, q, method, t, quantize_seconds);
      const double added = result.steps.back().kl - kl_before;
      if (error > 0 && added > 0) factors[b] = added / error / kl_scale;
      return accepted;
    }
    SearchStep step;
    step.weight = name;
    step.from = state[name].spec.name();
    step.to = q.spec.name();
    step.method = method;
    step.predicted = true;
    hold(name, q);
    double error = block_error(b);
    auto predict = [&] {
      step.kl_before = result.calibration.kl->mean.value + pending_kl();
      step.kl = step.kl_before + kl_scale * factors[b] * (error - pending_error[b]);
      step.ppl_increase = (1.0 + ppl_increase(result.calibration)) *
                              std::exp(nll_per_kl * (step.kl - result.calibration.kl->mean.value)) - 1.0;
      step.accepted = budget_.quality_met(step.kl, step.ppl_increase, safety_);
    };
    predict();
    Budget near = budget_;  // the limits widened to where a prediction is not sure enough to say no
    if (near.max_kl) *near.max_kl *= options_.exact_band_kl;
    if (near.max_ppl_increase) *near.max_ppl_increase *= options_.exact_band_ppl;
    if (!step.accepted && near.quality_met(step.kl, step.ppl_increase, safety_)) {
      // Near the limit a prediction is not good enough to say no (perplexity above all moves apart
      // from KL): on the confirmed model, predicted again, and measured exactly if still near.
      if (!pending.empty()) {
        hold(name, state[name]);
        confirm();
        hold(name, q);
        error = block_error(b);
        predict();
      }
      if (!step.accepted && near.quality_met(step.kl, step.ppl_increase, safety_))
        return decide_exact(name, q, method, t, quantize_seconds);
    }
    if (step.accepted) {
      pending.push_back({name, state[name], q, method, result.steps.size()});
      pending_error[b] = error;
      keep(name, q);
    } else {
      hold(name, state[name]);
    }
    record(step, t, quantize_seconds);
    if (step.accepted && pending_kl() >= options_.confirm_share * headroom()) confirm();
    return step.accepted;
  };
  // The cheapest of `specs` (cheapest first) that fits, measuring the most accurate one first.
  auto lower_to = [&](const std::string& name, const std::vector<QuantSpec>& specs, RoundingMethod method) {
    std::vector<QuantSpec> cheaper;
    for (const QuantSpec& s : specs)
      if (s.storage_bytes(state[name].out_features, state[name].in_features) < state[name].storage_bytes())
        cheaper.push_back(s);
    if (cheaper.empty()) return false;
    auto measure = [&](const QuantSpec& s) {
      const auto t = Clock::now();
      const QuantizedTensor q = candidate(name, s, method);
      return try_candidate(name, q, method, seconds_since(t));
    };
    // Cheapest first (it often fits); when it does not, the most accurate decides whether the width
    // is feasible at all; only then the ones in between, cheapest first.
    if (measure(cheaper.front())) return true;
    if (cheaper.size() == 1 || !measure(cheaper.back())) return false;
    // The accurate candidate is now the state; a cheaper one that also fits replaces it, one that
    // does not is rolled back to it.
    for (size_t i = 1; i + 1 < cheaper.size(); ++i)
      if (measure(cheaper[i])) break;
    return true;
  };

  // One pass over the units per bit width: every unit gets its chance at 8 bits before any goes to
  // 4, so the budget is not spent on taking early units to 2 bits while later ones stay at fp16.
  std::set<std::string> settled;  // units for which a width failed: they keep their state
  progress.units = static_cast<int64_t>(order.size() * options_.bits.size());
  // The width a unit takes in the pass of `bits`: `bits`, or where the policy caps the unit below
  // it, its highest allowed width below (0: none). So a capped unit gets its first chance in the
  // first pass, while the budget is as fresh for it as for the others, not after they have spent it.
  auto width_in_pass = [&](const std::string& name, int bits) {
    for (int w : options_.bits)
      if (w <= bits && policy_.allows(name, quant_level_for_bits(w))) return w;
    return 0;
  };
  for (int bits : options_.bits) {
    const QuantLevel level = quant_level_for_bits(bits);
    for (const std::string& name : order) {
      ++progress.unit;
      if (target_met()) break;
      if (settled.count(name)) continue;
      if (level < policy_.min_level(name)) {
        settled.insert(name);
        continue;
      }
      const int width = width_in_pass(name, bits);
      if (width == 0) continue;
      const QuantSpec& now = state[name].spec;
      if (now.is_integer() && now.bits() == width) continue;  // capped: taken to this width in an earlier pass
      const std::vector<QuantSpec> specs =
          options_.candidates(width, state[name].out_features, state[name].in_features);
      bool fitted = lower_to(name, specs, options_.method);
      if (!fitted && options_.trained_fallback && width <= 4) {
        std::vector<QuantSpec> trainable;  // trained rounding needs a scale per group (not k6/k8)
        for (const QuantSpec& s : specs)
          if (s.sub_scale_bits == 0) trainable.push_back(s);
        fitted = lower_to(name, trainable, RoundingMethod::kTrained);
      }
      if (!fitted) {
        settled.insert(name);
      } else if (bits == options_.bits.back() && options_.allow_prune && policy_.allows(name, QuantLevel::kPrune)) {
        lower_to(name, {QuantSpec{QuantLevel::kPrune}}, RoundingMethod::kRtn);
      }
    }
    confirm();  // every width ends on an exactly measured model
  }
  GRADQ_CHECK(pending.empty(), "internal: the search ended with {} unconfirmed changes", pending.size());

  result.memory_target_met = target_met();
  for (const WeightInfo& w : model_.weights()) {
    PlanEntry e;
    e.name = w.name;
    e.spec = state[w.name].spec;
    e.method = RoundingMethod::kRtn;
    for (const SearchStep& s : result.steps)  // the last accepted step set the final state
      if (s.weight == w.name && s.accepted) {
        e.method = s.method;
        e.measured_kl = s.predicted ? std::nan("") : s.kl;
      }
    result.plan.entries.push_back(e);
    result.weights[w.name] = state[w.name];
  }
  result.allocation = ladders(result, policy_);
  model_.restore_all();
  result.candidates_quantized = candidates_quantized_;
  result.candidates_read_back = candidates_read_back_;
  result.seconds = seconds_since(start);
  return result;
}

}  // namespace gradq
