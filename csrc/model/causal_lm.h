#pragma once
// CausalLM: the adapter between gradq and any TorchScript causal LM whose forward maps
// tokens int64 [B, T] to logits [B, T, vocab] in any float dtype (parameters fp32, fp16 or bf16).
//
// TorchScript in C++ has no forward hooks, so everything that needs to know how a parameter is
// used reads an inlined copy of the forward graph: a 2-D floating parameter is a matrix weight
// when it feeds aten::linear (stored [out, in]) or aten::matmul/mm/addmm as the right operand
// (stored [in, out], GPT-2 Conv1D style, unless transposed on the way). Input statistics are
// captured by running an instrumented copy of that graph in which a tap op (observe_input's
// recorder) sits in front of each weight's matmul; the model's own graph and outputs are untouched.
// The weights' bookkeeping (setting, restoring, the originals) is QuantizableModel's.

#include <torch/script.h>

#include <istream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "model/quantizable_model.h"
#include "model/stages.h"

namespace gradq {

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
  /// Where the model runs: its tensors are loaded onto (or moved to) this device. Unset: where the
  /// file puts them (a llama2.c model: the CPU).
  std::optional<at::Device> device;
};

/// The device a `--device` value names: "cpu", "cuda", "cuda:N", or "auto" (the first GPU when this
/// gradq's libtorch has CUDA and sees one, else the CPU). Throws gradq::Error naming the value and
/// what is missing (an unknown name, no CUDA in this libtorch, no such GPU).
at::Device parse_device(const std::string& text);

class CausalLM : public QuantizableModel {
 public:
  /// Loads a TorchScript file; throws gradq::Error if it is missing, not TorchScript, or its
  /// forward does not map int64 [B, T] tokens to [B, T, V] logits.
  static CausalLM load(const std::string& path, const AdapterOptions& options = {});
  /// The same from a stream of the file's bytes (`path` names it in errors).
  static CausalLM load(std::istream& in, const std::string& path, const AdapterOptions& options = {});
  explicit CausalLM(torch::jit::Module module, const AdapterOptions& options = {});

  /// Logits [B, T, V] of the module's forward, in its dtype and the caller's autograd mode.
  at::Tensor forward(const at::Tensor& tokens) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  /// The device of the model's parameters (the CPU for a model without any).
  at::Device device() const override;
  /// module().named_parameters(), recursively.
  std::vector<std::pair<std::string, at::Tensor>> parameters() const override;

  /// The model as stages (model/stages.h), split from the forward graph at the blocks on first use;
  /// null when the graph cannot be split, with the reason in stages_unavailable_reason().
  const ModelStages* stages() const override;
  /// The stages with shared ownership: they hold the module's parameters, so they stay usable after
  /// this CausalLM is gone.
  std::shared_ptr<const ModelStages> shared_stages() const override;
  const std::string& stages_unavailable_reason() const override;

  torch::jit::Module& module() { return module_; }
  const torch::jit::Module& module() const { return module_; }

  /// The dtype a parameter or buffer (by path) has in the model's file. Tensors are held in that
  /// dtype, except float16 ones on a CPU: libtorch 1.13 has no float16 CPU kernels for matmul, norms or
  /// softmax, so they are computed in float32 and converted back wherever the model is written.
  at::ScalarType stored_dtype(const std::string& path, at::ScalarType held) const override;
  /// module() as it is written to a file: every tensor in its stored dtype and on the CPU (a file
  /// that loads anywhere). module() itself, or a converted deep copy; the copy is made on the
  /// model's device first, so a model on a GPU briefly needs its size twice there.
  torch::jit::Module stored_module() const;

 protected:
  /// Runs a copy of the forward graph with a tap in front of every quantizable weight's matmul.
  std::function<void(const at::Tensor& tokens)> observed_forward() const override;

 private:
  void analyze(const AdapterOptions& options);
  /// Inserts into an inlined forward graph a tap (an identity that records its input while
  /// statistics are collected) in front of every matmul a quantizable weight feeds, one for the
  /// weights whose one matmul reads the same value.
  void insert_taps(torch::jit::Graph& graph) const;
  void hold_in_compute_dtype();

  mutable torch::jit::Module module_;
  std::map<std::string, at::ScalarType> stored_dtypes_;  ///< tensors held in another dtype than stored
  int64_t vocab_size_ = 0;
  bool split_stages_ = true;
  mutable std::shared_ptr<ModelStages> stages_;
  mutable std::optional<std::string> stages_reason_;  ///< set once a split was tried
};

}  // namespace gradq
