#include "orchestrator/gradual_quantizer.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "common/error.h"
#include "common/timing.h"

namespace gradq {
namespace {


// Times one phase and counts its passes into the outcome.
class PhaseTimer {
 public:
  PhaseTimer(QuantizeOutcome& outcome, std::string name)
      : outcome_(outcome), start_(Clock::now()), cpu_start_(process_cpu_seconds()) {
    outcome_.phases.push_back({std::move(name), 0, 0, 0});
    index_ = outcome_.phases.size() - 1;
  }
  ~PhaseTimer() {
    outcome_.phases[index_].seconds = seconds_since(start_);
    outcome_.phases[index_].cpu_seconds = process_cpu_seconds() - cpu_start_;
  }
  void add_passes(int64_t n) { outcome_.phases[index_].passes += n; }
  const std::string& name() const { return outcome_.phases[index_].name; }

 private:
  QuantizeOutcome& outcome_;
  Clock::time_point start_;
  double cpu_start_;
  size_t index_ = 0;
};

}  // namespace

GradualQuantizer::GradualQuantizer(QuantizableModel& model, Windows calibration, Windows evaluation,
                                   QuantizerOptions options)
    : model_(model), calibration_(std::move(calibration)), evaluation_(std::move(evaluation)),
      options_(std::move(options)) {
  GRADQ_CHECK(!(options_.plan && options_.dynamic), "give a plan or a dynamic policy, not both");
  GRADQ_CHECK(options_.batch > 0, "batch must be positive, got {}", options_.batch);
  const bool searching = !options_.plan && !options_.dynamic;
  if (searching) {
    options_.budget.validate();
    options_.search.validate();
  }
  GRADQ_CHECK(options_.calibration_reference.has_value() == options_.heldout_reference.has_value(),
              "give both the calibration and the held-out reference, or neither");
  options_.policy.bind(model_);
}

QuantizeOutcome GradualQuantizer::run() {
  const auto start = Clock::now();
  QuantizeOutcome out;
  const Budget& budget = options_.budget;
  const bool has_quality = budget.max_ppl_increase || budget.max_kl;
  auto progress = [&](const std::string& phase, int64_t done, int64_t total, const std::string& detail) {
    if (options_.on_progress) options_.on_progress(phase, done, total, detail);
  };
  EvaluatorOptions eval_options;
  eval_options.check_finite = false;  // a candidate with non-finite logits fails the budget (budget.cpp)
  eval_options.batch = options_.batch;
  eval_options.reference_storage = options_.reference_storage;
  GradualEvaluator calibration(calibration_, eval_options), heldout(evaluation_, eval_options);
  {
    PhaseTimer phase(out, "reference");
    if (options_.calibration_reference) {
      progress("reference", 0, 2, "given full-precision log-probabilities");
      calibration.set_reference(*options_.calibration_reference);
      heldout.set_reference(*options_.heldout_reference);
    } else {
      progress("reference", 0, 2, "full-precision log-probabilities");
      calibration.set_reference(model_);
      heldout.set_reference(model_);
      phase.add_passes(2);
    }
  }
  // Held-out passes run block by block: the model holds one block's new weights beside its originals.
  auto evaluate_heldout = [&](const QuantizedWeights& weights, PhaseTimer& phase) {
    EvalResult r = evaluate_by_block(model_, weights, heldout, [&](int64_t done, int64_t blocks) {
      progress(phase.name(), done, blocks, fmt::format("held-out pass: block {} of {}", done, blocks));
    });
    phase.add_passes(1);
    return r;
  };
  // The rounding is fitted on the fit windows, or the calibration windows without them.
  const at::Tensor& fit_inputs = options_.search.fit_inputs_or(calibration_.inputs);
  std::map<std::string, InputStats> stats;
  auto capture_stats = [&](bool with_xtx) {
    PhaseTimer phase(out, "statistics");
    progress("statistics", 0, 1, with_xtx ? "activation statistics and X^T X" : "activation statistics");
    stats = model_.capture_input_stats(fit_inputs, options_.batch, with_xtx);
    phase.add_passes(1);
  };
  // Layers, least important first. A local analysis also leaves its per-block KL factors, which the
  // search's local measurement starts from.
  std::vector<double> local_factors;
  auto importance_order = [&] {
    if (!options_.order.empty()) {
      std::set<std::string> given(options_.order.begin(), options_.order.end());
      for (const WeightInfo& w : model_.weights())
        GRADQ_CHECK(given.count(w.name), "the search order has no place for weight '{}'", w.name);
      for (const std::string& name : options_.order) model_.weight_index(name);
      return options_.order;
    }
    PhaseTimer phase(out, "analysis");
    const ImportanceAnalysis analysis = importance_analysis(model_, calibration_, options_);
    if (!options_.analysis_path)  // a loaded analysis ran its passes elsewhere
      phase.add_passes(analysis.timing.forward_passes + analysis.timing.gradient_passes + analysis.timing.capture_passes);
    local_factors = analysis.local_factors;
    return search_order(model_, analysis);
  };
  auto finish = [&](PhaseTimer& phase) {
    out.heldout = evaluate_heldout(out.weights, phase);
    out.size = plan_size(model_, out.plan);
    if (budget.target_memory_reduction)
      out.memory_target_met = 1.0 - double(out.size.quantized_bytes) / out.size.fp16_bytes >= *budget.target_memory_reduction;
    if (has_quality && !budget.quality_met(*out.heldout)) {
      out.status = QuantizeStatus::kBudgetUnmet;
      out.messages.push_back(fmt::format("the plan breaks the quality budget ({}) on held-out text: perplexity {:+.2f}%, KL {:.5f}",
                                         budget.describe(), 100 * ppl_increase(*out.heldout), out.heldout->kl->mean.value));
    }
  };

  if (options_.plan || options_.dynamic) {
    if (options_.plan) {
      out.plan = *options_.plan;
    } else {
      out.order = importance_order();
      out.plan = options_.dynamic->plan(out.order, options_.search.method);
    }
    bool with_xtx = false;
    const bool needs_stats = plan_needs_stats(out.plan, &with_xtx);
    // X^T X one block at a time where the model splits into blocks (every weight's up front would
    // be 5 times the bf16 weights at TinyLlama-1.1B's shapes).
    const bool by_block = with_xtx && plan_in_blocks(model_, out.plan);
    if (needs_stats && !by_block) capture_stats(with_xtx);
    PhaseTimer phase(out, "validation");
    progress("validation", 0, 1, "quantizing and evaluating on held-out text");
    if (by_block) {
      out.weights = apply_plan_by_block(model_, out.plan, fit_inputs, options_.batch, options_.search.rounding,
                                        options_.sequential_fit, [&](int64_t done, int64_t blocks) {
                                          progress("validation", done, blocks,
                                                   fmt::format("quantized block {} of {}", done, blocks));
                                        });
      phase.add_passes(2);
    } else {
      out.weights = apply_plan(model_, out.plan, stats, options_.search.rounding);
    }
    finish(phase);
    out.seconds = seconds_since(start);
    return out;
  }

  // Feasibility: the search's most precise integer state for every weight.
  {
    PhaseTimer phase(out, "feasibility");
    QuantSpec all8;
    all8.level = quant_level_for_bits(options_.search.bits.front());
    all8.group_size = options_.search.group_sizes.front();
    const Plan plan = uniform_plan(model_, all8, RoundingMethod::kRtn);
    progress("feasibility", 0, 1, "every weight at " + all8.name() + " on held-out text");
    out.all8_heldout = evaluate_heldout(apply_plan(model_, plan), phase);
    if (!budget.quality_met(*out.all8_heldout)) {
      out.status = QuantizeStatus::kBudgetUnmet;
      out.plan = plan;
      out.weights = apply_plan(model_, plan);
      out.heldout = out.all8_heldout;
      out.size = plan_size(model_, plan);
      out.messages.push_back(fmt::format(
          "even every weight at {} breaks the budget ({}) on held-out text: perplexity {:+.2f}%, KL {:.5f}; that is the "
          "best achievable with integer quantization",
          all8.name(), budget.describe(), 100 * ppl_increase(*out.heldout), out.heldout->kl->mean.value));
      out.seconds = seconds_since(start);
      return out;
    }
  }

  // The allocator measures every weight at every candidate and needs no ranking; trained rounding
  // is the progressive search's fallback only.
  const bool allocating = options_.search.strategy == SearchStrategy::kAllocate;
  if (!allocating) out.order = importance_order();
  const bool trained = !allocating && options_.search.trained_fallback;
  const bool needs_stats = options_.search.method != RoundingMethod::kRtn || trained;
  // X^T X ([in, in] per weight) is collected by the search one block at a time where it can be.
  const bool needs_xtx = trained || rounding_needs_xtx(options_.search.method);
  if (needs_stats) capture_stats(needs_xtx && !collects_xtx_per_block(model_));

  SearchResult searched;
  std::optional<PrecisionOptimizer> optimizer;
  {
    PhaseTimer phase(out, "search");
    SearchOptions search = options_.search;
    if (search.local_factors.empty() && model_.stages() &&
        static_cast<int64_t>(local_factors.size()) == model_.stages()->num_blocks())
      search.local_factors = local_factors;
    optimizer.emplace(model_, calibration, budget, search, options_.policy, stats);
    auto on_search_progress = [&](const SearchProgress& p) {
      if (!p.last) return progress("search", p.unit, p.units, p.detail);
      const SearchStep& s = *p.last;
      progress("search", p.unit, p.units,
               fmt::format("{} {} -> {}{} {} (KL {:.4f}, {:.2f} bits/weight)", s.weight, s.from, s.to,
                           s.method == RoundingMethod::kRtn || s.method == RoundingMethod::kClip ? "" : std::string(" ") + rounding_method_name(s.method), s.accepted ? "kept" : "rolled back",
                           s.kl, s.bits_per_weight));
    };
    searched = allocating ? optimizer->allocate(on_search_progress) : optimizer->search(out.order, on_search_progress);
    phase.add_passes(searched.passes);
  }
  out.search_steps = searched.steps;
  out.search_strategy = search_strategy_name(options_.search.strategy);
  out.search_measurement = searched.measurement;
  out.search_curves = searched.curves;
  out.search_blocks_run = searched.blocks_run;
  out.search_blocks_whole = searched.blocks_whole;
  out.search_confirmations = searched.confirmations;
  out.search_local_measurements = searched.local_measurements;
  out.search_candidates_quantized = searched.candidates_quantized;
  out.search_candidates_screened = searched.candidates_screened;
  out.search_ppl_per_kl = searched.ppl_per_kl;
  out.search_candidates_read_back = searched.candidates_read_back;
  out.calibration = searched.calibration;

  PhaseTimer phase(out, "validation");
  progress("validation", 0, 1, "the plan on held-out text");
  // Both ways on held-out text, for either search: upgrades while over the budget, downgrades while
  // within it (the progressive search moves back and forth along the states it went through).
  EvalResult measured;
  int64_t last_pass = 0;
  out.validation_steps = optimizer->verify_and_repair(searched, heldout, measured, [&](const ValidationStep& s) {
    if (s.pass != last_pass) phase.add_passes(1);
    last_pass = s.pass;
    progress("validation", static_cast<int64_t>(out.validation_steps.size()), 0,
             fmt::format("{} {} -> {} {} (held-out KL {:.4f} -> {:.4f})", s.weight, s.from, s.to,
                         s.kept ? "kept" : "undone", s.kl_before, s.kl_after));
  });
  phase.add_passes(1);
  out.weights = searched.weights;
  out.plan = searched.plan;
  // The repair ends within budget, or with nothing left to upgrade; finish() re-measures and judges.
  finish(phase);
  if (budget.target_memory_reduction && !out.memory_target_met)
    out.messages.push_back(fmt::format(
        "the memory target ({:.0f}% smaller than fp16) is not reachable within the quality budget; the best plan found "
        "is {:.1f}% smaller",
        100 * *budget.target_memory_reduction, 100 * (1.0 - double(out.size.quantized_bytes) / out.size.fp16_bytes)));
  out.seconds = seconds_since(start);
  return out;
}

ImportanceAnalysis importance_analysis(QuantizableModel& model, const Windows& calibration,
                                       const QuantizerOptions& options) {
  auto progress = [&](int64_t done, int64_t total, const std::string& detail) {
    if (options.on_progress) options.on_progress("analysis", done, total, detail);
  };
  if (options.analysis_path) {
    progress(0, 1, "loading " + *options.analysis_path);
    return load_analysis(*options.analysis_path);
  }
  AnalyzerOptions analyzer = options.analyzer;
  analyzer.batch = options.batch;
  analyzer.reference_storage = options.reference_storage;
  analyzer.on_progress = [&](const AnalysisProgress& p) { progress(p.done, p.total, p.what); };
  return ImportanceAnalyzer(model, calibration, analyzer).run();
}

std::vector<std::string> search_order(const QuantizableModel& model, const ImportanceAnalysis& analysis) {
  std::vector<std::string> order;
  std::set<std::string> seen;
  for (const UnitImportance* u : analysis.ranked(UnitKind::kLayer)) {
    model.weight_index(u->unit.name);  // throws naming the unit when the analysis is of another model
    order.insert(order.begin(), u->unit.name);
    seen.insert(u->unit.name);
  }
  for (const WeightInfo& w : model.weights())
    GRADQ_CHECK(seen.count(w.name), "the analysis has no importance for weight '{}': was it made for this model?",
                w.name);
  return order;
}

void export_outcome(CausalLM& model, const QuantizeOutcome& outcome, const std::string& packed_path,
                    const std::string& fake_quant_path) {
  export_packed(model, outcome.weights, packed_path);
  if (!fake_quant_path.empty()) export_fake_quant(model, outcome.weights, fake_quant_path);
}

}  // namespace gradq
