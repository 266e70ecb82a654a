#pragma once
// BlockInputCache: the state entering every block, for every batch of windows, computed once.
//
// With it a change inside block b is measured without recomputing blocks 0..b-1:
//   exact   blocks b..L-1 and the head rerun from the cached input of block b: the same logits as a
//           whole forward pass of the model, as long as the cached states match the weights of the
//           blocks before b (refresh() re-establishes that after those weights changed);
//   local   block b alone on its cached input, compared with the cached output: the mean squared
//           change of the block's output (state_mse), per window. A probe turns it into a predicted
//           KL with a factor calibrated per block against an exact measurement (ProbeEvaluator).
// Memory: (L + 1) states per batch; for a residual stream of width d in dtype t that is about
// (L + 1) * windows * ctx * d * sizeof(t) bytes (bytes() reports it). Work that measures the blocks
// in order keeps two boundaries instead (Keep::kMoving): flat in depth.

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "data/dataset.h"
#include "model/stages.h"

namespace gradq {

/// Mean of `per_window` (local_error) over windows [begin, end), each weighted by the tokens it
/// scores (`tokens`, float64 [N]): a window's tokens share its error, so the mean is per token like
/// the KL means it predicts.
double token_weighted_mean(const at::Tensor& per_window, const at::Tensor& tokens, int64_t begin, int64_t end);

class BlockInputCache {
 public:
  /// Which boundaries the cache keeps.
  enum class Keep {
    kAll,     ///< every one: any block measurable at any time (refresh and commit keep them current)
    kMoving,  ///< the states entering blocks b and b + 1, b moved forward by move_to()
  };
  /// Runs `inputs` (tokens [N, T]) through `stages`, `batch` windows at a time, keeping every state
  /// (kAll) or those entering blocks 0 and 1 (kMoving).
  BlockInputCache(const ModelStages& stages, const at::Tensor& inputs, int64_t batch, Keep keep = Keep::kAll);

  int64_t num_blocks() const { return stages_.num_blocks(); }
  int64_t batch() const { return batch_; }
  int64_t windows() const { return windows_; }
  /// Batch index of the batch that starts at window `begin` (a multiple of batch()).
  int64_t chunk_of(int64_t begin) const;

  /// State entering block `boundary` (num_blocks(): the head) for batch `chunk`.
  const StageState& state(int64_t boundary, int64_t chunk) const;
  /// Whether the states entering block `boundary` are kept (kMoving keeps two boundaries).
  bool keeps(int64_t boundary) const;
  /// The states entering block `boundary`, one per batch, in window order (kept: keeps()).
  const std::vector<StageState>& states(int64_t boundary) const;
  /// Logits of batch `chunk` with blocks `from`.. rerun on the current weights (from == -1: the
  /// embedding too).
  at::Tensor logits_from(int64_t from, int64_t chunk) const;
  /// Per window: state_mse between block `b` run on its cached input with the current weights and
  /// its cached output, restricted to the state tensors batched over windows. float64 [windows()].
  at::Tensor local_error(int64_t b) const;

  /// kMoving: keeps the states entering blocks b and b + 1 (the head's alone for b == num_blocks())
  /// from now on, dropping earlier ones. New states are computed with the weights the model has
  /// now, so the blocks moved past must hold the weights the cache describes. Never goes back.
  void move_to(int64_t b);

  /// kAll: recomputes the states entering blocks from+1.. with the current weights (after weights of
  /// block `from` or later changed, the cache describes the changed model from there on).
  /// from == -1: the embedding changed, everything is recomputed.
  void refresh(int64_t from);

  /// States entering blocks from+1.. and the head of one batch, computed by a trial run.
  struct Trial {
    int64_t from = 0;
    std::vector<StageState> states;  ///< [boundary - from - 1]
  };
  /// logits_from(from, chunk), also keeping the states the run passed through in `trial` (from ==
  /// -1 starts at the embedding), so that commit() can adopt them if the change that was tried is
  /// kept, without running the blocks again.
  at::Tensor logits_from(int64_t from, int64_t chunk, Trial& trial) const;
  /// kAll: adopts the states of trials of every batch (trials[chunk]) as the cache's own.
  void commit(std::vector<Trial>&& trials);

  /// Bytes held by the cached tensors.
  int64_t bytes() const;

 private:
  const ModelStages& stages_;
  at::Tensor inputs_;
  int64_t batch_ = 0, windows_ = 0;
  Keep keep_ = Keep::kAll;
  int64_t first_kept_ = 0;                       ///< kMoving: the earliest boundary kept
  std::vector<std::vector<StageState>> states_;  ///< [boundary][chunk]; empty where not kept
};

/// The gradient of the mean negative log-likelihood of `windows`' scored targets (the log of their
/// perplexity) with respect to the state leaving each block, as `stages` computes it with the
/// model's weights now: [block][batch of `batch` windows], a state whose tensors batched over windows
/// hold their gradients (in their own dtype, in host memory: they wait there for their block, and
/// device memory is what a large model lacks) and whose other values are None. A change d of block
/// b's output moves that mean by <gradient, d> to first order: the part of a perplexity change that
/// KL, second order at the reference, does not see (backward_through_block). One forward and
/// one backward pass per batch, holding that batch's activations in between; the result holds L
/// states per batch, as a BlockInputCache that keeps every boundary. The model's parameters should
/// not require gradients (GradientScope::Which::kNone), or they are computed too.
std::vector<std::vector<StageState>> output_gradients(const ModelStages& stages, const Windows& windows, int64_t batch);

/// Runs block `b` on `inputs` (one state per batch: BlockInputStream::states()) with autograd and
/// back-propagates `output_gradients` (output_gradients()[b] of the same windows, moved to the
/// block's device batch by batch) through it: the parameters that require gradients accumulate the
/// gradient of the mean NLL those were taken of, restricted to this block's parameters. One batch's
/// activations at a time.
void backward_through_block(const ModelStages& stages, int64_t b, const std::vector<StageState>& inputs,
                            const std::vector<StageState>& output_gradients);

/// The states entering one block at a time, for every batch of windows, carried forward from the
/// embedding: memory for one boundary instead of BlockInputCache's L + 1, for work that visits the
/// blocks in order (collecting the statistics the rounding is fitted on, block by block). Each
/// advance() runs the current block with the model's weights at that moment; going back to an
/// earlier block means rewind() and advancing again from the embedding.
class BlockInputStream {
 public:
  /// Embeds `inputs` (tokens [N, T]), `batch` windows at a time: the stream stands at block 0.
  BlockInputStream(const ModelStages& stages, const at::Tensor& inputs, int64_t batch);

  /// The block whose input states() holds (num_blocks(): the head).
  int64_t block() const { return block_; }
  /// The states entering block(), one per batch, in window order.
  const std::vector<StageState>& states() const { return states_; }
  /// Runs block() on every batch: the stream then stands at the next block.
  void advance();
  /// Back to block 0: the embedding again.
  void rewind();

 private:
  const ModelStages& stages_;
  at::Tensor inputs_;
  int64_t batch_ = 0;
  int64_t block_ = 0;
  std::vector<StageState> states_;
};

}  // namespace gradq
