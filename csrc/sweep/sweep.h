#pragma once
// Perplexity-budget sweeps: gradq quantize over a list of budgets, plus uniform baselines, with
// everything the points share measured once. What `gradq sweep` runs nightly.
//
// A sweep lives in a directory:
//   shared.json          the configuration (fingerprints of model, windows and options), the search
//                        order (least important first) and the time the shared work took
//   analysis.json        the importance analysis the order came from (when the sweep ran one)
//   points/<id>.json     one finished point each, written atomically when the point ends
//   points/<id>.plan.json  its plan (`gradq quantize --plan` re-applies it)
//   sweep.json/.csv/.md, pareto.svg   the report, written once every point is in the directory
// A re-run with the same configuration skips the points already there (resume), and a run given a
// shard (i of n) takes only its share of the points; `merge_sweeps` gathers shard directories.
// Each point is computed from the shared order and references alone, so the points are the same
// whether they ran in one process, were resumed, or came from different shards.

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "model/causal_lm.h"
#include "orchestrator/gradual_quantizer.h"
#include "quant/quant_spec.h"

namespace gradq {

/// A point of the sweep: a perplexity budget for the search, or a uniform format (a baseline).
struct SweepPointSpec {
  std::string id;                 ///< "budget-0.05", "uniform-b4g128": file names and report keys
  std::optional<double> budget;   ///< relative perplexity increase allowed
  std::optional<QuantSpec> uniform;
  /// Budget points: searched with this strategy instead of the quantizer options' one, to compare
  /// the two ("budget-0.05-progressive"); none: the options' strategy ("budget-0.05").
  std::optional<SearchStrategy> search;
};

/// The points of `budgets` (ascending), the same budgets again for each of `compare_searches`, then
/// `baselines`, in report order; throws on duplicates or a budget outside (0, 10].
std::vector<SweepPointSpec> sweep_points(std::vector<double> budgets, const std::vector<QuantSpec>& baselines,
                                         const std::vector<SearchStrategy>& compare_searches = {});

/// Shard `index` of `count` (0-based): every count-th point starting at index.
struct Shard {
  int64_t index = 0, count = 1;
  /// Parses "i/n" with 1 <= i <= n (1-based, as schedulers number array jobs).
  static Shard parse(const std::string& text);
  bool owns(size_t point) const { return static_cast<int64_t>(point % count) == index; }
};

/// What one point measured (held-out numbers of the plan the point produced).
struct SweepPointResult {
  std::string id;
  std::string kind;                ///< "budget" or "uniform"
  std::optional<double> budget;    ///< kind "budget"
  std::string spec;                ///< kind "uniform": the format
  std::string search;              ///< kind "budget": the search strategy ("allocate", "progressive")
  bool met = true;                 ///< budget points: the plan meets the budget on held-out text
  std::vector<std::string> messages;
  double bits_per_weight = 0;      ///< over the quantizable weights, scales and zero points included
  int64_t quantized_bytes = 0, fp16_bytes = 0;
  double ppl = 0, reference_ppl = 0, ppl_increase = 0;
  double kl_mean = 0, kl_median = 0, kl_p99 = 0, kl_max = 0, same_top_rate = 0;
  int64_t passes = 0;              ///< forward passes the point itself ran
  double seconds = 0;
  int64_t tokens = 0;              ///< held-out tokens the point was evaluated on (0: not recorded)
};

struct SweepResult {
  std::string model_name;    ///< SweepOptions::model_name of the run that made the directory
  std::string config_json;   ///< shared.json's "config" (compact JSON text)
  std::string order_hash;    ///< fingerprint of the search order every budget point used
  double shared_seconds = 0; ///< reference + analysis, measured once for the whole sweep
  std::vector<SweepPointResult> points;  ///< in sweep order
  std::vector<std::string> missing;      ///< ids of points not finished yet (other shards, interrupted)
  bool complete() const { return missing.empty(); }
  /// Points on the quality/size frontier: no other point has fewer or equal bits and a lower or
  /// equal perplexity increase, one of them strictly.
  std::vector<bool> pareto() const;
};

struct SweepOptions {
  std::vector<SweepPointSpec> points;
  /// How the report and the Pareto plot name the model (the CLI: its path); not part of the
  /// configuration, so a resumed run may name it otherwise (the first name is kept).
  std::string model_name;
  Shard shard;
  /// Every point's quantizer options: budget.max_ppl_increase is set per point; a plan, dynamic
  /// policy or on_progress given here is refused. `order` or `analysis_path` replace the analysis.
  QuantizerOptions quantizer;
  /// Progress, as QuantizerOptions::on_progress; a point's phases are named "<id> (k/n) <phase>",
  /// and "sweep" reports finished points.
  std::function<void(const std::string& phase, int64_t done, int64_t total, const std::string& detail)> on_progress;
  /// Called after each point is written (tests interrupt a sweep from here).
  std::function<void(const SweepPointResult&)> on_point;
};

class SweepRunner {
 public:
  /// `model` is used in place and left with its original weights.
  SweepRunner(CausalLM& model, Windows calibration, Windows evaluation, SweepOptions options);
  /// Runs this shard's unfinished points into `dir` (created if needed) and returns every point the
  /// directory holds. Throws when `dir` holds a sweep of another configuration, naming what differs.
  SweepResult run(const std::string& dir);

 private:
  CausalLM& model_;
  Windows calibration_, evaluation_;
  SweepOptions options_;
};

/// Reads a sweep directory: the points of `points` found there (missing ones listed).
SweepResult load_sweep_dir(const std::string& dir, const std::vector<SweepPointSpec>& points);

/// Copies the points of shard directories into `out_dir` and returns the merged sweep. Throws when
/// the shards differ in configuration or search order, or when a point is in none of them.
SweepResult merge_sweeps(const std::vector<std::string>& shard_dirs, const std::string& out_dir);

/// Report files: sweep.json, sweep.csv, sweep.md and pareto.svg in `dir` (each atomically).
void write_sweep_report(const std::string& dir, const SweepResult& result);
std::string sweep_json(const SweepResult& result);
SweepResult sweep_from_json(const std::string& text);
std::string sweep_csv(const SweepResult& result);
std::string sweep_markdown(const SweepResult& result);
std::string pareto_svg(const SweepResult& result);

/// The regression gate: `current` against a previous sweep's sweep.json.
struct RegressionTolerance {
  double ppl = 0.005;   ///< relative: regressed when ppl > previous ppl * (1 + ppl)
  double bits = 0.01;   ///< absolute bits per weight
};
/// One line per regression, naming the point, what regressed and by how much; empty when none.
/// A point of `previous` that `current` lacks, or that met its budget and no longer does, regresses.
/// Throws when the two sweeps are of different models or windows (nothing to compare).
std::vector<std::string> find_regressions(const SweepResult& current, const SweepResult& previous,
                                          const RegressionTolerance& tolerance);

}  // namespace gradq
