#pragma once
// ImportanceAnalyzer: which layers and blocks of a model can take aggressive quantization.
//
// For every unit (importance_units(): each quantizable weight as a layer, each block) it runs the
// probes of probes.h, one pass over the calibration windows each:
//   noise, RTN at 8/4/2 bits, disable, upgrade 4 -> 8 bits (plus one all-4-bit baseline pass)
// and the static signals (weight magnitude, activation second moment, gradient magnitude, Fisher
// |grad x 4-bit error|) from one capture and one forward+backward pass. Each probe value ("signal",
// importance_config.h) is normalized over the units of its kind and combined with the configured
// weights into a score; units are ranked within their kind (rank 1 = most important).
//
// Stability: every measurement is kept per calibration subset (ProbeEvaluator), the score is
// recomputed from each subset's values alone, and the pairwise Spearman correlations of the K
// subset scorings give the verdict (rank_stability). The verdict is the layers' (the units a
// mixed-precision search assigns); the blocks' is reported beside it.
//
// Passes: 1 reference + 1 baseline + 6 per unit (+ 1 capture and 1 gradient pass for the static
// signals). The model's weights are bit-identical after run() (every probe restores what it changed).
//
// Measurement (AnalyzerOptions::measurement; ProbeEvaluator): when the model splits into stages the
// reference pass caches every block's input, and a probe of a unit in block b is measured
//   exact   from block b's cached input (the same KL as a whole pass, about (L - b) / L of its cost), or
//   local   (the default) by block b alone: its output error times a factor calibrated once per block
//           against an exact measurement of the block at RTN 4 bits (which also is that block unit's
//           rtn_int4 probe). The upgrade probe is then the block's local prediction subtracted from
//           the baseline. Cost per unit no longer grows with the model's depth.
// Units outside every block, the baseline and the static signals are measured on the whole model,
// and so is everything when the graph cannot be split (the reason is reported).

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "eval/evaluator.h"
#include "importance/importance_config.h"
#include "importance/probe_evaluator.h"
#include "importance/probes.h"
#include "importance/stability.h"
#include "model/quantizable_model.h"

