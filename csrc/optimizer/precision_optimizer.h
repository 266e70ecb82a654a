#pragma once
// PrecisionOptimizer: the budgeted search that lowers each weight's precision step by step.
//
// Every weight starts at 16 bits (search_start_spec: the memory reference). The search lowers
// precision progressively: one pass over the units per bit width (8, then 4, [3,] then 2 [then
// prune]), least important first within a pass. For a unit, the group sizes of the width (128 ->
// 64 -> 32 -> 16) in each side-information encoding of SearchOptions::encodings are the candidates,
// cheapest first (by the unit's storage). A candidate is measured by one pass over the calibration
// windows with the unit at the candidate and every other weight at its current state; it is kept
// when the whole model stays within the budget divided by the safety factor, otherwise the unit is
// rolled back to exactly its previous state.
//   * Order of measurement at a width: the cheapest candidate first (it often fits); if it does
//     not, the most accurate (smallest group) decides whether the width is feasible at all; only
//     then the ones in between, cheapest first, and the first that fits is kept.
//   * Trainable fallback: when no rounded candidate fits at 4 bits or fewer, trained rounding
//     (quant/trained_rounding.h) gets the same treatment before the width is given up.
//   * A unit for which a width is given up keeps its state for the rest of the search.
// Passes by width rather than taking each unit as low as it goes: the budget then buys 4-bit for
// many units before it buys 2-bit for a few.
// The search stops when the memory target is met or every unit has been visited.
//
// Measurement: when the model splits into stages (model/stages.h), the state entering every block
// is cached for the calibration windows and a candidate for a weight of block b reruns only blocks
// b.. and the head; when it is kept, the states that run computed become the cache's. The KL is
// bit for bit that of a whole pass (same batches, same operations), so the plan does not depend on
// whether the model has stages; the work per candidate is (L - b) / L of a whole pass.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "eval/block_cache.h"
#include "eval/evaluator.h"
#include "model/quantizable_model.h"
#include "optimizer/allocator.h"
#include "optimizer/budget.h"
#include "optimizer/candidate_cache.h"
#include "optimizer/plan.h"
#include "optimizer/policy.h"

