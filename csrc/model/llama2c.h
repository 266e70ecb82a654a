#pragma once
// llama2.c "legacy" checkpoints (karpathy/llama2.c run.c format) to TorchScript.
//
// The TorchScript module's parameters (Meta Llama naming; L = layer index):
//   tok_embeddings.weight                  [vocab, dim]
//   layers.L.attention_norm.weight         [dim]
//   layers.L.attention.wq.weight           [n_heads * head_size, dim]
//   layers.L.attention.wk.weight           [n_kv_heads * head_size, dim]
//   layers.L.attention.wv.weight           [n_kv_heads * head_size, dim]
//   layers.L.attention.wo.weight           [dim, n_heads * head_size]
//   layers.L.ffn_norm.weight               [dim]
//   layers.L.feed_forward.w1.weight        [hidden_dim, dim]   (gate)
//   layers.L.feed_forward.w2.weight        [dim, hidden_dim]   (down)
//   layers.L.feed_forward.w3.weight        [hidden_dim, dim]   (up)
//   norm.weight                            [dim]
//   output.weight                          [vocab, dim]        only when the classifier is untied
// forward(tokens: int64 [B, T]) -> logits [B, T, vocab] in the parameters' dtype; T <= seq_len.

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>

#include <torch/script.h>

namespace gradq {

struct Llama2cConfig {
  int32_t dim = 0;
  int32_t hidden_dim = 0;
  int32_t n_layers = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t vocab_size = 0;  ///< absolute value; the sign in the file is `shared_classifier`
  int32_t seq_len = 0;
  bool shared_classifier = true;

  int32_t head_size() const { return dim / n_heads; }
  int32_t kv_dim() const { return head_size() * n_kv_heads; }
};

/// A llama2.c checkpoint's header and its tensors under the names above.
struct Llama2cCheckpoint {
  Llama2cConfig config;
  std::unordered_map<std::string, at::Tensor> weights;
};

/// Validates and splits the bytes of a llama2.c legacy checkpoint (`path` names it in errors) into
/// tensors in `dtype`; throws gradq::Error for a truncated, oversized or corrupt file (non-finite
/// weights), an impossible header, or a weight beyond `dtype`'s range, naming the values. The one
/// reader of the format: load_llama2c calls it on the file.
/// `consumed(begin, end)`, when given, is told each byte range of `bytes` once its tensor is copied.
Llama2cCheckpoint parse_llama2c(std::string_view bytes, const std::string& path, at::ScalarType dtype = at::kFloat,
                                const std::function<void(size_t begin, size_t end)>& consumed = nullptr);

/// Reads (memory-mapped) and validates a llama2.c legacy checkpoint, with parameters in `dtype`;
/// throws gradq::Error as parse_llama2c does. Holds the parameters and one tensor being converted:
/// no copy of the file (its pages are the page cache's, released as each tensor is copied).
torch::jit::Module load_llama2c(const std::string& path, Llama2cConfig* config_out = nullptr,
                                at::ScalarType dtype = at::kFloat);

/// Converts and saves atomically with parameters in `dtype` (float32, float16 or bfloat16); refuses to
/// write over the input. Returns the checkpoint's header.
Llama2cConfig convert_llama2c(const std::string& input_path, const std::string& output_path,
                              at::ScalarType dtype = at::kFloat);

/// Builds the TorchScript Llama from a config and its tensors (used by the converter and by tests
/// that need a Llama of another shape). `weights` holds every name listed above.
torch::jit::Module build_llama_module(const Llama2cConfig& config,
                                      const std::unordered_map<std::string, at::Tensor>& weights);

}  // namespace gradq
