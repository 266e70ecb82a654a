#pragma once
// The importance probes, each usable on its own. A unit is one quantizable matrix weight (a
// "layer") or one block (all quantizable weights of "layers.3", say). Every probe changes the
// unit's weights through QuantizableModel::set_weight inside a WeightScope, measures one pass over
// the calibration windows with a ProbeEvaluator, and puts the weights back bit-exactly.
//
//   probe_noise     W + N(0, (alpha * std(W))^2), seeded per weight (below)
//   probe_rtn       W -> fake_quantize(W, spec): round-to-nearest group quantization of the unit alone
//   probe_disable   a layer is pruned (W = 0); a block is removed from the residual stream: every
//                   matrix weight of the block (quantizable or not) and every parameter of it named
//                   "bias" are zeroed. In a pre-norm residual block (x + f(norm(x))) that makes f
//                   output 0, i.e. the block becomes the identity. Norm weights are left alone; in a
//                   post-norm block (norm(x + f(x))) the norm still acts, so "disable" is then not an
//                   identity but still removes the block's learned contribution.
//   probe_upgrade   all quantizable weights at `base` (4-bit), the unit at `upgraded` (8-bit); the
//                   importance is the KL it recovers, probe_baseline(...).kl - probe_upgrade(...).kl.
//
// Noise seeds: the weight named n gets the CPU generator seeded with splitmix64(seed ^ FNV-1a(n)), so
// the noise depends only on (seed, name): the same seed gives the same noise, in any probe order, and
// a block's noise is the sum of its layers' noises.
//
// Static signals (no probe pass, per quantizable weight; see StaticSignals) come from one activation
// capture pass and one forward+backward pass over the windows.

#include <ATen/ATen.h>

#include <list>
#include <map>
#include <string>
#include <vector>

#include "common/byte_lru.h"
#include "importance/probe_evaluator.h"
#include "model/quantizable_model.h"
#include "quant/quant_spec.h"

namespace gradq {

enum class UnitKind { kLayer, kBlock };
const char* unit_kind_name(UnitKind kind);

struct ImportanceUnit {
  UnitKind kind = UnitKind::kLayer;
  std::string name;                  ///< weight name ("layers.0.attention.wq.weight") or block ("layers.0")
  std::string block;                 ///< the block a layer belongs to (empty outside blocks); a block's own name
  int64_t block_index = -1;
  std::vector<std::string> weights;  ///< the quantizable weights the unit covers
  int64_t numel = 0;                 ///< elements of those weights
};

/// Every quantizable weight as a layer unit (QuantizableModel::weights() order), then every block.
std::vector<ImportanceUnit> importance_units(const QuantizableModel& model);

/// Seed of the noise for the weight `name` (see the header comment).
uint64_t noise_seed(uint64_t seed, const std::string& name);

/// The weights as they were before any probe (read from the model, their one owner), and their
/// fake-quantized versions. Those are kept for
/// reuse up to a byte budget, least recently used dropped first: probes go unit by unit, so a small
/// budget catches the reuse, and keeping every weight at every probed width would cost several
/// copies of the model (rounding a weight again costs far less than the pass it is probed with).
class WeightCache {
 public:
  static constexpr int64_t kDefaultMaxBytes = int64_t{256} << 20;
  /// Reads the originals from `model` (QuantizableModel::original_weight), which must outlive the cache.
  explicit WeightCache(const QuantizableModel& model, int64_t max_bytes = kDefaultMaxBytes);
  at::Tensor original(const std::string& name) const;
  /// fake_quantize(original(name), spec): from the cache, or computed and cached.
  at::Tensor fake_quant(const std::string& name, const QuantSpec& spec);
  /// Bytes of the fake-quantized weights held now (at most max_bytes, or one weight if larger).
  int64_t bytes() const { return quantized_.bytes(); }

 private:
  const QuantizableModel& model_;
  ByteLru<std::pair<std::string, std::string>, at::Tensor> quantized_;  // by weight and spec name
};

/// Changes weights and parameters of a model for the duration of one probe; the destructor (or
/// restore()) writes back the values saved on first change, bit for bit.
class WeightScope {
 public:
  explicit WeightScope(QuantizableModel& model) : model_(model) {}
  ~WeightScope();
  WeightScope(const WeightScope&) = delete;
  WeightScope& operator=(const WeightScope&) = delete;

  /// Sets a matrix weight (logical [out, in]) via QuantizableModel::set_weight.
  void set_weight(const std::string& name, const at::Tensor& value);
  /// Zeroes any parameter (a bias, say).
  void zero_parameter(const std::string& name);
  void restore();

