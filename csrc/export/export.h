#pragma once
// Writing quantized models as TorchScript.
//
// Packed export: a new module tree that mirrors the model's (same submodule and attribute names, so
// state-dict paths are unchanged) with one class type per submodule, and one method, forward: the
// model's forward with every method call inlined and then rewritten so that each quantized weight
//   integer level  is stored as buffers <name>_codes, <name>_scales, <name>_zeros (asymmetric only),
//                  and each aten::linear(x, W, b) that reads it becomes gradq::linear(x, codes,
//                  scales, zeros, b, bits, group_size, in_features); any other use (an embedding
//                  lookup, a Conv1D-style matmul) reads gradq::dequantize(...) instead;
//   fp16/bf16/fp32 is stored in that type and converted to the weight's dtype where it is read;
//   prune          is stored as a broadcast zero (one element of storage).
// Every quantized weight reads back in its dtype in the model's file (CausalLM::stored_dtype):
// gradq::linear returns its input's dtype, and a weight that is not float32 gets an empty buffer
// <name>_dtype whose dtype its reads convert to, so the packed model follows a conversion of its
// floating tensors (Python module.float()).
// Loading the file needs the gradq ops registered (libgradq_ops, torch.ops.load_library in Python).
// Submodule methods are not carried over: the packed model is called through forward only.
//
// Fake-quant export: the model's own graph and types with each quantized weight replaced by its
// dequantized values, for consumers without gradq (no size reduction).
//
// Both write deterministic bytes atomically (same model and weights, same file).

#include <torch/script.h>

#include <map>
#include <string>

#include "model/causal_lm.h"
#include "quant/quantized_tensor.h"

namespace gradq {

/// The packed module for `model` with `weights` (see above). Throws gradq::Error when a name is not
/// a matrix weight of the model or its shape differs from the model's.
torch::jit::Module build_packed_module(const CausalLM& model, const QuantizedWeights& weights);

/// build_packed_module + save_module (model/model_loader.h).
void export_packed(const CausalLM& model, const QuantizedWeights& weights, const std::string& path);

/// Saves `model` with each weight of `weights` replaced by its dequantized values, every tensor in
/// its dtype in the model's file; `model` is unchanged afterwards.
void export_fake_quant(CausalLM& model, const QuantizedWeights& weights, const std::string& path);

}  // namespace gradq