namespace gradq {


/// How the search measures a candidate inside a block when the model has stages (block_cache.h).
enum class CandidateMeasurement {
  /// Blocks b.. and the head rerun from the cached input of the candidate's block b: every decision
  /// on the exact calibration KL. Cost per candidate grows with the blocks after b.
  kExact,
  /// Block b alone: its output error times a per-block factor (KL per unit of error) predicts the
  /// KL the candidate adds. Accepted changes stay unconfirmed until their predicted KL reaches a
  /// share of the budget's headroom (and at the end of every width); then one exact pass from the
  /// first changed block measures them together. Within budget they are kept and the prediction is
  /// rescaled by measured / predicted; over budget they are all taken back and measured again one
  /// by one, exactly. Cost per candidate: one block, plus a few passes per width.
  kLocal,
};
std::string candidate_measurement_name(CandidateMeasurement m);
/// "exact" or "local"; throws gradq::Error naming both otherwise.
CandidateMeasurement parse_candidate_measurement(const std::string& name);

/// How the plan is found (PrecisionOptimizer::search and ::allocate).
enum class SearchStrategy {
  /// The seed design: widths lowered one pass at a time with group-size search and rollback.
  kProgressive,
  /// Every weight measured alone at every candidate, the allocator (allocator.h) picks the mix, whole
  /// passes correct its target for the non-additivity, then downgrades measured exactly fill what is
  /// left of the budget.
  kAllocate,
};
std::string search_strategy_name(SearchStrategy s);
/// "progressive" or "allocate"; throws gradq::Error naming both otherwise.
SearchStrategy parse_search_strategy(const std::string& name);

/// `budget.safety`, or the default of `strategy`. The progressive search decides each step on the
/// calibration windows: 1.5 gave it fewer bits than 2 and 1.25 (docs/BENCHMARKS.md, "The safety
/// factor"). The allocator's plan is repaired both ways on held-out text, and its calibration
/// windows measure like held-out ones since GPTQ is fitted on windows of its own: 1.0 starts it
/// near the limit, for the same plan or one within 0.06 bits per weight in fewer held-out passes
/// (docs/BENCHMARKS.md, "Fit windows").
double safety_used(const Budget& budget, SearchStrategy strategy);

/// What the allocator's curves pass measures (SearchResult::curves and ::ppl_per_kl), shared by the
/// budget points of a sweep.
struct MeasuredCurves {
  ErrorCurves curves;
  std::vector<double> ppl_per_kl;
};

struct SearchOptions {
  /// The default is the one that measured better at every budget of the default sweep (+2%, +5%,
  /// +10% on stories260K, held-out text; docs/BENCHMARKS.md, "The budget allocator").
  SearchStrategy strategy = SearchStrategy::kAllocate;
  /// Widths tried, high to low. 6 and 5 bits give tight budgets the step between 8.25-bit and
  /// 5.25-bit weights: on stories260K the allocator's +1% plan stores 5.48 bits per weight with them
  /// against 6.40 without, +2% 5.14 against 5.61 (docs/BENCHMARKS.md, "5- and 6-bit formats"). 3
  /// bits is in the default since the calibration windows became 16 (docs/BENCHMARKS.md, "3-bit
  /// candidates and 16 calibration windows").
  std::vector<int> bits = {8, 6, 5, 4, 3, 2};
  std::vector<int64_t> group_sizes = {128, 64, 32, 16};  ///< cheapest first
  /// Side information of the candidates (quant_spec.h): "asym" (zero points at the code width, fp16
  /// scales), "z8" (8-bit zero points), "s" (symmetric), "k6" / "k8" (sub-scales of a fp16
  /// super-scale). Every group size in every encoding is a candidate; k6/k8 ones are not tried by
  /// trained rounding, which needs a scale per group. The default is what the CUDA kernels read
  /// (they read no k6/k8): with symmetric grids beside zero points the stories260K +5% plan stores
  /// 4.323 bits against 4.459 with zero points alone, though 0.10-0.26 more at +1-2% (docs/BENCHMARKS.md,
  /// "Candidates screened by GPTQ's own error, and symmetric grids by default").
  std::vector<std::string> encodings = {"asym", "s"};
  bool allow_prune = false;                            ///< try removing a weight after its lowest width
  /// Allocation: measure only the GPTQ candidates on the lower hull of (bytes, GPTQ's output error)
  /// of their weight (precision_allocate.cpp); false: every candidate.
  bool screen_candidates = true;
  /// Rounding of the ordinary candidates (and of --uniform formats). GPTQ: fewer bits than clipping
  /// at every budget measured, and the best uniform format (docs/BENCHMARKS.md).
  RoundingMethod method = RoundingMethod::kGptq;
  bool trained_fallback = true;
  RoundingOptions rounding;                            ///< options of the rounding methods
  /// Candidates shared with other searches of the same model, statistics and options (null: the
  /// search keeps its own, of candidate_cache_bytes). Not thread-safe: one search at a time.
  std::shared_ptr<CandidateCache> shared_candidates;
  /// Allocation: error curves shared with other allocations of the same model, statistics,
  /// calibration windows and options (a sweep's budget points), which differ only in their budget:
  /// the first measures them, the rest reuse them. Null: measured for this search alone.
  std::shared_ptr<MeasuredCurves> shared_curves;
  /// Allocation under a perplexity-only budget: price each candidate at its KL times its block's
  /// ln-perplexity per KL (SearchResult::ppl_per_kl), so that the allocator spends the budget where
  /// perplexity, not KL, grows least; false: at its KL.
  bool perplexity_prices = true;
  /// With perplexity prices: the weight of each candidate's first-order perplexity change in its
  /// price, beside its KL times its block's perplexity per KL. A perplexity change is the KL (second
  /// order at the reference) plus a first-order part that KL does not see: <g, W_q - W>, g the
  /// gradient of the fit windows' mean NLL with respect to the weight (taken block by block as the
  /// curves reach each block). The block's perplexity per KL is then measured net of it, and a price
  /// keeps at least kFirstOrderFloor of its second-order part. Below 1, and floored, because a
  /// gradient of a few dozen windows is partly their own noise and the allocator picks the
  /// candidates whose terms are most negative (docs/BENCHMARKS.md, "First-order perplexity prices").
  /// 0: none (no gradients). Needs a model split into blocks.
  double first_order_weight = 0.5;
  /// The least share of a candidate's second-order price that its first-order term may leave.
  static constexpr double kFirstOrderFloor = 0.5;
  /// Byte budget of the search's own candidate cache in memory (optimizer/candidate_cache.h).
  int64_t candidate_cache_bytes = CandidateCache::kDefaultMaxBytes;
  /// Where that cache puts what memory drops (max_bytes 0: nowhere; dropped candidates are quantized
  /// again).
  CandidateSpillOptions candidate_spill{"", CandidateCache::kDefaultSpillBytes};
  /// The windows the rounding is fitted on (GPTQ's X^T X collected per block, and GradualQuantizer's
  /// input statistics) and the first-order terms' gradients are taken on (first_order_weight); none
  /// (size 0): the search's calibration windows. Windows of their own keep the calibration windows an
  /// honest judge of the candidates: fitted and judged on the same 8 windows, GPTQ's plan measured
  /// KL 0.032 there and 0.080 on held-out text (docs/BENCHMARKS.md, "Fit windows").
  Windows fit;
  /// `fit`'s inputs, or `calibration` (the search's calibration windows' inputs) when there are none.
  const at::Tensor& fit_inputs_or(const at::Tensor& calibration) const {
    return fit.size() > 0 ? fit.inputs : calibration;
  }
  /// With stages (else whole passes). Unset: the strategy's own (measurement_used()). The progressive
  /// search measures exactly: on stories260K at +5% perplexity, local gives it 5.63 bits per weight
  /// against exact's 4.83 (each step is decided on a prediction; docs/BENCHMARKS.md). The allocator's
  /// curves are local: only predictions either way, its decisions are whole-plan measurements, and
  /// local curves cost one block per candidate instead of the blocks after it, for the same plan
  /// within 0.003 bits per weight on stories260K (docs/BENCHMARKS.md, "Cost against depth").
  std::optional<CandidateMeasurement> measurement;
  /// `measurement`, or the default of `strategy`.
  CandidateMeasurement measurement_used() const;
  /// Local measurement: KL per unit of block output error by block position (an analysis's
  /// local_factors). Empty, or NaN for a block: calibrated on the block's first candidate, which is
  /// then measured exactly.
  std::vector<double> local_factors;
  /// Local measurement: unconfirmed changes are confirmed once their predicted KL reaches this share
  /// of the KL headroom left at the last confirmation.
  double confirm_share = 0.5;
  /// Local measurement: a candidate predicted over the limits but within these multiples of them is
  /// measured exactly before it is rejected. KL predictions were within about 20% of the confirmed
  /// KL (docs/BENCHMARKS.md); perplexity, predicted from KL, moves much further apart.
  double exact_band_kl = 1.25;
  double exact_band_ppl = 2.0;
  /// Allocation: whole-model passes spent finding the largest predicted-KL target whose plan meets
  /// the budget, and groups of downgrades that may fail (in all) before verify_and_repair stops. 16:
  /// on stories260K at +5% the same plan as never stopping within 0.006 bits per weight, in 27 held-out
  /// passes instead of 34 (8: 0.06 bits more, 14 passes; docs/BENCHMARKS.md, "Fit windows").
  int64_t allocation_passes = 10;
  int64_t repair_failures = 16;
  /// Verify and repair keeps a downgrade only when the budget still holds this many standard errors
  /// (of the held-out estimates, paired with the reference) above the measured values: every kept
  /// downgrade is chosen by the windows that judge it, so a plan taken to the exact limit is over
  /// it on other text (docs/BENCHMARKS.md, "The budget allocator"). 0 takes it to the limit.
  double repair_confidence = 1.0;
  /// Throws gradq::Error for unsupported widths, group sizes or encodings, or an unordered list.
  void validate() const;
  /// The candidates at `bits` for a [out, in] weight: every group size in every encoding, cheapest
  /// first (stable: ties keep the order of group_sizes, then encodings); of group sizes that each
  /// make one group of the whole row (the same stored values), only the first.
  std::vector<QuantSpec> candidates(int bits, int64_t out_features, int64_t in_features) const;
};

/// The spec of `bits`, `group_size` and a SearchOptions encoding; throws gradq::Error naming the
/// encodings for an unknown one.
QuantSpec search_spec(int bits, int64_t group_size, const std::string& encoding);


/// One change the held-out validation measured (GradualQuantizer; PrecisionOptimizer::verify_and_repair).
struct ValidationStep {
  std::string weight, from, to;
  double kl_before = 0, kl_after = 0;  ///< held-out KL
  double extra_bits = 0;               ///< storage bits added (negative: a downgrade)
  int64_t candidates = 0;              ///< changes measured to choose this one
  bool kept = true;                    ///< false: a downgrade that broke the budget, undone
  /// verify_and_repair's held-out pass that measured it (from 1; 0 elsewhere); changes measured
  /// together share it, and their kl_after is the KL of all of them.
  int64_t pass = 0;
};

/// One measured candidate of the search.
struct SearchStep {
  std::string weight;
  std::string from, to;  ///< spec names
  RoundingMethod method = RoundingMethod::kRtn;
  bool accepted = false;
  double kl_before = 0;     ///< model KL on the calibration windows before the step
  double kl = 0;            ///< model KL on the calibration windows with the candidate
  double ppl_increase = 0;  ///< relative
  double bits_per_weight = 0;  ///< of the whole set of quantizable weights after the step (if accepted)
  bool predicted = false;   ///< kl and ppl_increase are local predictions (CandidateMeasurement::kLocal)
  bool taken_back = false;  ///< accepted on a prediction, taken back when the confirmation failed
  double seconds = 0;       ///< quantizing (or training) + measuring
};

/// One exact measurement of the changes accepted on predictions since the previous one.
struct Confirmation {
  int64_t changes = 0;
  double kl_before = 0;      ///< exact KL at the previous confirmation
  double predicted_kl = 0;   ///< what the predictions added up to
  double measured_kl = 0;    ///< exact
  bool kept = false;         ///< within budget; otherwise the changes were taken back
};

struct SearchProgress {
  int64_t unit = 0, units = 0;  ///< units visited so far
  int64_t passes = 0;
  double seconds = 0;
  const SearchStep* last = nullptr;  ///< null while the allocator measures curves or whole plans
  std::string detail;                ///< what the allocator did, when `last` is null
};

struct SearchResult {
  Plan plan;
  QuantizedWeights weights;  ///< the plan's quantized tensors (as measured, trained codes included)
  std::vector<SearchStep> steps;
  /// Progressive search only: per weight, each accepted state, oldest first (verify_and_repair moves
  /// along them). The allocator keeps none: its repair quantizes its hull points again.
  std::map<std::string, std::vector<QuantizedTensor>> history;
  EvalResult calibration;    ///< the final state on the calibration windows
  bool memory_target_met = false;
  /// "local" or "exact" (CandidateMeasurement); otherwise "whole" and why the model has no stages.
  std::string measurement;
  /// Local measurement: each confirmation. Allocation: each whole-plan measurement of the target
  /// search (predicted = sum of the curves' KL over the all-fp16 model's).
  std::vector<Confirmation> confirmations;
  ErrorCurves curves;  ///< allocation only: KL added by each weight alone at each candidate
  /// Allocation only, by block: ln(PPL / PPL_start) per nat of KL added, from the measurement that
  /// calibrates the block's local factor, within [0.25, 4]; 1 where none ran (exact curves, factors
  /// given in SearchOptions::local_factors, no KL added).
  std::vector<double> ppl_per_kl;
  /// The chosen point of every weight, where verify_and_repair moves. Allocation: on the hulls; their
  /// points' `kl` are the prices the allocator compared: the curves' KL, times the block's ppl_per_kl
  /// under a perplexity-only budget. Progressive search: on each weight's `history`, cheapest first,
  /// the last state chosen; a state's `kl` is the calibration KL the steps down to it added.
  Allocation allocation;
  int64_t local_measurements = 0;           ///< candidates measured on their block alone
  /// Blocks computed by the search's passes, and what whole passes would have computed.
  int64_t blocks_run = 0, blocks_whole = 0;
  int64_t passes = 0;  ///< exact or whole evaluations of the calibration windows
  /// Candidates quantized, and read back from the candidate cache's spill file instead.
  int64_t candidates_quantized = 0, candidates_read_back = 0;
  /// Allocation only: candidates not measured, off the hull of GPTQ's own error (screen_candidates).
  int64_t candidates_screened = 0;
  double seconds = 0;
};

/// The state every weight starts from (the memory reference, 16 bits a weight): the model's own values
/// for a bf16 model (bf16), fp16 otherwise (exact for an fp16 model, rounded for an fp32 one). A weight
/// stored in that type starts as loaded: the search holds no copy of it (PrecisionOptimizer::hold).
QuantSpec search_start_spec(at::ScalarType model_dtype);

class PrecisionOptimizer {
 public:
  /// `evaluator`: calibration windows with the full-precision reference set. `stats`: input
  /// statistics of the quantizable weights, captured over the evaluator's windows and batches. The
  /// X^T X that GPTQ and trained rounding need may be left out of it when the model splits into
  /// stages and every quantizable weight is in a block: it is then collected one block at a time
  /// (input_stats()). `model` must hold its full-precision weights; it is changed during search()
  /// and restored to them at the end.
  PrecisionOptimizer(QuantizableModel& model, const GradualEvaluator& evaluator, Budget budget, SearchOptions options,
                     PrecisionPolicy policy, const std::map<std::string, InputStats>& stats);

