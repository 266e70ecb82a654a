#pragma once
// CausalLM: the adapter between gradq and any TorchScript causal LM whose forward maps
// tokens int64 [B, T] to logits [B, T, vocab] in any float dtype (parameters fp32, fp16 or bf16).
//
// TorchScript in C++ has no forward hooks, so everything that needs to know how a parameter is
// used reads an inlined copy of the forward graph: a 2-D floating parameter is a matrix weight
// when it feeds aten::linear (stored [out, in]) or aten::matmul/mm/addmm as the right operand
// (stored [in, out], GPT-2 Conv1D style, unless transposed on the way). Input statistics are
// captured by running an instrumented copy of that graph in which a tap op sits in front of each
// weight's matmul; the model's own graph and outputs are untouched.

#include <torch/script.h>

#include <istream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "model/stages.h"

namespace gradq {

enum class WeightRole {
  kLinear,     ///< an ordinary projection inside the network
  kEmbedding,  ///< read by aten::embedding (maybe also the tied output head)
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
  std::vector<size_t> weights;  ///< indices into CausalLM::weights()
};

struct AdapterOptions {
  /// Regexes (std::regex, ECMAScript, searched anywhere in the name). A matrix weight is
  /// quantizable when its role is kLinear and it matches no exclude pattern, or when it matches an
  /// include pattern (which is how embeddings and the head are selected).
  std::vector<std::string> include;
  std::vector<std::string> exclude;
  /// Regex whose first capture group is the block prefix and second its number.
  std::string block_pattern = R"(^((?:.*\.)?(?:layers|h|blocks|layer)\.(\d+))\.)";
  /// Split the forward into stages (CausalLM::stages()); false runs every measurement whole.
  bool split_stages = true;
};

/// Per-input-channel statistics of the activations entering one weight's matmul.
struct InputStats {
  at::Tensor sq_sum;  ///< [in] float64: sum of x^2 over all rows seen
  at::Tensor xtx;     ///< [in, in] float64: sum of x^T x (only when requested)
  int64_t rows = 0;   ///< number of activation rows accumulated
  /// mean of x^2 per input channel, float32 [in].
  at::Tensor sq_mean() const;
};

class CausalLM {
 public:
  /// Loads a TorchScript file; throws gradq::Error if it is missing, not TorchScript, or its
  /// forward does not map int64 [B, T] tokens to [B, T, V] logits.
  static CausalLM load(const std::string& path, const AdapterOptions& options = {});
  /// The same from a stream of the file's bytes (`path` names it in errors).
  static CausalLM load(std::istream& in, const std::string& path, const AdapterOptions& options = {});
  explicit CausalLM(torch::jit::Module module, const AdapterOptions& options = {});

  /// Logits float32 [B, T, V] for tokens int64 [B, T], without autograd.
  at::Tensor logits(const at::Tensor& tokens) const;
  int64_t vocab_size() const { return vocab_size_; }

  /// Quantizable weights in the order the forward graph first uses them.
  const std::vector<WeightInfo>& weights() const { return weights_; }
  /// Every matrix weight (quantizable or not), same order.
  const std::vector<WeightInfo>& matrix_weights() const { return matrix_weights_; }
  /// Blocks in numeric order (layer 10 after layer 9).
  const std::vector<BlockInfo>& blocks() const { return blocks_; }
  /// Index of a quantizable weight by name; throws listing near names when unknown.
  size_t weight_index(const std::string& name) const;

  /// The parameter tensor as stored (shares memory with the module).
  at::Tensor parameter(const std::string& name) const;
  /// The weight in logical [out, in] layout (a copy when stored transposed).
  at::Tensor weight(const std::string& name) const;
  /// Sets a weight to `value` in logical [out, in] layout (converted to the weight's dtype). The
  /// parameter gets new storage and keeps the loaded one as the weight's original until restore(),
  /// so restore() is bit-exact however often it is called, and an unchanged model holds no copies.
  void set_weight(const std::string& name, const at::Tensor& value);
  /// Puts the original back and drops the model's hold on the value that was set.
  void restore(const std::string& name);
  void restore_all();
  /// The weight as loaded, in logical [out, in] layout and the dtype the model computes in, whatever
  /// set_weight() has written since. The model is the one owner of original weights: the search and
  /// the probes read them here instead of keeping copies. An unchanged weight hands out its own
  /// storage (a transposed one, a transposed copy); it stays the original whatever is set later.
  at::Tensor original_weight(const std::string& name) const;
  /// Whether the weight holds its original value (never set, or restored since).
  bool holds_original(const std::string& name) const { return !originals_.count(name); }
  /// Bytes held by the originals of the weights changed now (fp16 ones in fp16).
  int64_t original_bytes() const;

