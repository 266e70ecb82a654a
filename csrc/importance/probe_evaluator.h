#pragma once
// ProbeEvaluator: the one measurement every importance probe makes. A probe changes some weights,
// runs the calibration windows through the model once, and is judged by
//   KL(P_ref || P_probe) per scored token (mean, nats) and ΔPPL = PPL(probe) - PPL(ref)
// against the full-precision reference, whose log-probabilities are computed once (through
// GradualEvaluator::set_reference) and reused by every probe.
//
// The windows are split into K subsets of consecutive windows (as equal as possible; subset k holds
// windows [k*N/K, (k+1)*N/K)). The mean KL of every subset comes out of the same forward pass, so
// the stability of a ranking across subsets costs no extra passes.

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/dataset.h"
#include "eval/block_cache.h"
#include "eval/evaluator.h"
#include "model/quantizable_model.h"

namespace gradq {

/// How a probe of a unit inside block b is measured (eval/block_cache.h):
///   whole   one forward pass of the whole model;
///   exact   blocks b.. and the head from the cached input of block b (same KL as whole);
///   local   block b alone: its output error times the block's calibrated factor (a prediction).
enum class Measurement { kWhole, kExact, kLocal };
const char* measurement_name(Measurement m);
/// "whole", "exact" or "local"; throws listing them otherwise.
Measurement parse_measurement(const std::string& name);

/// What one probe measured.
struct ProbeMeasure {
  double kl = 0;                  ///< mean KL(P_ref || P_probe) over all scored tokens (nats)
  double delta_ppl = 0;           ///< PPL(probe) - PPL(ref) over the same tokens
  std::vector<double> subset_kl;  ///< mean KL over the scored tokens of each subset
  /// Local measurements only: the block's mean output error the KL was predicted from (else -1).
  double local_error = -1;
};

class ProbeEvaluator {
 public:
  /// Computes the reference from `reference` (one forward pass over `windows`). Throws gradq::Error
  /// when there are fewer windows than subsets or subsets < 1.
  ProbeEvaluator(const QuantizableModel& reference, Windows windows, int64_t subsets, EvaluatorOptions options = {});

  /// One forward pass of `model` over the windows, compared with the reference.
  ProbeMeasure measure(const QuantizableModel& model) const;
  /// Blocks `block`.. and the head rerun from the cached inputs (needs cache()); equal to
  /// measure(model) when no weight before `block` differs from the reference model.
  ProbeMeasure measure_exact(int64_t block) const;
  /// Block `block` alone: local_error(block) per window times local_factor(block), as a KL.
  ProbeMeasure measure_local(int64_t block) const;
  /// Measures as `how` says: whole (model), or exact/local at `block` (which must be >= 0 then).
  ProbeMeasure measure(const QuantizableModel& model, Measurement how, int64_t block) const;

  /// The block-input cache over the windows, built with the reference when `model` splits into
  /// stages (QuantizableModel::stages()); null otherwise.
  const BlockInputCache* cache() const { return cache_.get(); }
  /// Predicted KL per unit of local error for a block: exact.kl / exact.local_error of a
  /// calibration probe (set_local_factor) — throws when the block has none yet.
  double local_factor(int64_t block) const;
  void set_local_factor(int64_t block, double factor);
  /// Mean local error of `block` with the current weights (one run of the block).
  double local_error(int64_t block) const;

  const Windows& windows() const { return evaluator_.windows(); }
  int64_t subsets() const { return static_cast<int64_t>(subset_window_begin_.size()) - 1; }
  /// Windows [begin, end) of subset k.
  std::pair<int64_t, int64_t> subset_windows(int64_t k) const;
  /// Scored tokens of subset k.
  int64_t subset_tokens(int64_t k) const;
  int64_t scored_tokens() const { return ref_nll_.numel(); }
  /// [N, ctx] bool: the positions each window scores.
  const at::Tensor& scored_mask() const { return scored_mask_; }
  double reference_ppl() const { return reference_ppl_; }

  /// Passes over the windows so far (the reference's included) and the time they took: `seconds`
  /// for whole measurements, `forward_seconds` for the model's forward calls within them.
  int64_t passes() const { return passes_; }
  double seconds() const { return seconds_; }
  double forward_seconds() const { return forward_seconds_; }

 private:
  /// One pass over the windows with logits from `source`, compared and counted.
  ProbeMeasure measure_logits(const LogitsSource& source) const;

  GradualEvaluator evaluator_;
  std::shared_ptr<BlockInputCache> cache_;
  std::vector<double> local_factors_;  ///< per block; NaN until calibrated
  std::vector<int64_t> subset_window_begin_;  ///< K + 1 window boundaries
  std::vector<int64_t> subset_token_begin_;   ///< K + 1 boundaries in the scored-token order
  at::Tensor scored_mask_;
  at::Tensor ref_nll_;          ///< [tokens] -log p_ref(target)
  double reference_ppl_ = 0;
  mutable int64_t passes_ = 0;
  mutable double seconds_ = 0, forward_seconds_ = 0;
};

}  // namespace gradq