  /// Runs the search over `order` (weight names, least important first).
  SearchResult search(const std::vector<std::string>& order,
                      const std::function<void(const SearchProgress&)>& on_progress = {});

  /// SearchStrategy::kAllocate (see there; optimizer/precision_allocate.cpp). The plan meets the
  /// budget / safety on the calibration windows, as search()'s does.
  SearchResult allocate(const std::function<void(const SearchProgress&)>& on_progress = {});

  /// Verify and repair, both ways, of an allocate() or search() result on `evaluator` (held-out
  /// windows with their reference) against the full budget: while over it, the upgrades (next hull
  /// points, or the progressive search's previous states) with the most predicted KL per byte are
  /// measured and kept; then, while within it, downgrades with the least predicted KL per byte saved
  /// (for the progressive search only back down what the upgrades took) are measured and kept when
  /// the budget still holds
  /// (SearchOptions::repair_confidence standard errors above the measurement), until
  /// SearchOptions::repair_failures groups of downgrades have failed. Each held-out pass is a whole
  /// model, so changes are measured in passes of 1, 2, 4, ... while they succeed (upgrades: while the
  /// plan is still over), halving after a failed group: the passes grow with the log of the changes,
  /// not with the changes. Not every downgrade is tried: past repair_failures failures the rest are
  /// expected to fail too, or to pass by the noise of the held-out windows.
  /// `searched`'s plan, weights and allocation become the repaired ones; `measured` is set to the
  /// final plan's result. Returns every change measured, in order.
  std::vector<ValidationStep> verify_and_repair(SearchResult& searched, const GradualEvaluator& evaluator,
                                                EvalResult& measured,
                                                const std::function<void(const ValidationStep&)>& on_step = {});