  /// Runs `tokens` ([N, T] windows, processed `batch` rows at a time) through an instrumented
  /// copy of the forward graph and returns each quantizable weight's input statistics, keyed by
  /// weight name. Model outputs are unaffected. Weights whose one matmul reads the same input (q, k
  /// and v; gate and up) get the same tensors, computed once: read them, do not modify them in place.
  std::map<std::string, InputStats> capture_input_stats(const at::Tensor& tokens, int64_t batch,
                                                        bool with_xtx) const;
  /// The input statistics of block `block`'s quantizable weights (by position in blocks()), from the
  /// states entering it (eval/block_cache.h), accumulated in the order given. Only that block runs,
  /// so a search can collect X^T X one block at a time instead of for the whole model up front; with
  /// the states of the same windows and batches the numbers are exactly capture_input_stats's.
  /// Throws when the model cannot be split into stages.
  std::map<std::string, InputStats> capture_block_input_stats(int64_t block, const std::vector<StageState>& inputs,
                                                              bool with_xtx) const;

  /// The model as stages (model/stages.h), split from the forward graph at the blocks on first use;
  /// null when the graph cannot be split, with the reason in stages_unavailable_reason().
  const ModelStages* stages() const;
  const std::string& stages_unavailable_reason() const;
  /// Position of a block (by its prefix, "layers.3") in blocks() and in the stages; -1 when unknown.
  int64_t block_position(const std::string& block) const;

  torch::jit::Module& module() { return module_; }
  const torch::jit::Module& module() const { return module_; }

  /// The dtype of the model's matrix weights in its file: float32, float16 or bfloat16.
  at::ScalarType dtype() const { return dtype_; }
  /// The dtype a parameter or buffer (by path) has in the model's file. Tensors are held in that
  /// dtype, except float16 ones on a CPU: libtorch 1.13 has no float16 CPU kernels for matmul, norms or
  /// softmax, so they are computed in float32 and converted back wherever the model is written.
  at::ScalarType stored_dtype(const std::string& path, at::ScalarType held) const;
  /// module() with every tensor in its stored dtype: module() itself, or a converted deep copy.
  torch::jit::Module stored_module() const;

 private:
  void analyze(const AdapterOptions& options);
  /// The matrix weight `name`; throws listing the quantizable weights when there is none.
  const WeightInfo& matrix_info(const std::string& name) const;
  /// Inserts into an inlined forward graph a tap (an identity that records its input while
  /// statistics are collected) in front of every matmul a quantizable weight feeds, one for the
  /// weights whose one matmul reads the same value.
  void insert_taps(torch::jit::Graph& graph) const;
  void hold_in_compute_dtype();

  mutable torch::jit::Module module_;
  std::vector<WeightInfo> weights_;
  std::vector<WeightInfo> matrix_weights_;
  std::vector<BlockInfo> blocks_;
  /// Originals of the weights set_weight() changed and restore() has not put back, in the stored
  /// layout of their parameter and their file dtype (an fp16 weight held in float32 is kept in fp16,
  /// which is exact).
  std::map<std::string, at::Tensor> originals_;
  std::map<std::string, at::ScalarType> stored_dtypes_;  ///< tensors held in another dtype than stored
  at::ScalarType dtype_ = at::kFloat;
  int64_t vocab_size_ = 0;
  bool split_stages_ = true;
  mutable std::shared_ptr<ModelStages> stages_;
  mutable std::optional<std::string> stages_reason_;  ///< set once a split was tried
};

}  // namespace gradq
