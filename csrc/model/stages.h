#pragma once
// The model as stages: embed tokens -> state; block i: state -> state; head: state -> logits.
//
// This is what lets gradq measure a change in block b without recomputing blocks 0..b-1: the state
// entering every block is computed once (eval/block_cache.h) and a probe reruns only what follows.
// A state is whatever the forward keeps live across a block boundary: the residual stream, and also
// rotary tables, masks, positions or the tokens themselves when later code reads them. Stage i's
// input is stage i-1's output, so a state is only ever handed on, never interpreted, except by
// local error measurements, which compare the floating-point tensors of two states.
//
// ModelStages is public API: a training harness can implement it for its own model. CausalLM derives
// an implementation from any TorchScript forward by splitting the inlined graph (GraphStages below).

#include <torch/script.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace gradq {

/// Values live across a block boundary, in a fixed order per boundary.
using StageState = std::vector<c10::IValue>;

class ModelStages {
 public:
  virtual ~ModelStages() = default;
  /// Number of blocks; block(i) accepts i in [0, num_blocks()).
  virtual int64_t num_blocks() const = 0;
  /// tokens int64 [B, T] -> the state entering block 0.
  virtual StageState embed(const at::Tensor& tokens) const = 0;
  /// The state entering block i -> the state entering block i + 1 (or the head). Must not modify
  /// `in`: callers reuse cached states.
  virtual StageState block(int64_t i, const StageState& in) const = 0;
  /// The state leaving the last block -> logits [B, T, vocab] (any floating dtype).
  virtual at::Tensor head(const StageState& in) const = 0;

  /// Blocks from..num_blocks()-1 and the head, starting from the state entering block `from`
  /// (from == num_blocks(): the head alone).
  at::Tensor logits_from(int64_t from, const StageState& in) const;
  /// embed, every block, head.
  at::Tensor logits(const at::Tensor& tokens) const { return logits_from(0, embed(tokens)); }
};

/// Stages of a TorchScript module, from its inlined forward graph split at block boundaries.
///
/// A block's region of the graph holds every top-level node from the first that reads one of the
/// block's attributes to the last, and the head's every node from the first after the last block
/// that reads an attribute outside every block (the final norm, the output projection). Nodes
/// between two regions that read no attribute go to either side: each boundary is cut where the
/// fewest tensors cross it (the latest such place), so that a state is the residual stream and
/// what every block shares (masks, rotary tables), not also values computed from the stream for
/// the next block (an RMSNorm's normalized input, before its weight is read). Attribute reads and
/// constants are pure, so each stage re-creates the ones it uses instead of receiving them. The
/// split is refused (split() returns null and says why) when a block's attributes are read outside
/// its region, blocks are used out of order, or the staged logits differ from the module's forward
/// on a probe input.
class GraphStages : public ModelStages {
 public:
  /// `block_prefixes[i]`: the attribute path of block i ("layers.3"); `probe_tokens`: an input the
  /// staged and whole forward are compared on, on the module's device (embed() moves the tokens it
  /// is given there). Returns null and sets `*why` (one line) when the
  /// graph cannot be split this way.
  /// `instrument`, when given, is applied to the inlined graph before it is split; it may only add
  /// operations that leave the graph's values unchanged (CausalLM's input taps).
  static std::unique_ptr<GraphStages> split(const torch::jit::Module& module,
                                            const std::vector<std::string>& block_prefixes,
                                            const at::Tensor& probe_tokens, std::string* why,
                                            const std::function<void(torch::jit::Graph&)>& instrument = {});

  int64_t num_blocks() const override { return static_cast<int64_t>(stages_.size()) - 2; }
  StageState embed(const at::Tensor& tokens) const override;
  StageState block(int64_t i, const StageState& in) const override;
  at::Tensor head(const StageState& in) const override;

  /// Number of values in the state entering block i (i == num_blocks(): the head's input).
  size_t state_size(int64_t i) const;

 private:
  struct Stage;
  GraphStages(torch::jit::Module module, std::vector<std::shared_ptr<Stage>> stages, at::Device device);
  std::vector<c10::IValue> run(const Stage& stage, std::vector<c10::IValue> inputs) const;

  torch::jit::Module module_;                  ///< shares parameters with the caller's module
  std::vector<std::shared_ptr<Stage>> stages_;  ///< embed, blocks..., head
  at::Device device_;                           ///< where the module runs: the tokens go there
};

/// Replaces each tensor of `state` that equals the one in the same place of `first` (dtype, shape,
/// device and values) by `first`'s. What does not depend on the tokens (a causal mask, rotary tables)
/// is then held once for all the batches of a stream or cache instead of once per batch: a [T, T]
/// fp32 mask is as large as the residual stream of a 2048-wide model at T = 2048. Safe because no
/// stage writes into its input state (ModelStages::block).
void share_equal_tensors(StageState& state, const StageState& first);

/// Mean squared difference of the floating-point tensors of two states of the same boundary,
/// summed over tensors and divided by their total element count (computed in float64). The local
/// error of a block is this between its output with changed weights and its reference output.
double state_mse(const StageState& a, const StageState& b);

}  // namespace gradq