 private:
  /// Quantized candidate of (weight, spec, method), from the cache or computed.
  QuantizedTensor candidate(const std::string& name, const QuantSpec& spec, RoundingMethod method);
  /// Drops (weight, spec, method)'s candidate from the cache.
  void forget_candidate(const std::string& name, const QuantSpec& spec, RoundingMethod method);
  /// Puts `q` into the model as `name`'s weight. The start state of a weight stored in start_'s type
  /// is the loaded weight: restored instead of set, so the search holds no copy of it.
  void hold(const std::string& name, const QuantizedTensor& q);
  /// The input statistics of a weight, with X^T X when `with_xtx`: the given ones, or else those of
  /// its whole block collected from the full-precision inputs of that block on the fit windows (a
  /// stream carried forward through the blocks, their weights briefly restored; an earlier block
  /// than the stream's starts it again), kept until another block's are needed. Null when there
  /// are none.
  const InputStats* input_stats(const std::string& name, bool with_xtx);
  /// GPTQ's factor of `name`'s X^T X (gptq_factor), made at the weight's first GPTQ candidate and
  /// kept with its block's statistics, so that its other candidates skip the factorisations; the
  /// weights that share the X^T X (one input) share the factor. The factor takes over the block
  /// statistics' X^T X (the same size; GPTQ needs nothing else of it), which input_stats() collects
  /// again if asked. Null where the factor is not kept: statistics given up front (not this
  /// optimizer's to release), or a search whose trained rounding needs X^T X itself (--method
  /// trained, the progressive search's trained fallback).
  const GptqFactor* gptq_factor_of(const std::string& name);
  /// Lets go of `name`'s X^T X and GPTQ factor, which input_stats() and gptq_factor_of() collect and
  /// make again if asked (the allocator, once the weight's curve is measured: one weight's at a time
  /// rather than the whole block's).
  void release_fit_statistics(const std::string& name);
  /// Lets go of the stream of full-precision block inputs and every block's statistics (the
  /// allocator, once every curve is measured: its whole-plan passes read the candidates back; a
  /// candidate quantized again restarts the stream from the embedding).
  void release_fit_inputs();
  /// The first stage a weight's value reaches: its block, the head (num_blocks()), or -1 (an
  /// embedding: everything).
  int64_t first_stage(const std::string& name) const;
  /// The calibration windows evaluated with stages `from`.. rerun from `cache` (a whole pass when it
  /// is null), counted into `result`; `trials`, when given, receives the states the run passed
  /// through, for BlockInputCache::commit when the measured change is kept (a second copy of the
  /// cache's states after `from`: the allocator, which never commits, passes none).
  EvalResult evaluate_from(BlockInputCache* cache, int64_t from, std::vector<BlockInputCache::Trial>* trials,
                           SearchResult& result) const;
  /// Block b's output error on the calibration windows with the current weights against `cache`'s
  /// (BlockInputCache::local_error, a mean per scored token), counted into `result`.
  double block_error(const BlockInputCache& cache, int64_t b, SearchResult& result) const;