namespace gradq {

/// The RTN probe levels, in the order they are measured and reported.
extern const std::vector<int> kRtnProbeBits;  // {8, 4, 2}

struct AnalysisProgress {
  int64_t done = 0, total = 0;  ///< passes over the calibration windows
  double seconds = 0;           ///< since run() started
  std::string what;             ///< the pass just finished: "rtn int4 layers.0.attention.wq.weight"
};

struct AnalyzerOptions {
  double noise_alpha = 0.1;    ///< noise sigma = alpha * std(W)
  uint64_t seed = 0;           ///< noise seed (probes.h: noise_seed)
  int64_t group_size = 128;    ///< group size of every RTN, baseline, upgrade and Fisher quantization
  int64_t subsets = 4;         ///< K calibration subsets for the stability analysis
  int upgrade_from_bits = 4;   ///< baseline of the upgrade probe (and the Fisher error's bit width)
  int upgrade_to_bits = 8;
  bool static_signals = true;  ///< false skips the capture and gradient passes (their signals read 0)
  /// Windows per forward pass: 1, as the quantizer's (EvaluatorOptions::batch): the probes hold a
  /// batch's [batch x ctx x vocab] float32 logits several times over, 2.3 GB at 16 windows of 128
  /// tokens and a 32,000-token vocabulary (0.6 GB at 1, +12% CPU); on stories260K 1 costs 0.6 CPU s
  /// (docs/BENCHMARKS.md).
  int64_t batch = EvaluatorOptions{}.batch;
  ReferenceStorage reference_storage;  ///< how the probes' reference is kept (evaluator.h)
  Measurement measurement = Measurement::kLocal;  ///< how the probes of units in blocks are measured
  ImportanceConfig config;
  /// Called after every pass with the progress so far (on the calling thread).
  std::function<void(const AnalysisProgress&)> on_progress;
};

/// One unit's measurements and score.
struct UnitImportance {
  ImportanceUnit unit;
  /// Raw probe measurements, keys "noise", "rtn_int8", "rtn_int4", "rtn_int2", "disable", "upgrade"
  /// ("upgrade": the all-4-bit model with this unit at 8 bits).
  std::map<std::string, ProbeMeasure> probes;
  /// Every signal of kScoreSignals: {overall, subset 0, ..., subset K-1}. "upgrade" is the KL
  /// recovered, baseline.kl - probes["upgrade"].kl (may be slightly negative).
  std::map<std::string, std::vector<double>> signals;
  std::map<std::string, double> normalized;  ///< overall signals normalized over the units of this kind
  double score = 0;                          ///< combined score in [0, 1]
  std::vector<double> subset_scores;         ///< the score from each subset's values alone
  int64_t rank = 0;                          ///< 1 = most important among units of its kind
};

struct AnalysisTiming {
  int64_t forward_passes = 0;   ///< passes over the calibration windows (reference + probes)
  int64_t gradient_passes = 0;  ///< forward+backward passes (static signals)
  int64_t capture_passes = 0;   ///< activation-capture passes (static signals)
  double seconds = 0;           ///< all of run()
  double probe_seconds = 0;     ///< the forward passes, KL bookkeeping included
  double forward_seconds = 0;   ///< of which the model's forward calls
  double static_seconds = 0;    ///< capture + gradient passes
  double seconds_per_pass() const { return forward_passes ? probe_seconds / static_cast<double>(forward_passes) : 0; }
};

struct ImportanceAnalysis {
  // Settings.
  AnalyzerOptions options;  ///< on_progress is not saved
  int64_t windows = 0, ctx = 0, scored_tokens = 0;
  std::map<std::string, std::string> inputs;  ///< set by the caller: "model", "tokenizer" and "text" or "tokens", "config"
  // Results.
  double reference_ppl = 0;
  ProbeMeasure baseline;  ///< every quantizable weight at upgrade_from_bits
  std::vector<UnitImportance> units;  ///< layers in model order, then blocks
  StabilityReport layer_stability, block_stability;
  std::string verdict;    ///< layer_stability's (blocks' when there are fewer than 2 layers)
  std::optional<Distribution> layer_distribution, block_distribution;  ///< of the combined scores
  AnalysisTiming timing;
  /// How probes were measured: options.measurement, or "whole" with the reason the model has no stages.
  std::string measurement;
  std::vector<double> local_factors;  ///< per block, local measurement only

  /// Units of one kind in rank order (most important first).
  std::vector<const UnitImportance*> ranked(UnitKind kind) const;
  /// A unit by name; throws when absent.
  const UnitImportance& unit(const std::string& name) const;
};

class ImportanceAnalyzer {
 public:
  /// `model` is probed in place and restored; `calibration`: the windows every probe runs on.
  /// Throws gradq::Error for invalid options (bad group size, bits, alpha, fewer windows than subsets).
  ImportanceAnalyzer(QuantizableModel& model, Windows calibration, AnalyzerOptions options = {});

  /// Passes run() will make over the calibration windows (forward, gradient and capture passes).
  int64_t planned_passes() const;
  /// Probes run() will make (one per unit and probe kind, plus the baseline).
  int64_t planned_probes() const;
  const std::vector<ImportanceUnit>& units() const { return units_; }

  ImportanceAnalysis run();

 private:
  QuantizableModel& model_;
  Windows calibration_;
  AnalyzerOptions options_;
  std::vector<ImportanceUnit> units_;
};

/// Normalizes, combines, ranks and scores the stability and distribution of `analysis.units`
/// from their `signals` (what run() does after measuring; exposed so a consumer can rescore
/// a loaded analysis with another config).
void score_analysis(ImportanceAnalysis& analysis, const ImportanceConfig& config);

/// JSON text of an analysis (schema: docs in configs/README.md and the analyzer's JSON writer).
std::string analysis_json(const ImportanceAnalysis& analysis);
/// Writes analysis_json atomically.
void save_analysis(const std::string& path, const ImportanceAnalysis& analysis);
/// Parses what analysis_json wrote; throws gradq::Error naming the path and the missing/bad field.
ImportanceAnalysis load_analysis(const std::string& path);
ImportanceAnalysis analysis_from_json(const std::string& json_text);

/// The ranked tables (layers, then blocks), stability and distribution, as gradq analyze prints them.
std::string format_analysis_table(const ImportanceAnalysis& analysis);

}  // namespace gradq
