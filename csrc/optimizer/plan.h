#pragma once
// A quantization plan: the format and rounding method of every quantized weight. The search
// produces one, `--plan plan.json` re-applies one without searching, and export consumes the
// weights that apply_plan() makes from it.

#include <cmath>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "eval/evaluator.h"
#include "model/quantizable_model.h"
#include "quant/quantized_tensor.h"

namespace gradq {

struct PlanEntry {
  std::string name;  ///< weight name (QuantizableModel::weights())
  QuantSpec spec;
  RoundingMethod method = RoundingMethod::kRtn;
  double measured_kl = std::nan("");  ///< KL of the model when this step was taken (search only)
};

struct Plan {
  std::vector<PlanEntry> entries;  ///< in the model's weight order

  /// JSON text: {"format": "gradq-plan", "version": 1, "weights": [{"name", "spec", "method", "kl"}]}.
  std::string to_json() const;
  /// Parses to_json() output; throws gradq::Error naming the field on malformed input.
  static Plan from_json(const std::string& text);
  void save(const std::string& path) const;
  static Plan load(const std::string& path);
};

/// Every quantizable weight of `model` at `spec` with `method`.
Plan uniform_plan(const QuantizableModel& model, const QuantSpec& spec, RoundingMethod method);

/// `w` (the full-precision weight named `name`, logical [out, in]) in `spec` with `method`
/// (quantize_tensor). `stats`: the weight's input statistics (default-constructed: none); kClip
/// weights its search by stats.sq_mean() (unweighted without), kTrained and kGptq need stats.xtx and
/// throw gradq::Error naming the weight without it. Moved in, X^T X is freed as early as GPTQ allows.
QuantizedTensor quantize_weight(const at::Tensor& w, const std::string& name, const QuantSpec& spec,
                                RoundingMethod method, InputStats stats, const RoundingOptions& rounding = {});

/// quantize_weight for every entry of `plan` from `model`'s current weights, with the statistics of
/// `stats` (by weight name).
/// Throws gradq::Error when a name is not a matrix weight of the model.
QuantizedWeights apply_plan(const QuantizableModel& model, const Plan& plan,
                            const std::map<std::string, InputStats>& stats = {}, const RoundingOptions& rounding = {});

/// True when `model` splits into stages and every entry of `plan` names a quantizable weight of a
/// block: then apply_plan_by_block can collect the statistics one block at a time.
bool plan_in_blocks(const QuantizableModel& model, const Plan& plan);

/// apply_plan with each block's input statistics (X^T X included) collected from the states of the
/// calibration windows `inputs` ([N, T], `batch` rows at a time) entering that block, one block's at
/// a time, instead of every weight's up front: X^T X is [in, in] float64 per weight, 10 GB for a
/// model of TinyLlama-1.1B's shapes against 0.45 GB for one of its blocks. The same weights as
/// apply_plan(model, plan, model.capture_input_stats(inputs, batch, true), rounding) (the block
/// capture equals the whole one). Costs two passes (the states, then each block once). Needs
/// plan_in_blocks and the full-precision weights.
/// `sequential` (GPTQ's order): each block is fitted on the states that the earlier blocks, already
/// quantized, hand on, rather than on the full-precision model's, so that a block's rounding
/// corrects for the error that reaches it. The quantized weights are set only while their block
/// runs; the model is left with its originals (also when it throws).
/// `on_block(done, blocks)` is called after each block (progress: a block of a 1B model takes
/// minutes on a CPU).
using BlockProgress = std::function<void(int64_t done, int64_t blocks)>;
QuantizedWeights apply_plan_by_block(QuantizableModel& model, const Plan& plan, const at::Tensor& inputs, int64_t batch,
                                     const RoundingOptions& rounding = {}, bool sequential = false,
                                     const BlockProgress& on_block = {});

/// `evaluator`'s result for `model` with `weights` in place of their originals, run one block at a
/// time over all of the evaluator's windows: a block's weights are set only while that block runs,
/// then restored, so the model never holds more than one block's new values beside its originals
/// (setting every weight for a whole pass holds two copies of the model's weights). The same numbers
/// as set-all-then-evaluate (the stages compute what the forward does, bit for bit; tested). Weights
/// outside the blocks (an embedding, the head) are set for the whole pass; a model without stages is
/// evaluated whole. Memory: the windows' states at one boundary (windows x ctx x width). `weights`
/// must hold their originals before; they hold them again after, also when this throws.
/// `on_block(done, blocks)` is called after each block.
EvalResult evaluate_by_block(QuantizableModel& model, const QuantizedWeights& weights,
                             const GradualEvaluator& evaluator, const BlockProgress& on_block = {});

/// True when some entry's method needs activation statistics (kClip, kTrained, kGptq); `with_xtx` is
/// set when one needs X^T X (kTrained, kGptq).
bool plan_needs_stats(const Plan& plan, bool* with_xtx = nullptr);

/// Storage accounting of a plan on a model: bytes of the planned weights before (as fp32 and as
/// fp16) and after, and of the whole set of quantizable weights.
struct PlanSize {
  int64_t weights = 0;          ///< parameters in the quantizable weights
  int64_t fp32_bytes = 0;       ///< their size in fp32
  int64_t fp16_bytes = 0;       ///< their size in fp16 (the reference for memory reduction)
  int64_t quantized_bytes = 0;  ///< their size as planned (unplanned weights counted at fp16)
  double bits_per_weight() const { return weights ? 8.0 * quantized_bytes / weights : 0.0; }
};
/// Counts every quantizable weight and every other matrix weight `plan` names.
PlanSize plan_size(const QuantizableModel& model, const Plan& plan);

/// The quantizable weights of `model` that `plan` does not name: they stay in floating point.
std::vector<std::string> weights_outside_plan(const QuantizableModel& model, const Plan& plan);

}  // namespace gradq