  QuantizableModel& model_;
  const GradualEvaluator& evaluator_;
  Budget budget_;
  SearchOptions options_;
  PrecisionPolicy policy_;
  const std::map<std::string, InputStats>& stats_;
  double safety_ = 1;  ///< safety_used(budget_, the strategy of the search running)
  /// Whether X^T X is collected one block at a time, from original_inputs_ (started when first needed).
  bool collects_xtx_per_block_ = false;
  std::unique_ptr<BlockInputStream> original_inputs_;  ///< the fit windows through the full-precision blocks
  /// allocate()'s cache of block inputs while its curves are measured, when the fit windows are the
  /// calibration windows: it holds the states original_inputs_ would compute (the blocks it has
  /// moved past hold their loaded weights), so X^T X is collected from it instead of from a second
  /// copy of the same states.
  const BlockInputCache* loaded_inputs_ = nullptr;
  int64_t block_stats_of_ = -1;                      ///< the block block_stats_ describes
  std::map<std::string, InputStats> block_stats_;  ///< with X^T X, of one block
  /// Of block_stats_of_'s weights (gptq_factor_of); weights with one input (q, k and v) share one.
  std::map<std::string, std::shared_ptr<const GptqFactor>> gptq_factors_;
  bool keeps_gptq_factors_ = false;  ///< whether gptq_factor_of keeps factors
  std::shared_ptr<CandidateCache> cache_;
  int64_t candidates_quantized_ = 0, candidates_read_back_ = 0;  // by candidate(), for SearchResult
  const QuantSpec start_ = search_start_spec(model_.dtype());
  std::set<std::string> start_is_loaded_;  ///< weights stored in start_'s type: their start is the loaded value
};

/// Whether a search of `model` collects X^T X one block at a time (PrecisionOptimizer) instead of
/// needing it for every weight up front: the model splits into stages and every quantizable
/// weight is inside a block.
bool collects_xtx_per_block(const QuantizableModel& model);

}  // namespace gradq
