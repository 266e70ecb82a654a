// PrecisionOptimizer::allocate() and verify_and_repair(): the search by allocation
// (SearchStrategy::kAllocate).
//
//   curves    every weight alone at every candidate (the search's widths x group sizes x encodings,
//             its rounding method, prune when allowed), the rest as loaded: the KL it adds (allocator.h),
//             measured exactly from its block (kExact: a candidate reruns every block after its own,
//             so the cost per weight grows with depth), or predicted from its block's output error
//             (kLocal: the block alone, times a KL-per-error factor that one exact measurement per
//             block calibrates, with all the block's weights at a middle width; the cost per weight
//             stays flat in depth but for that one measurement per block). Under a perplexity budget
//             each candidate is priced at its KL times its block's perplexity per KL, which the same
//             measurement gives (local curves only)
//   target    the allocator's plan for a predicted-KL target t, measured by a whole pass (block by
//             block: the model holds one block's new weights at a time); t is
//             bracketed and bisected (geometrically) for the largest t whose plan meets the budget /
//             safety on the calibration windows. This corrects the sum of single-weight KLs for the
//             mix's non-additivity with measurements rather than a fitted model, and handles
//             perplexity limits, which the curves (in KL) do not predict.
//   repair    (verify_and_repair, on held-out text against the full budget) upgrades along the hulls
//             while over the budget, then downgrades while within it, each measured, so the plan is
//             locally optimal against single moves on the real metric. A downgrade repair on the
//             calibration windows was tried first: it followed the noise of their perplexity (KL rose
//             from 0.038 to 0.080 while calibration perplexity stayed within its limit) and the
//             held-out validation had to undo it.

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <queue>
#include <set>

#include <c10/util/ScopeExit.h>

#include "common/error.h"
#include "common/error_text.h"
#include "common/timing.h"
#include "eval/block_cache.h"
#include "optimizer/plan.h"
#include "optimizer/precision_optimizer.h"
#include "quant/gptq.h"

