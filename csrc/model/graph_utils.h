#pragma once
// Reading TorchScript graphs: inlined forward graphs and the parameter paths their values hold.

#include <torch/script.h>

#include <memory>
#include <set>
#include <string>
#include <unordered_map>

namespace gradq {

/// A copy of `module`'s forward graph with every method call inlined, so that the attribute
/// reads of all submodules appear as prim::GetAttr chains from the graph's `self` input.
std::shared_ptr<torch::jit::Graph> inlined_forward_graph(const torch::jit::Module& module);

/// The logits in what a causal LM's forward returns: the value itself when it is a tensor, the first
/// element of a tuple (Hugging Face models with return_dict=False or torchscript=True), or the
/// "logits" entry of a dict (a Hugging Face model traced with strict=False). Throws, naming the type,
/// when the output is none of these.
at::Tensor logits_of(const c10::IValue& output);

/// The graph value logits_of() reads: `graph`'s single output when it is a tensor, else the tensor
/// that its tuple starts with or its dict holds under "logits"; nullptr when there is none.
torch::jit::Value* logits_value(torch::jit::Graph& graph);

/// For every prim::GetAttr output in `graph` (recursively into blocks), its dotted path from self,
/// e.g. "layers.0.attention.wq.weight".
std::unordered_map<const torch::jit::Value*, std::string> attribute_paths(const torch::jit::Graph& graph);

/// Dotted paths of the attributes that `graph` reads only as the format arguments of gradq's ops
/// (codes, scales, zeros, sub_scales of gradq::linear and gradq::dequantize): a packed model's storage.
std::set<std::string> packed_format_tensors(const torch::jit::Graph& graph);

/// Kind of a matmul-like use of a weight value and whether it sees the weight as [in, out].
struct MatmulUse {
  torch::jit::Node* node = nullptr;  ///< aten::linear / matmul / mm / addmm
  size_t activation_input = 0;       ///< which input of node is the activation x
  bool weight_is_in_out = false;     ///< the op computes x @ W with W stored [in, out]
};

/// Matmul-like uses of `weight` (following aten::t / transpose / contiguous on the way).
std::vector<MatmulUse> matmul_uses(torch::jit::Value* weight);

/// True when `value` is read by aten::embedding as its weight.
bool used_as_embedding(torch::jit::Value* weight);

/// True when no matmul-like op consumes `node`'s output downstream (it produces the logits).
bool is_final_projection(torch::jit::Node* node);

}  // namespace gradq
