#pragma once
// GradualEvaluator: perplexity and divergence from a full-precision reference, the numbers every
// quantization decision in gradq is judged by. The statistics mirror llama.cpp's perplexity tool
// (--kl-divergence) so users can compare them directly.
//
// Only the targets a window scores (dataset.h: score_from) enter any statistic, so each token of the
// evaluation stream counts once. The reference's log-probabilities over the whole vocabulary are
// computed once and reused for every candidate; they can be saved and loaded, and kept in float32,
// float16 or as the top k per position plus the tail mass (ReferenceStorage).

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "model/quantizable_model.h"

namespace gradq {

/// How a reference keeps its log-probabilities (`--reference-storage`). Every kind keeps the
/// reference's log-probability of each scored target and its top token in full precision, so
/// perplexity, the perplexity ratio, delta p and the same-top rate are exact with every kind; only
/// the KL statistics depend on the kind.
struct ReferenceStorage {
  /// kHead keeps no log-probabilities: the full-precision model's input to its head (the state after
  /// the last block, `dim` values per position) is kept and the reference recomputed from it for each
  /// batch, so the KL is float32's exactly for one more head product per evaluation. It needs the
  /// model as stages, its head and embeddings unquantized, and cannot be saved.
  /// kAuto is a choice, not a way of keeping: GradualEvaluator::set_reference resolves it to kHead or
  /// kFloat16 (EvaluatorOptions::auto_head_above_bytes); a Reference never holds it.
  enum class Kind { kFloat32, kFloat16, kTopK, kHead, kAuto };
  Kind kind = Kind::kFloat32;
  int64_t k = 0;  ///< kTopK only: tokens kept per position (>= 1)

  static ReferenceStorage float32() { return {}; }
  static ReferenceStorage float16() { return {Kind::kFloat16, 0}; }
  static ReferenceStorage top_k(int64_t k);
  static ReferenceStorage head() { return {Kind::kHead, 0}; }
  static ReferenceStorage automatic() { return {Kind::kAuto, 0}; }
  /// "fp32", "fp16", "top<K>" (K >= 1), "head" or "auto"; throws gradq::Error naming the accepted forms
  /// otherwise.
  static ReferenceStorage parse(const std::string& name);
  std::string name() const;
  /// Bytes per scored position for a vocabulary of `vocab` (the per-position extras included; kHead:
  /// the extras only, its states are the model's width).
  int64_t bytes_per_token(int64_t vocab) const;
  bool operator==(const ReferenceStorage& o) const { return kind == o.kind && k == o.k; }
  bool operator!=(const ReferenceStorage& o) const { return !(*this == o); }
};

/// A value with its standard error.
struct Estimate {
  double value = 0;
  double stderr_ = 0;
};

struct KlStats {
  /// How the reference was kept: with kTopK the KL rows (mean, median, max, min, percentiles) are
  /// lower bounds, with kFloat16 approximations; every other statistic is exact with every kind.
  ReferenceStorage storage;
  Estimate mean;
  double median = 0, max = 0, min = 0;
  /// KL percentiles 99.9, 99, 95, 90, 10, 5, 1, 0.1 (same order as kKlPercentiles).
  std::vector<double> percentiles;
  double same_top_rate = 0;     ///< fraction of tokens whose argmax matches the reference's
  Estimate delta_p_mean;        ///< mean of p_model(correct) - p_ref(correct)
  double delta_p_rms = 0;
  Estimate ppl_ratio;           ///< PPL(model) / PPL(ref)
  Estimate ln_ppl_ratio;        ///< mean of ln p_ref(correct) - ln p_model(correct)
  Estimate delta_ppl;           ///< PPL(model) - PPL(ref)
  double ln_ppl_correlation = 0;
};
extern const std::vector<double> kKlPercentiles;

struct EvalResult {
  int64_t tokens = 0;           ///< scored tokens
  Estimate nll;                 ///< mean negative log-likelihood (nats)
  Estimate ppl;                 ///< exp(mean nll), with its standard error
  std::optional<Estimate> reference_ppl;
  std::optional<KlStats> kl;    ///< present when the evaluator has a reference
  double seconds = 0;           ///< wall time of the evaluation
  double forward_seconds = 0;   ///< part of it spent in the model's forward passes
};

class BlockInputCache;

/// kHead's reference: the full-precision model's input to its head for each batch of windows (a
/// block-input cache moved to the head), and the stages that turn one into logits
/// (QuantizableModel::shared_stages: CausalLM's stay alive with the reference).
struct HeadInputs {
  std::shared_ptr<const ModelStages> stages;    ///< before `cache`, which refers to them
  std::shared_ptr<const BlockInputCache> cache;
  /// Logits [n, T, vocab] float32 of the batch that starts at window `begin`.
  at::Tensor logits(int64_t begin) const;
  /// Bytes of the kept states (masks and rotary tables shared by the batches counted once).
  int64_t bytes() const;
};

/// The reference's view of the evaluation windows: its log-probabilities at every scored position,
/// stored as `storage` says.
struct Reference {
  ReferenceStorage storage;
  /// kFloat32: [tokens, vocab] float32; kFloat16: [tokens, vocab] float16; kTopK: [tokens, k]
  /// float32, the k largest log-probabilities of each position, descending.
  at::Tensor log_probs;
  at::Tensor top_indices;       ///< kTopK: [tokens, k] int32, the vocabulary index of each kept value
  at::Tensor log_tail;          ///< kTopK: [tokens] float32, log of the mass outside the kept tokens (-inf: none)
  at::Tensor target_log_probs;  ///< [tokens] float32: log p_ref(target), exact with every kind
  at::Tensor top_tokens;        ///< [tokens] int64: the reference's argmax (first index of the maximum)
  at::Tensor targets;           ///< [tokens] int64
  at::Tensor windows_fingerprint;  ///< the windows' inputs, to refuse a reference for other windows
  int64_t vocab = 0;
  std::shared_ptr<const HeadInputs> head;  ///< kHead only (log_probs undefined)