namespace gradq {
namespace {

// Candidates of a whole plan by weight, with the rounding method that made each.
using Chosen = std::map<std::string, std::pair<RoundingMethod, QuantizedTensor>>;

// The candidate `plan` holds for `name` if it was made by `method` at `spec`; null otherwise.
const QuantizedTensor* held(const Chosen& plan, const std::string& name, RoundingMethod method, const QuantSpec& spec) {
  const auto it = plan.find(name);
  return it != plan.end() && it->second.first == method && it->second.second.spec == spec ? &it->second.second
                                                                                           : nullptr;
}

// Whether `hull` holds the point of `spec` made by `method`.
bool on_hull(const std::vector<CurvePoint>& hull, const QuantSpec& spec, RoundingMethod method) {
  return std::any_of(hull.begin(), hull.end(), [&](const CurvePoint& p) { return p.spec == spec && p.method == method; });
}

}  // namespace

SearchResult PrecisionOptimizer::allocate(const std::function<void(const SearchProgress&)>& on_progress) {
  const auto start = Clock::now();
  safety_ = safety_used(budget_, SearchStrategy::kAllocate);
  SearchResult result;
  const ModelStages* stages = model_.stages();
  result.measurement = stages ? candidate_measurement_name(options_.measurement_used())
                              : "whole (" + model_.stages_unavailable_reason() + ")";
  const bool local = stages && options_.measurement_used() == CandidateMeasurement::kLocal;
  SearchProgress progress;
  auto report = [&](std::string detail) {
    progress.passes = result.passes;
    progress.seconds = seconds_since(start);
    progress.detail = std::move(detail);
    if (on_progress) on_progress(progress);
  };

  // The curves are KL added over the model as loaded, measured once. Not over the start state
  // (search_start_spec): for an fp32 model that would hold a second fp32 copy of every weight through
  // the curves (85 MB of the 683 MB heap peak of a 768-wide model), and the two differ by the start's
  // fp16 rounding only (for a bf16 or fp16 model they are the same values). Whole plans, below, are
  // measured with the start state's own values.
  int64_t weights = 0, fp16_bytes = 0;
  for (const WeightInfo& w : model_.weights()) {
    model_.restore(w.name);
    weights += w.numel();
    fp16_bytes += 2 * w.numel();
  }
  // The curves measure the blocks in order (below), so the cache keeps the states entering two
  // blocks at a time, not L + 1: flat in depth. The start is measured from block 0's cached input.
  const at::Tensor& windows = evaluator_.windows().inputs;
  std::unique_ptr<BlockInputCache> cache;
  if (stages)
    cache = std::make_unique<BlockInputCache>(*stages, windows, evaluator_.batch(), BlockInputCache::Keep::kMoving);
  const EvalResult start_eval = evaluate_from(cache.get(), 0, nullptr, result);
  // GPTQ fitted on these windows collects X^T X from this cache (input_stats), while it exists.
  if (cache && options_.fit_inputs_or(windows).is_same(windows)) loaded_inputs_ = cache.get();
  const auto forget_loaded_inputs = c10::make_scope_exit([this] { loaded_inputs_ = nullptr; });  // also on a throw
  const double base_kl = start_eval.kl->mean.value;

  // Every weight's candidates.
  struct Option {
    QuantSpec spec;
    RoundingMethod method;
  };
  std::map<std::string, std::vector<Option>> options;
  for (const WeightInfo& w : model_.weights()) {
    std::vector<Option>& opts = options[w.name];
    for (int bits : options_.bits) {
      const QuantLevel level = quant_level_for_bits(bits);
      if (level < policy_.min_level(w.name) || !policy_.allows(w.name, level)) continue;
      for (const QuantSpec& s : options_.candidates(bits, w.out_features, w.in_features)) opts.push_back({s, options_.method});
    }
    if (options_.allow_prune && policy_.allows(w.name, QuantLevel::kPrune) &&
        QuantLevel::kPrune >= policy_.min_level(w.name))
      opts.push_back({QuantSpec{QuantLevel::kPrune}, RoundingMethod::kRtn});
  }
  int64_t total = 0, done = 0;
  for (const auto& [name, opts] : options) total += static_cast<int64_t>(opts.size());
  progress.units = total;
  const int64_t blocks = stages ? stages->num_blocks() : 0;
  result.ppl_per_kl.assign(static_cast<size_t>(blocks), 1.0);
  const bool reuse_curves = options_.shared_curves && !options_.shared_curves->curves.empty();
  if (reuse_curves) {
    result.curves = options_.shared_curves->curves;
    result.ppl_per_kl = options_.shared_curves->ppl_per_kl;
    GRADQ_CHECK(result.curves.size() == model_.weights().size(),
                "shared error curves cover {} weights, the model has {}", result.curves.size(), model_.weights().size());
    progress.unit = total;
    report("curves: measured by an earlier search with the same model, windows and options");
  }
  // Local measurement: KL added per unit of block output error, by block (NaN: not calibrated yet).
  std::vector<double> factors(blocks, std::numeric_limits<double>::quiet_NaN());
  if (static_cast<int64_t>(options_.local_factors.size()) == blocks) factors = options_.local_factors;
  auto block_error = [&](int64_t b) { return this->block_error(*cache, b, result); };
  // First-order terms (SearchOptions::first_order_weight): <g, W_q - W> for every candidate in a
  // block, g the gradient of the fit windows' mean NLL with respect to the weight as loaded, taken
  // block by block as the curves reach each block: the gradient at every block's output once
  // (output_gradients: one forward and backward pass per batch), then one backward through the block
  // alone from its inputs, which a stream of the fit windows carries forward beside the curves. Held
  // at once: the output gradients of the blocks not yet reached (L states per batch of fit windows at
  // the start, like a cache of every boundary, in host memory) and one block's weight gradients, not a
  // model's worth.
  // Where the prices below use them (a perplexity-only budget), or for a sweep's shared curves (its
  // points may have one).
  const bool perplexity_only = budget_.max_ppl_increase && !budget_.max_kl;
  const bool first_order = cache && !reuse_curves && options_.first_order_weight > 0 && options_.perplexity_prices &&
                           (perplexity_only || options_.shared_curves);
  const Windows& gradient_windows = options_.fit.size() > 0 ? options_.fit : evaluator_.windows();
  std::vector<std::vector<StageState>> output_grads;
  std::unique_ptr<BlockInputStream> gradient_stream;
  std::map<std::string, at::Tensor> weight_grads;  // block weight_grads_block's, logical layout
  int64_t weight_grads_block = -1;
  // Autograd through a user's graph can meet what inference never does; the error says how to go on.
  auto with_context = [](const auto& take) {
    try {
      take();
    } catch (const std::exception& e) {
      throw Error(fmt::format("taking gradients for the first-order prices failed: {} (--first-order-weight 0 "
                              "prices without them)",
                              essential_error_line(e)));
    }
  };
  if (first_order) {
    GradientScope no_weight_gradients(model_, GradientScope::Which::kNone);
    with_context([&] { output_grads = output_gradients(*stages, gradient_windows, evaluator_.batch()); });
    gradient_stream = std::make_unique<BlockInputStream>(*stages, gradient_windows.inputs, evaluator_.batch());
    report(fmt::format("curves: gradient of the mean NLL of {} windows at every block's output", gradient_windows.size()));
  }
  auto take_block_gradients = [&](int64_t b) {
    if (!first_order || b < 0 || b >= blocks || b == weight_grads_block) return;
    weight_grads.clear();
    while (gradient_stream->block() < b) gradient_stream->advance();  // the blocks before b hold their loaded weights
    GradientScope only_weights(model_, GradientScope::Which::kQuantizableWeights);
    with_context([&] {
      backward_through_block(*stages, b, gradient_stream->states(), output_grads[static_cast<size_t>(b)]);
    });
    for (const WeightInfo& w : model_.weights()) {
      const at::Tensor g = model_.parameter(w.name).grad();
      if (first_stage(w.name) == b && g.defined()) weight_grads[w.name] = (w.transposed ? g.t() : g).contiguous();
    }
    std::vector<StageState>().swap(output_grads[static_cast<size_t>(b)]);
    weight_grads_block = b;
  };
  auto first_order_of = [&](const std::string& name, const QuantizedTensor& q) {
    const auto g = weight_grads.find(name);
    if (g == weight_grads.end()) return 0.0;
    const at::Tensor change = q.dequantize().to(at::kDouble) - model_.original_weight(name).to(at::kDouble);
    return (g->second.to(at::kDouble) * change).sum().item<double>();
  };
  // Block b's factor from one exact measurement: each of its weights that has an option at the
  // calibration width at its cheapest such option, all together, so that the KL is well above the
  // noise of the windows. The factor is a ratio, so how far the calibration point is from the
  // candidates matters only where KL stops growing in proportion to the error. The calibration width
  // is the search's width nearest 3 bits: the middle of the widths (8, 4, 3, 2) when the perplexity
  // prices below were measured; calibrated at 4 bits, the middle of 8, 6, 5, 4, 3, 2, the allocator
  // stored 0.08-0.10 more bits per weight on meta_swiglu_gqa at +1% to +5% (docs/BENCHMARKS.md, "5- and
  // 6-bit formats").
  //
  // The same measurement gives the block's perplexity per KL: ln(PPL / PPL_start) / KL added. The two
  // part ways block by block (on meta_swiglu_gqa in the zoo 1.05 in block 0 and 0.45 in block 3; on
  // stories260K 0.88-1.39), and under a perplexity budget a nat of KL in one block is not worth one
  // in another: the allocator then prices every candidate at its KL times its block's ratio. The
  // ratio is clamped to [0.25, 4]: one measurement of a small KL can be mostly noise, or negative.
  // With first-order terms it is measured net of them (times their weight, so that the prices predict
  // the calibration point's measured perplexity).
  constexpr int kCalibrationBits = 3;
  const int calibration_bits = *std::min_element(options_.bits.begin(), options_.bits.end(), [](int x, int y) {
    return std::abs(x - kCalibrationBits) < std::abs(y - kCalibrationBits);
  });
  auto calibrate = [&](int64_t b) {
    std::vector<std::string> changed;
    double changed_first_order = 0;
    for (const WeightInfo& w : model_.weights()) {
      if (first_stage(w.name) != b) continue;
      const Option* pick = nullptr;
      for (const Option& o : options.at(w.name))
        if (o.spec.is_integer() && o.spec.bits() == calibration_bits &&
            (!pick || o.spec.storage_bytes(w.out_features, w.in_features) <
                          pick->spec.storage_bytes(w.out_features, w.in_features)))
          pick = &o;
      if (!pick) continue;
      const QuantizedTensor& q = candidate(w.name, pick->spec, pick->method);
      changed_first_order += first_order_of(w.name, q);
      hold(w.name, q);
      changed.push_back(w.name);
    }
    if (changed.empty()) return;
    const double error = block_error(b);
    const EvalResult exact = evaluate_from(cache.get(), b, nullptr, result);
    const double added = exact.kl->mean.value - base_kl;
    if (error > 0 && added > 0) factors[b] = added / error;
    double& ppl_per_kl = result.ppl_per_kl[static_cast<size_t>(b)];
    if (added > 0)
      ppl_per_kl = std::clamp((std::log(exact.ppl.value / start_eval.ppl.value) -
                               options_.first_order_weight * changed_first_order) / added,
                              0.25, 4.0);
    for (const std::string& name : changed) model_.restore(name);
    report(fmt::format("curves: block {} calibrated, {} weights at {} bits add KL {:.5f}, {:.3g} per unit of output "
                       "error, ln-perplexity {:.3g} per KL",
                       b, changed.size(), calibration_bits, added, factors[b], ppl_per_kl));
  };
  // The options of `name` worth measuring. The allocator only ever chooses points on a weight's
  // lower hull of (bytes, KL), and GPTQ's candidates come with the error GPTQ minimises, the layer's
  // output error on the fit windows (gptq_output_error), at the cost of one product each: candidates
  // off the hull of (bytes, that error) are not measured. On stories260K that measures 411 of 915
  // curve points, 371 of the 400 on the full KL curves' hulls among them, and the sweep's plans
  // stay within the spread that any change of the candidate set gives (docs/BENCHMARKS.md,
  // "Candidates screened by GPTQ's own error"). Other methods, and GPTQ without X^T X (none given and
  // none collected), are all measured.
  auto screen = [&](const std::string& name) {
    const std::vector<Option>& all = options.at(name);
    const bool has_gptq = std::any_of(all.begin(), all.end(), [](const Option& o) { return o.method == RoundingMethod::kGptq; });
    if (!options_.screen_candidates || !has_gptq) return all;
    const at::Tensor& original = model_.original_weight(name);
    const GptqFactor* factor = gptq_factor_of(name);
    std::optional<GptqFactor> made;  // X^T X given up front: GPTQ factors it for every candidate, keeps none
    if (!factor) {
      const InputStats* stats = input_stats(name, /*with_xtx=*/true);
      if (!stats || !stats->xtx.defined()) return all;
      made = gptq_factor(stats->xtx, options_.rounding.gptq, original.device());
      factor = &*made;
    }
    std::vector<CurvePoint> output_error;
    for (const Option& o : all)
      if (o.method == RoundingMethod::kGptq) {
        const QuantizedTensor& q = candidate(name, o.spec, o.method);
        output_error.push_back({o.spec, o.method, q.storage_bytes(), gptq_output_error(original, q.dequantize(), *factor)});
      }
    const std::vector<CurvePoint> hull = lower_hull(output_error);  // not empty: has_gptq
    std::vector<Option> kept;
    for (const Option& o : all) {
      if (o.method != RoundingMethod::kGptq || on_hull(hull, o.spec, o.method)) {
        kept.push_back(o);
      } else {
        forget_candidate(name, o.spec, o.method);
        ++result.candidates_screened;
      }
    }
    return kept;
  };
  // Weights in the order their values reach the model (embeddings, blocks in order, head): each is
  // measured alone with the others as loaded, so the order changes no curve, only which states
  // the cache needs when.
  std::vector<const WeightInfo*> in_stage_order;
  for (const WeightInfo& w : model_.weights()) in_stage_order.push_back(&w);
  std::stable_sort(in_stage_order.begin(), in_stage_order.end(),
                   [&](const WeightInfo* x, const WeightInfo* y) { return first_stage(x->name) < first_stage(y->name); });
  for (const WeightInfo* weight : in_stage_order) {
    if (reuse_curves) break;
    const WeightInfo& w = *weight;
    std::vector<CurvePoint>& curve = result.curves[w.name];
    // The start state is a point of the curve only where the policy allows its level: a policy's
    // max bounds the plan, so a weight capped at int4 is not left at fp16 (nor upgraded back to it
    // by the repair) when the budget is tight. Without a candidate at all it stays at the start.
    if (policy_.allows(w.name, start_.level) || options.at(w.name).empty())
      curve.push_back({start_, RoundingMethod::kRtn, start_.storage_bytes(w.out_features, w.in_features), 0.0});
    const int64_t b = first_stage(w.name);
    if (cache && b >= 0) cache->move_to(b);  // the blocks before b hold their loaded weights again
    take_block_gradients(b);
    const bool in_block = local && b >= 0 && b < blocks;
    if (in_block && std::isnan(factors[b])) calibrate(b);
    // Without a factor (its calibration measured no KL) the block is measured exactly.
    const bool predict = in_block && !std::isnan(factors[b]);
    const std::vector<Option> measured = screen(w.name);
    done += static_cast<int64_t>(options.at(w.name).size() - measured.size());
    for (const Option& o : measured) {
      const QuantizedTensor& q = candidate(w.name, o.spec, o.method);
      hold(w.name, q);
      const double kl = predict ? factors[b] * block_error(b)
                                : evaluate_from(cache.get(), b, nullptr, result).kl->mean.value - base_kl;
      curve.push_back({o.spec, o.method, q.storage_bytes(), kl, first_order_of(w.name, q)});
      progress.unit = ++done;
      if (done % 16 == 0 || done == total)
        report(fmt::format("curves: {} at {} adds KL {:.5f}", w.name, o.spec.name(), curve.back().kl));
    }
    model_.restore(w.name);
    // Its curve is measured: its X^T X (or GPTQ's factor of it) goes now, not with its block's.
    release_fit_statistics(w.name);
    // Only the points on the weight's hull are ever chosen (allocator.h), and the plan passes and
    // the repair ask for them again: keep those, drop the rest, so the cache's bound is not spent on
    // candidates that no later step reads while the ones that are read get evicted.
    const std::vector<CurvePoint> hull = lower_hull(curve);
    for (const CurvePoint& p : curve)
      if (!on_hull(hull, p.spec, p.method)) forget_candidate(w.name, p.spec, p.method);
  }
  output_grads.clear();
  gradient_stream.reset();
  weight_grads.clear();
  if (options_.shared_curves && !reuse_curves) *options_.shared_curves = {result.curves, result.ppl_per_kl};
  // What the allocator minimises: KL, or under a perplexity-only budget each weight's predicted
  // ln-perplexity change: its KL times its block's perplexity per KL (above), plus its first-order
  // term times SearchOptions::first_order_weight, at least SearchOptions::kFirstOrderFloor of the former. Without
  // first-order terms a weight's points share one price, so its hull is the same; with them a point
  // that the gradient says lowers perplexity costs less, but never nothing: a point priced at 0 ties
  // with the weight as loaded, lower_hull then keeps the cheapest point alone, and the repair has no
  // way back up for a weight whose gain the held-out windows do not confirm (on meta_swiglu_gqa at
  // +1% it upgraded every other weight and still missed the budget). The allocator also picks the
  // candidates whose terms are most negative, among them those the gradient's noise made so.
  std::map<std::string, double> price;
  std::set<std::string> priced;
  for (const WeightInfo& w : model_.weights()) {
    const int64_t b = first_stage(w.name);
    if (options_.perplexity_prices && perplexity_only && b >= 0 && b < blocks)
      priced.insert(w.name);
    price[w.name] = priced.count(w.name) ? result.ppl_per_kl[static_cast<size_t>(b)] : 1.0;
  }
  ErrorCurves priced_curves = result.curves;
  for (auto& [name, curve] : priced_curves)
    for (CurvePoint& p : curve) {
      const double second_order = p.kl * price.at(name);
      p.kl = priced.count(name) ? std::max(second_order + options_.first_order_weight * p.first_order,
                                           SearchOptions::kFirstOrderFloor * second_order)
                                : second_order;
    }
  // The KL the curves measured for a (priced) hull point of `name`, and the sum an allocation's
  // points predict.
  auto curve_kl = [&](const std::string& name, const CurvePoint& point) {
    for (const CurvePoint& p : result.curves.at(name))
      if (p.spec == point.spec && p.method == point.method) return p.kl;
    TORCH_INTERNAL_ASSERT(false, "a hull point of ", name, " is no curve point");
    return 0.0;
  };
  auto predicted_kl = [&](const Allocation& a) {
    double kl = 0;
    for (const auto& [name, i] : a.choice) kl += curve_kl(name, a.chosen(name));
    return kl;
  };

  // Whole plans from here on, each measured block by block (evaluate_by_block: the model holds one
  // block's new weights at a time, not a copy of every weight); the curves' cache of block states is
  // no longer needed, nor the fit windows' states: the passes read candidates back from the
  // candidate cache (a candidate it dropped without a spill restarts them from the embedding).
  loaded_inputs_ = nullptr;
  cache.reset();
  release_fit_inputs();
  model_.restore_all();
  // The candidates of the plan last measured and of the best plan so far, by weight: the next plan
  // differs from the last in some weights only, and the candidate cache's memory holds few of a deep
  // model's hull points, so taking each weight from the cache alone reads nearly every weight back
  // from its spill file in every pass (or, without a spill, quantizes it again: 9 minutes a pass for
  // 22 layers of TinyLlama's width). They share their tensors where the plans agree.
  Chosen measured_plan, best_plan;
  auto evaluate_plan = [&](const Allocation& a) {
    Chosen chosen;
    QuantizedWeights plan;
    for (const auto& [name, i] : a.choice) {
      const CurvePoint& p = a.hulls.at(name)[i];
      const QuantizedTensor* last = held(measured_plan, name, p.method, p.spec);
      plan[name] = last ? *last : candidate(name, p.spec, p.method);
      chosen.emplace(name, std::make_pair(p.method, plan[name]));
    }
    measured_plan = std::move(chosen);
    ++result.passes;
    result.blocks_whole += blocks;
    result.blocks_run += blocks;
    return evaluate_by_block(model_, plan, evaluator_);
  };
  auto changed = [&](const Allocation& a) {
    int64_t n = 0;
    for (const auto& [name, i] : a.choice) n += !(a.hulls.at(name)[i].spec == start_);
    return n;
  };
  Allocation best;
  EvalResult best_eval;
  bool found = false;
  // One whole pass over `a`'s plan, recorded against its prediction; within the budget / safety?
  auto measure_plan = [&](const Allocation& a, EvalResult& r) {
    r = evaluate_plan(a);
    Confirmation c;
    c.changes = changed(a);
    c.kl_before = base_kl;
    c.predicted_kl = base_kl + predicted_kl(a);
    c.measured_kl = r.kl->mean.value;
    c.kept = budget_.quality_met(r, safety_);
    result.confirmations.push_back(c);
    report(fmt::format("{:.3f} bits/weight: predicted KL {:.4f}, measured {:.4f} ({:+.2f}% perplexity), {}",
                       8.0 * a.bytes / weights, c.predicted_kl, c.measured_kl, 100 * ppl_increase(r),
                       c.kept ? "within budget" : "over budget"));
    return c.kept;
  };
  if (budget_.target_memory_reduction) {
    // The dual: the least predicted KL at the memory target, taken when it meets the quality budget
    // (the progressive search, likewise, stops once the target is met).
    const auto max_bytes = static_cast<int64_t>(std::floor((1.0 - *budget_.target_memory_reduction) * fp16_bytes));
    best = allocate_for_bytes(priced_curves, max_bytes);
    found = measure_plan(best, best_eval);
    best_plan = measured_plan;
  }
  if (!found) {
    // Target search. The first guess reads a perplexity limit as nats of KL (log(1 + limit)).
    double t = std::numeric_limits<double>::infinity();
    if (budget_.max_kl) t = *budget_.max_kl / safety_;
    if (budget_.max_ppl_increase) t = std::min(t, std::log1p(*budget_.max_ppl_increase / safety_));
    double lo = 0, hi = std::numeric_limits<double>::infinity();
    std::map<std::string, size_t> last_choice;
    for (int64_t pass = 0; pass < options_.allocation_passes; ++pass) {
      Allocation a = allocate_for_kl(priced_curves, t);
      if (pass > 0 && a.choice == last_choice) break;  // the bracket is narrower than one hull step
      last_choice = a.choice;
      EvalResult r;
      if (measure_plan(a, r)) {
        lo = t;
        if (!found || a.bytes < best.bytes) {
          best = std::move(a);
          best_eval = std::move(r);
          best_plan = measured_plan;
        }
        found = true;
      } else {
        hi = t;
      }
      t = std::isinf(hi) ? 2 * t : lo == 0 ? t / 4 : std::sqrt(lo * hi);
    }
    if (!found) {
      // No plan met the budget: every weight at its most accurate hull point (the start unless a
      // candidate measured no KL at all), which the held-out validation then judges.
      best = allocate_for_kl(priced_curves, 0.0);
      best_eval = evaluate_plan(best);
      best_plan = measured_plan;
    }
  }

  measured_plan.clear();  // best_plan holds what the result takes
  result.calibration = best_eval;

  // Each weight's allocation is one accepted step from the next more accurate hull point, with the
  // KLs its curve gives (`predicted`: single-weight measurements, not of the mix). No history of
  // states is kept (SearchResult::history is the progressive search's): it held every weight's start
  // state and the hull points above its choice, a copy of the model in 16 bits and more, outside
  // the candidate cache's bound.
  std::vector<SearchStep> allocated;  // (the search's steps: allocation measures no single step in the mix)
  for (const WeightInfo& w : model_.weights()) {
    const auto& hull = best.hulls.at(w.name);
    const size_t chosen = best.choice.at(w.name);
    const CurvePoint& point = hull[chosen];
    if (!(point.spec == start_)) {
      SearchStep step;
      step.weight = w.name;
      step.from = (chosen + 1 < hull.size() ? hull[chosen + 1].spec : start_).name();
      step.to = point.spec.name();
      step.method = point.method;
      step.accepted = true;
      step.predicted = true;
      step.kl_before = base_kl + (chosen + 1 < hull.size() ? curve_kl(w.name, hull[chosen + 1]) : 0.0);
      step.kl = base_kl + curve_kl(w.name, point);
      allocated.push_back(step);
    }
    const QuantizedTensor* kept = held(best_plan, w.name, point.method, point.spec);
    result.weights[w.name] = kept ? *kept : candidate(w.name, point.spec, point.method);
    PlanEntry e;
    e.name = w.name;
    e.spec = point.spec;
    e.method = point.method;
    result.plan.entries.push_back(e);
  }
  result.steps = std::move(allocated);
  result.allocation = best;
  result.memory_target_met = budget_.target_memory_reduction &&
                             1.0 - double(best.bytes) / fp16_bytes >= *budget_.target_memory_reduction;
  result.candidates_quantized = candidates_quantized_;
  result.candidates_read_back = candidates_read_back_;
  result.seconds = seconds_since(start);
  return result;
}

std::vector<ValidationStep> PrecisionOptimizer::verify_and_repair(
    SearchResult& searched, const GradualEvaluator& evaluator, EvalResult& measured,
    const std::function<void(const ValidationStep&)>& on_step) {
  Allocation& a = searched.allocation;
  GRADQ_CHECK(!a.choice.empty(), "verify_and_repair needs the result of allocate() or search(), got one without an allocation");
  std::vector<ValidationStep> steps;
  // Each plan is measured block by block: the model holds one block's new weights at a time.
  model_.restore_all();
  measured = evaluate_by_block(model_, searched.weights, evaluator);
  int64_t passes = 0;
  using Move = std::pair<std::string, size_t>;  // weight, hull point
  // The quantized tensor of a hull point: the progressive search's own state (trained codes as
  // trained), or the allocator's candidate.
  auto tensor_at = [&](const std::string& name, size_t i) {
    if (const auto h = searched.history.find(name); h != searched.history.end()) return h->second.rbegin()[i];
    const CurvePoint& p = a.hulls.at(name)[i];
    return candidate(name, p.spec, p.method);
  };
  // Makes `moves` together and measures once; keeps them all when `keep(result)` says so.
  auto apply = [&](const std::vector<Move>& moves, int64_t candidates, auto keep) {
    std::vector<QuantizedTensor> before, after;
    QuantizedWeights trial = searched.weights;
    for (const auto& [name, to] : moves) {
      before.push_back(searched.weights.at(name));
      after.push_back(tensor_at(name, to));
      trial[name] = after.back();
    }
    EvalResult r = evaluate_by_block(model_, trial, evaluator);
    const bool kept = keep(r);
    ++passes;
    for (size_t i = 0; i < moves.size(); ++i) {
      const auto& [name, to] = moves[i];
      const CurvePoint& p = a.hulls.at(name)[to];
      ValidationStep step{name, before[i].spec.name(), after[i].spec.name(), measured.kl->mean.value, r.kl->mean.value,
                          8.0 * double(after[i].storage_bytes() - before[i].storage_bytes()), candidates, kept, passes};
      if (kept) {
        a.bytes += p.bytes - a.chosen(name).bytes;
        a.predicted_kl += p.kl - a.chosen(name).kl;
        a.choice[name] = to;
        searched.weights[name] = after[i];
        for (PlanEntry& e : searched.plan.entries)
          if (e.name == name) e = {name, p.spec, p.method, std::nan("")};
      }
      steps.push_back(step);
      if (on_step) on_step(step);
    }
    if (kept) measured = std::move(r);
    return kept;
  };
  // Over budget: upgrades, the most predicted KL recovered per byte first, 1, 2, 4, ... per pass.
  for (size_t group = 1; !budget_.quality_met(measured); group *= 2) {
    std::vector<std::pair<double, std::string>> upgrades;
    for (const auto& [name, i] : a.choice) {
      const auto& hull = a.hulls.at(name);
      if (i + 1 < hull.size()) upgrades.emplace_back(kl_per_byte(hull[i], hull[i + 1]), name);
    }
    if (upgrades.empty()) break;  // every weight at its most accurate point
    std::stable_sort(upgrades.begin(), upgrades.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
    std::vector<Move> moves;
    for (size_t i = 0; i < std::min(group, upgrades.size()); ++i)
      moves.emplace_back(upgrades[i].second, a.choice.at(upgrades[i].second) + 1);
    apply(moves, static_cast<int64_t>(upgrades.size()), [](const EvalResult&) { return true; });
  }
  // Within budget: downgrades, the least predicted KL per byte saved first, each kept only when the
  // budget holds above the measurement by repair_confidence standard errors. Groups double after a
  // kept one and halve after a failed one (its moves go back in the queue for smaller groups), and
  // the repair stops after repair_failures failed groups in all, so its passes stay about constant
  // as the model grows. Near the limit most of what is left passes or fails by the noise of the
  // windows: with groups that stopped growing after the first failure and only failures in a row
  // counted, the repair took 66+ held-out passes at 32 layers, most of them single downgrades kept
  // near the limit. None once a memory target is met (the plan is then the least KL at that size).
  int64_t fp16_bytes = 0;
  for (const WeightInfo& w : model_.weights()) fp16_bytes += 2 * w.numel();
  const bool target_met = budget_.target_memory_reduction &&
                          1.0 - double(a.bytes) / fp16_bytes >= *budget_.target_memory_reduction;
  const double z = options_.repair_confidence;
  auto within_with_margin = [&](const EvalResult& r) {
    const KlStats& kl = *r.kl;
    return budget_.quality_met(kl.mean.value + z * kl.mean.stderr_, kl.ppl_ratio.value + z * kl.ppl_ratio.stderr_ - 1);
  };
  if (budget_.quality_met(measured) && !target_met) {
    using Downgrade = std::pair<double, std::string>;
    std::priority_queue<Downgrade, std::vector<Downgrade>, std::greater<>> queue;
    auto push_next = [&](const std::string& name) {
      const size_t i = a.choice.at(name);
      if (i == 0) return;
      const auto& hull = a.hulls.at(name);
      queue.emplace(kl_per_byte(hull[i - 1], hull[i]), name);
    };
    for (const auto& [name, i] : a.choice) push_next(name);
    int64_t failures = 0;
    size_t group = 1;
    while (!queue.empty() && failures < options_.repair_failures) {
      std::vector<Move> moves;
      while (!queue.empty() && moves.size() < group) {
        const std::string name = queue.top().second;
        queue.pop();
        moves.emplace_back(name, a.choice.at(name) - 1);
      }
      const bool kept = apply(moves, 1, within_with_margin);
      if (kept || moves.size() > 1)
        for (const Move& m : moves) push_next(m.first);  // a kept weight's next point, or tried again
      if (kept) {
        group *= 2;
      } else {
        ++failures;  // a failed single downgrade is dropped, a larger group is tried again in halves
        group = std::max<size_t>(1, moves.size() / 2);
      }
    }
  }
  return steps;
}

}  // namespace gradq
