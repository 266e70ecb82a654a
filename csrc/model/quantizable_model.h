#pragma once
// QuantizableModel: the model the pipeline works on (evaluator, importance analysis, search,
// plans, the quantizer). Two kinds implement it: CausalLM (any TorchScript causal LM, found by
// reading its forward graph) and a training harness's own model, for example one written with
// libtorch's C++ frontend (tests/model/test_frontend_model.cpp drives one through the whole
// quantize path).
//
// What every model shares is implemented here once: the named quantizable weights and their blocks,
// reading and setting a weight in logical [out, in] layout, and keeping the original of every
// changed weight. The model is the one owner of original weights: the search, the probes and their
// scopes read them here instead of keeping copies. An implementation registers its matrix weights
// (register_weights) and provides its parameters, the forward, the vocabulary size and, to let
// measurements rerun only part of the model, its stages (model/stages.h).
//
// Input statistics (the activations entering a weight's matmul, for clipping, trained rounding and
// GPTQ) are recorded by observe_input: CausalLM inserts it into its graph as an op, a C++ model
// calls it in its forward in front of each quantizable matmul. Both feed the same collector, which
// records only while capture_input_stats or capture_block_input_stats runs.

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/stages.h"

namespace gradq {

enum class WeightRole {
  kLinear,     ///< an ordinary projection inside the network
  kEmbedding,  ///< read by an embedding lookup (maybe also the tied output head)
  kHead,       ///< the projection that produces the logits
};
const char* weight_role_name(WeightRole role);

struct WeightInfo {
  std::string name;          ///< parameter path, e.g. "layers.3.attention.wq.weight"
  int64_t out_features = 0;  ///< logical [out, in], whatever the storage layout
  int64_t in_features = 0;
  bool transposed = false;   ///< stored as [in, out] and used as x @ W
  WeightRole role = WeightRole::kLinear;
  std::string block;         ///< block prefix ("layers.3"), empty outside any block
  int64_t block_index = -1;
  int64_t numel() const { return out_features * in_features; }
};

struct BlockInfo {
  std::string name;             ///< "layers.3"
  int64_t index = 0;            ///< 3
  std::vector<size_t> weights;  ///< indices into QuantizableModel::weights()
};

/// Per-input-channel statistics of the activations entering one weight's matmul.
struct InputStats {
  at::Tensor sq_sum;  ///< [in] float64: sum of x^2 over all rows seen
  at::Tensor xtx;     ///< [in, in] float64: sum of x^T x (only when requested)
  int64_t rows = 0;   ///< number of activation rows accumulated
  /// mean of x^2 per input channel, float32 [in].
  at::Tensor sq_mean() const;
};

/// Records `x` (the activation entering a matmul with `weight`, [..., in]) as the input of the
/// quantizable weight whose parameter tensor is `weight`, while a model's input statistics are being
/// captured; at any other time, and for a tensor that is no quantizable weight of the model being
/// captured, it does nothing. Returns `x`, so a forward can write `fc(gradq::observe_input(fc->weight, x))`.
/// A weight is recognized by its tensor (the one parameters() hands out under the weight's name),
/// which set_weight() and restore() keep: they give it new storage, never a new tensor.
const at::Tensor& observe_input(const at::Tensor& weight, const at::Tensor& x);

class QuantizableModel {
 public:
  virtual ~QuantizableModel() = default;

  /// Logits [B, T, vocab] for tokens int64 [B, T] on device() (logits() and the statistics capture
  /// move them there), in the caller's autograd mode (the importance analysis takes gradients
  /// through it); any floating dtype.
  virtual at::Tensor forward(const at::Tensor& tokens) const = 0;
  virtual int64_t vocab_size() const = 0;
  /// Where the model computes: the tokens gradq hands over are moved there first, and candidates
  /// and statistics live there. The CPU unless the implementation says otherwise.
  virtual at::Device device() const { return at::kCPU; }
  /// Every parameter by path, in a fixed order (tensors shared with the model, not copies). Read
  /// from the model on each call rather than kept here: a reference held elsewhere changes how
  /// TorchScript writes a module (its pickler memoizes shared tensors), so CausalLM's exports would
  /// differ byte for byte.
  virtual std::vector<std::pair<std::string, at::Tensor>> parameters() const = 0;
  /// The model as stages (model/stages.h), computing what forward() computes; null when it has none,
  /// with the reason in stages_unavailable_reason(). Without stages every measurement runs the whole
  /// model, and statistics cannot be collected one block at a time.
  virtual const ModelStages* stages() const { return nullptr; }
  /// stages() for what keeps them beyond a call (a head reference, eval/evaluator.h). By default it
  /// does not own them (they must outlive their users); CausalLM's own them, and its parameters.
  virtual std::shared_ptr<const ModelStages> shared_stages() const {
    return std::shared_ptr<const ModelStages>(std::shared_ptr<const ModelStages>(), stages());
  }
  virtual const std::string& stages_unavailable_reason() const;
  /// The dtype `path` (a parameter) has where the model is kept, when it is computed in another
  /// (`held`); originals of changed weights are kept in it. CausalLM: float16 weights computed in
  /// float32 on a CPU.
  virtual at::ScalarType stored_dtype(const std::string& path, at::ScalarType held) const;

  /// Logits float32 [B, T, V] on device() for tokens int64 [B, T] on any device, without autograd.
  at::Tensor logits(const at::Tensor& tokens) const;