  /// The reference of full-precision log-probabilities `log_probs` [tokens, vocab] float32 with
  /// their `targets` [tokens], kept as `storage` says (windows_fingerprint left for the caller).
  static Reference from_log_probs(const at::Tensor& log_probs, const at::Tensor& targets, ReferenceStorage storage);
  /// This reference in another storage; only a float32 reference converts (compact kinds lost what
  /// the others need).
  Reference to_storage(ReferenceStorage storage) const;
  int64_t tokens() const { return targets.numel(); }
  /// Bytes of the tensors this reference holds (the windows fingerprint and kHead's states included).
  int64_t bytes() const;

  /// KL(P_ref || P_model) of rows [begin, begin + n) against the model's log-probabilities
  /// `log_probs` [n, vocab] float32, per position ([n] float32, clamped at 0): the one KL routine
  /// of gradq. With kTopK it is the KL of the two distributions coarsened to the k kept tokens plus
  /// one bucket for the rest, a lower bound of the full KL (evaluator.cpp says by how much).
  /// kHead has no rows to slice: the evaluator compares it batch by batch (rows_kl of the recomputed
  /// log-probabilities).
  at::Tensor token_kl(int64_t begin, const at::Tensor& log_probs) const;
  /// KL(P_ref || P_model) per row of two float32 [n, vocab] log-probability tensors: token_kl's
  /// float32 case, and kHead's.
  static at::Tensor rows_kl(const at::Tensor& ref_log_probs, const at::Tensor& log_probs);

  /// Writes the reference with its storage kind (a dict of str -> tensor in a torch archive); kHead
  /// cannot be written (it holds the model's states, not log-probabilities).
  void save(const std::string& path) const;
  /// Reads what save() wrote, and the float32 files of earlier versions (no storage entry).
  static Reference load(const std::string& path);
  /// The reader of load() on bytes already in memory (`path` names them in errors).
  static Reference from_bytes(const std::string& bytes, const std::string& path);
};

/// Logits [B, T, V] of windows [begin, end) of the evaluator's windows, computed however the caller
/// likes (a whole forward pass, or the blocks after a cached state: eval/block_cache.h). The
/// evaluator asks for consecutive batches of EvaluatorOptions::batch windows.
using LogitsSource = std::function<at::Tensor(int64_t begin, int64_t end)>;

struct EvaluatorOptions {
  /// Windows per forward pass. 1 by default: on a CPU, 8 were no faster (stories260K's default quantize: the
  /// same bytes in 84 against 88 CPU s) and their activations raised the peak memory (by 112 MiB on a
  /// 512-wide 4-layer model; docs/BENCHMARKS.md). A GPU may want more (not measured).
  int64_t batch = 1;
  /// evaluate() throws naming the window when logits are NaN or infinite. The reference pass always
  /// checks; the quantizer turns this off for its candidates, whose non-finite results fail the
  /// budget instead.
  bool check_finite = true;
  /// How set_reference(model) keeps the reference (full float32 by default).
  ReferenceStorage reference_storage;
  /// kAuto keeps the head's inputs (kHead) when the model allows it and fp16 log-probabilities would
  /// take more than this; fp16 otherwise. kHead costs one head product per evaluation, a few percent of
  /// a real LLM's forward (2-7% of Llama-7B's and TinyLlama's parameters are the head), and saves
  /// 2 x vocab bytes per scored token: 1 GB for 64 windows of 256 tokens at a 32,000-token vocabulary.
  int64_t auto_head_above_bytes = int64_t{64} << 20;
};

class GradualEvaluator {
 public:
  GradualEvaluator(Windows windows, EvaluatorOptions options = {});

