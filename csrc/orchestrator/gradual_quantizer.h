#pragma once
// GradualQuantizer: the whole job behind `gradq quantize`, callable from a training harness.
//
// Phases (each timed, with its forward passes counted):
//   reference   the full-precision model's log-probabilities on the calibration and held-out windows
//   feasibility every weight at 8 bits (the search's first width, its largest group) on the held-out
//               windows: when even that breaks the budget, nothing smaller can meet it, and run()
//               returns kBudgetUnmet with that measurement as the best achievable
//   analysis    importance ranking of the layers (ImportanceAnalyzer, or a saved analysis JSON)
//   statistics  activation statistics of the quantizable weights (clipping search, trained rounding)
//   search      PrecisionOptimizer over the layers, least important first, against budget / safety
//   validation  the plan on the held-out windows against the full budget, repaired both ways
//               (PrecisionOptimizer::verify_and_repair): upgrades while over it, then downgrades
//               while it holds with a margin; the allocator's plan moves along its hulls, the
//               progressive search's back and forth along the states each weight went through
// A fixed plan (Options::plan) or the dynamic policy replaces analysis and search; the result is
// still evaluated on held-out text and judged against the budget when one is given.

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "eval/evaluator.h"
#include "export/export.h"
#include "importance/analyzer.h"
#include "model/causal_lm.h"
#include "optimizer/budget.h"
#include "optimizer/plan.h"
#include "optimizer/policy.h"
#include "optimizer/precision_optimizer.h"

namespace gradq {

struct QuantizerOptions {
  Budget budget;
  int64_t batch = EvaluatorOptions{}.batch;  ///< windows per forward pass (EvaluatorOptions::batch says why 1)
  /// How the calibration and held-out references (and a fresh analysis's) are kept (evaluator.h).
  ReferenceStorage reference_storage;
  SearchOptions search;
  PrecisionPolicy policy;          ///< constraints on the search
  std::optional<Plan> plan;        ///< re-apply this plan: no analysis, no search
  std::optional<DynamicPolicy> dynamic;  ///< assign levels by importance share: no search
  /// With a plan or a dynamic policy on a model split into blocks: fit each block's rounding on the
  /// states the earlier blocks, already quantized, pass on (apply_plan_by_block's `sequential`)
  /// instead of the full-precision model's. The search always fits on the full-precision states.
  bool sequential_fit = false;
  std::optional<std::string> analysis_path;  ///< ranking from a saved analysis instead of a fresh one
  std::vector<std::string> order;  ///< search order from the caller (least important first): no analysis
  AnalyzerOptions analyzer;        ///< options of a fresh analysis
  /// Full-precision references computed earlier on the same windows (a sweep shares them): the
  /// reference phase then runs no pass. Both or neither.
  std::optional<Reference> calibration_reference, heldout_reference;
  /// Progress lines ("search: 12/35 layers ...") for a display; called on the calling thread.
  std::function<void(const std::string& phase, int64_t done, int64_t total, const std::string& detail)> on_progress;
};

enum class QuantizeStatus {
  kMet,          ///< the plan meets the quality budget on held-out text (or no budget was given)
  kBudgetUnmet,  ///< no plan found within the quality budget (CLI exit code 2)
};

struct PhaseTiming {
  std::string name;
  int64_t passes = 0;  ///< forward passes over calibration or held-out windows
  double seconds = 0;      ///< wall clock
  double cpu_seconds = 0;  ///< CPU time of the whole process (every thread) during the phase
};


struct QuantizeOutcome {
  QuantizeStatus status = QuantizeStatus::kMet;
  std::vector<std::string> messages;   ///< what a user must know (budget unmet, target unreachable)
  Plan plan;
  QuantizedWeights weights;
  PlanSize size;
  std::optional<EvalResult> heldout;       ///< the plan on the held-out windows
  std::optional<EvalResult> all8_heldout;  ///< the feasibility check
  std::optional<EvalResult> calibration;   ///< the plan on the calibration windows (search)
  std::vector<std::string> order;          ///< search order, least important first
  std::vector<SearchStep> search_steps;
  std::string search_strategy;     ///< search_strategy_name of the search that ran (empty: none ran)
  std::string search_measurement;  ///< SearchResult::measurement ("exact", or "whole (why)")
  ErrorCurves search_curves;       ///< SearchResult::curves (allocation)
  int64_t search_blocks_run = 0, search_blocks_whole = 0;  ///< SearchResult::blocks_run / blocks_whole
  std::vector<Confirmation> search_confirmations;          ///< SearchResult::confirmations
  int64_t search_local_measurements = 0;                   ///< SearchResult::local_measurements
  /// SearchResult::candidates_quantized / candidates_read_back
  int64_t search_candidates_quantized = 0, search_candidates_read_back = 0;
  int64_t search_candidates_screened = 0;  ///< SearchResult::candidates_screened
  std::vector<double> search_ppl_per_kl;   ///< SearchResult::ppl_per_kl
  std::vector<ValidationStep> validation_steps;
  bool memory_target_met = false;
  std::vector<PhaseTiming> phases;
  double seconds = 0;
};

class GradualQuantizer {
 public:
  /// `model` is the full-precision model; it is used in place and left with its original weights.
  GradualQuantizer(QuantizableModel& model, Windows calibration, Windows evaluation, QuantizerOptions options);
  QuantizeOutcome run();

 private:
  QuantizableModel& model_;
  Windows calibration_, evaluation_;
  QuantizerOptions options_;
};

/// The importance analysis `options` asks for: loaded from options.analysis_path, or run on
/// `calibration` with options.analyzer (at options.batch windows per pass), reporting progress
/// through options.on_progress as phase "analysis". `model` is probed in place and restored.
ImportanceAnalysis importance_analysis(QuantizableModel& model, const Windows& calibration,
                                       const QuantizerOptions& options);

/// The search order an analysis gives: the model's layers, least important first. Throws when the
/// analysis lacks one of the model's weights or names one the model does not have.
std::vector<std::string> search_order(const QuantizableModel& model, const ImportanceAnalysis& analysis);

/// Writes the packed model (and, when the path is not empty, the fake-quant model) of `outcome`.
void export_outcome(CausalLM& model, const QuantizeOutcome& outcome, const std::string& packed_path,
                    const std::string& fake_quant_path = "");

}  // namespace gradq