  /// Quantizable weights, in the order the implementation registered them (CausalLM: the order the
  /// forward graph first uses them).
  const std::vector<WeightInfo>& weights() const { return weights_; }
  /// Every matrix weight (quantizable or not), same order.
  const std::vector<WeightInfo>& matrix_weights() const { return matrix_weights_; }
  /// Blocks in numeric order (layer 10 after layer 9), from the weights' block_index.
  const std::vector<BlockInfo>& blocks() const { return blocks_; }
  /// Index of a quantizable weight by name; throws listing near names when unknown.
  size_t weight_index(const std::string& name) const;
  /// Position of a block (by its prefix, "layers.3") in blocks() and in the stages; -1 when unknown.
  int64_t block_position(const std::string& block) const;

  /// The parameter tensor as stored (shares memory with the model).
  at::Tensor parameter(const std::string& name) const;
  /// The weight in logical [out, in] layout (a copy).
  at::Tensor weight(const std::string& name) const;
  /// Sets a weight to `value` in logical [out, in] layout (converted to the weight's dtype). The
  /// parameter gets new storage and keeps the old one as the weight's original until restore(),
  /// so restore() is bit-exact however often it is called, and an unchanged model holds no copies.
  void set_weight(const std::string& name, const at::Tensor& value);
  /// Puts the original back and drops the model's hold on the value that was set.
  void restore(const std::string& name);
  void restore_all();
  /// The weight as registered, in logical [out, in] layout and the dtype the model computes in,
  /// whatever set_weight() has written since. An unchanged weight hands out its own storage (a
  /// transposed one, a transposed copy); it stays the original whatever is set later.
  at::Tensor original_weight(const std::string& name) const;
  /// Whether the weight holds its original value (never set, or restored since).
  bool holds_original(const std::string& name) const { return !originals_.count(name); }
  /// Bytes held by the originals of the weights changed now (in their stored dtype).
  int64_t original_bytes() const;
  /// The dtype of the model's matrix weights (stored_dtype of the first one): float32, float16 or
  /// bfloat16.
  at::ScalarType dtype() const { return dtype_; }

  /// Runs `tokens` ([N, T] windows, processed `batch` rows at a time) with the inputs of the
  /// quantizable weights recorded and returns each one's statistics, keyed by weight name. Model
  /// outputs are unaffected. Weights recorded together (CausalLM's q, k and v, gate and up: one input)
  /// get the same tensors, computed once: read them, do not modify them in place.
  std::map<std::string, InputStats> capture_input_stats(const at::Tensor& tokens, int64_t batch,
                                                        bool with_xtx) const;
  /// The input statistics of block `block`'s quantizable weights (by position in blocks()), from the
  /// states entering it (eval/block_cache.h), accumulated in the order given. Only that block runs,
  /// so a search can collect X^T X one block at a time instead of for the whole model up front; with
  /// the states of the same windows and batches the numbers are exactly capture_input_stats's.
  /// Throws when the model has no stages, or when one of the block's weights recorded no input.
  std::map<std::string, InputStats> capture_block_input_stats(int64_t block, const std::vector<StageState>& inputs,
                                                              bool with_xtx) const;

 protected:
  QuantizableModel() = default;
  // Copies only through a derived class: a copy of the base alone would lose the forward.
  QuantizableModel(const QuantizableModel&) = default;
  QuantizableModel(QuantizableModel&&) = default;
  QuantizableModel& operator=(const QuantizableModel&) = default;
  QuantizableModel& operator=(QuantizableModel&&) = default;

  /// Registers the model's matrix weights (parameters by path) and which of those are quantizable
  /// (by name; weights() keeps the order of `matrix_weights`), and derives the blocks from the
  /// quantizable weights' block and block_index. Called once, by the constructor of an
  /// implementation. Checks each matrix weight against its parameter: a 2-D floating tensor of
  /// [out, in] ([in, out] when transposed).
  void register_weights(std::vector<WeightInfo> matrix_weights, const std::vector<std::string>& quantizable);
  /// A callable that runs the forward on a batch of tokens with every quantizable weight's input
  /// going through observe_input. The default runs forward(); CausalLM runs a copy of its graph with
  /// the observing ops inserted. Called once per capture, so it may prepare what the batches share.
  virtual std::function<void(const at::Tensor& tokens)> observed_forward() const;

 private:
  /// The matrix weight `name`; throws listing the quantizable weights when there is none.
  const WeightInfo& matrix_info(const std::string& name) const;

  std::vector<WeightInfo> weights_;
  std::vector<WeightInfo> matrix_weights_;
  std::vector<BlockInfo> blocks_;
  /// Originals of the weights set_weight() changed and restore() has not put back, in the stored
  /// layout of their parameter and their stored dtype (an fp16 weight held in float32 is kept in
  /// fp16, which is exact).
  std::map<std::string, at::Tensor> originals_;
  at::ScalarType dtype_ = at::kFloat;
};

/// For its lifetime, only the parameters `which` names require gradients (none: an autograd pass
/// through the model computes gradients of its activations alone, not a model's worth of weight
/// gradients); every parameter's flag and gradient are put back after.
class GradientScope {
 public:
  enum class Which { kNone, kQuantizableWeights };
  GradientScope(const QuantizableModel& model, Which which);
  ~GradientScope();
  GradientScope(const GradientScope&) = delete;
  GradientScope& operator=(const GradientScope&) = delete;

 private:
  std::vector<at::Tensor> params_, grads_;
  std::vector<bool> flags_;
};

namespace detail {
/// The recorder behind observe_input, by slot (position in weights() of the model being captured):
/// CausalLM's graph op `gradq_observe::tap` calls it with the slots it was inserted for. `x` is
/// recorded once, into slots[0]; the other slots (weights that read the same input) share those
/// statistics' tensors, so one [in, in] X^T X serves them all.
void observe_slots(const std::vector<int64_t>& slots, const at::Tensor& x);
}  // namespace detail

}  // namespace gradq