 private:
  QuantizableModel& model_;
  std::map<std::string, at::Tensor> saved_weights_;  ///< logical layout; undefined: the model's original
  std::map<std::string, at::Tensor> saved_parameters_;
};

/// Where a probe is measured: the whole model, or exact/local at the unit's block (block position in
/// QuantizableModel::blocks(), -1 for whole). See ProbeEvaluator.
struct MeasureAt {
  Measurement how = Measurement::kWhole;
  int64_t block = -1;
};

/// Gaussian noise of alpha * std(W) on every weight of the unit.
ProbeMeasure probe_noise(QuantizableModel& model, const ProbeEvaluator& evaluator, const WeightCache& cache,
                         const ImportanceUnit& unit, double alpha, uint64_t seed, MeasureAt where = {});
/// The unit's weights round-to-nearest quantized with `spec` (an integer level, or prune).
ProbeMeasure probe_rtn(QuantizableModel& model, const ProbeEvaluator& evaluator, WeightCache& cache,
                       const ImportanceUnit& unit, const QuantSpec& spec, MeasureAt where = {});
/// The unit disabled (header comment).
ProbeMeasure probe_disable(QuantizableModel& model, const ProbeEvaluator& evaluator, const ImportanceUnit& unit,
                           MeasureAt where = {});
/// All quantizable weights at `base`: the baseline the upgrade probe recovers from.
ProbeMeasure probe_baseline(QuantizableModel& model, const ProbeEvaluator& evaluator, WeightCache& cache,
                            const QuantSpec& base);
/// All quantizable weights at `base` except the unit's, which are at `upgraded`. Measured locally
/// (where.how == kLocal) only the weights of block where.block change, and the result is the block's
/// local prediction for that state, not the whole model's KL (the analyzer turns it into one).
ProbeMeasure probe_upgrade(QuantizableModel& model, const ProbeEvaluator& evaluator, WeightCache& cache,
                           const ImportanceUnit& unit, const QuantSpec& base, const QuantSpec& upgraded,
                           MeasureAt where = {});
/// Calibrates local measurements of a block (ProbeEvaluator::set_local_factor): the block unit's
/// weights at `spec`, measured exactly and by the block's local error; factor = KL / error. Returns
/// the exact measurement (with its local_error), which is also the unit's RTN probe at `spec`.
ProbeMeasure calibrate_local(QuantizableModel& model, ProbeEvaluator& evaluator, WeightCache& cache,
                             const ImportanceUnit& block_unit, int64_t block, const QuantSpec& spec);

/// Static signals of one quantizable weight; `*_subsets` hold the same signal computed on each
/// calibration subset alone (weight magnitude does not depend on data).
struct WeightSignals {
  double weight_magnitude = 0;    ///< mean |W|
  double activation_sq_mean = 0;  ///< mean over input channels of E[x^2] (uncentered variance of the inputs)
  double gradient_magnitude = 0;  ///< mean |dL/dW|, L = mean NLL of the scored calibration tokens
  double fisher = 0;              ///< sum |dL/dW * (W - fake_quant(W, fisher_spec))|
  std::vector<double> activation_sq_mean_subsets, gradient_magnitude_subsets, fisher_subsets;
};

struct StaticSignals {
  std::map<std::string, WeightSignals> weights;  ///< by quantizable weight name
  double seconds = 0;
};

/// One activation-capture pass (QuantizableModel::capture_input_stats) and one forward+backward pass of the
/// LM loss over the evaluator's windows, subset by subset. The gradient of subset k is that of the
/// subset's mean NLL; the overall gradient is their token-weighted mean (= the gradient of the mean
/// NLL over all windows). Parameters get requires_grad only for the pass; flags and .grad are
/// restored afterwards, and no weight changes. Throws when called inside c10::InferenceMode.
StaticSignals static_signals(QuantizableModel& model, const ProbeEvaluator& evaluator, WeightCache& cache,
                             const QuantSpec& fisher_spec, int64_t batch);

/// A unit's static signals from its weights': numel-weighted means of the magnitudes and of the
/// activation second moment, the sum of the Fisher terms. Keys: kScoreSignals' static names; each
/// value is {overall, subset 0, ..., subset K-1}.
std::map<std::string, std::vector<double>> unit_static_signals(const StaticSignals& signals,
                                                               const QuantizableModel& model,
                                                               const ImportanceUnit& unit);

}  // namespace gradq