  /// Computes and keeps the reference from a full-precision model, in
  /// EvaluatorOptions::reference_storage, compacted batch by batch (the float32 [tokens, vocab]
  /// log-probabilities are never held whole unless that is the storage). kHead keeps the model's
  /// head inputs instead, and recomputes from them with the model's head (shared_stages()), which
  /// must stay unquantized, as must the embeddings (checked here). kAuto is resolved here. `cache`,
  /// when given, already holds the model's states over these windows in chunks of this evaluator's
  /// batch, the head's boundary included: the reference comes from its head inputs, and kHead keeps
  /// it (instead of a pass of its own).
  void set_reference(const QuantizableModel& reference, std::shared_ptr<const BlockInputCache> cache = nullptr,
                     double* forward_seconds = nullptr);
  /// The storage set_reference(reference) keeps: the options' own, or for kAuto kHead when the fp16
  /// log-probabilities of these windows would exceed EvaluatorOptions::auto_head_above_bytes and the
  /// model allows a head reference (stages, every quantizable weight inside a block), else kFloat16.
  ReferenceStorage resolve_storage(const QuantizableModel& reference) const;
  /// The same from logits however computed; every storage but kHead, which needs the model (kAuto: fp16).
  void set_reference(const LogitsSource& reference, double* forward_seconds = nullptr);
  /// Uses a saved reference as it is stored; throws when it was computed for other windows.
  void set_reference(Reference reference);
  const std::optional<Reference>& reference() const { return reference_; }

  /// Perplexity of `model`, plus KL statistics when a reference is set.
  EvalResult evaluate(const QuantizableModel& model) const;
  EvalResult evaluate(const LogitsSource& logits) const;

  /// KL against the reference and NLL of every scored position, float64 [tokens] each, on the CPU.
  struct TokenScores {
    at::Tensor kl;
    at::Tensor nll;
  };
  /// The TokenScores of `logits`, batch by batch: one batch's [n, vocab] log-probabilities are the most
  /// it holds at once (never the [tokens, vocab] of all windows). Needs a reference.
  TokenScores token_scores(const LogitsSource& logits, double* forward_seconds = nullptr) const;

  /// Log-probabilities of the scored positions, [tokens, vocab] float32 (what the reference keeps).
  at::Tensor scored_log_probs(const QuantizableModel& model, double* forward_seconds = nullptr) const;
  at::Tensor scored_log_probs(const LogitsSource& logits, double* forward_seconds = nullptr) const;
  /// The logits of `model` by a whole forward pass per batch of this evaluator's windows.
  LogitsSource whole_model(const QuantizableModel& model) const;

  const Windows& windows() const { return windows_; }
  int64_t batch() const { return options_.batch; }
  /// Tokens scored in each window, float64 [N] (local errors are weighted by them, block_cache.h).
  at::Tensor scored_tokens_per_window() const { return scored_mask_.sum(1).to(at::kDouble); }

 private:
  /// Runs the windows through `model` in batches; calls `consume(begin, log_probs [n, V], targets [n])`
  /// with the batch's first window and its scored positions, in window order.
  /// `check_finite`: throw naming the window when logits are NaN or infinite.
  void for_each_batch(const LogitsSource& logits, double* forward_seconds, bool check_finite,
                      const std::function<void(int64_t, const at::Tensor&, const at::Tensor&)>& consume) const;
  /// KL against the reference of the batch starting at window `begin`, whose scored positions are
  /// the reference's rows from `offset`: token_kl, or kHead's recomputed rows.
  at::Tensor reference_kl(int64_t begin, int64_t offset, const at::Tensor& log_probs) const;
  /// The scored positions' log-probabilities [n, V] float32 of logits [n_windows, T, V] of the batch at `begin`.
  at::Tensor scored(int64_t begin, const at::Tensor& logits) const;
  /// The log-probabilities of every scored position, [tokens, vocab] float32.
  at::Tensor gather_log_probs(const LogitsSource& logits, double* forward_seconds, bool check_finite) const;
  /// set_reference's one implementation; `head`: kHead's inputs, whose logits `reference` gives.
  void set_reference_from(ReferenceStorage storage, const LogitsSource& reference, double* forward_seconds,
                          std::shared_ptr<const HeadInputs> head);

  Windows windows_;
  EvaluatorOptions options_;
  at::Tensor scored_mask_;  ///< [N, ctx] bool
  std::optional<Reference> reference_;
};

/// Human-readable table of `result` (what `gradq eval` prints).
std::string format_eval_table(const EvalResult& result);
/// The same numbers as JSON text.
std::string eval_result_json(const EvalResult& result);

}  // namespace gradq
