#include "model/llama2c.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/error.h"
#include "common/files.h"
#include "model/model_loader.h"

namespace gradq {
namespace {

constexpr int64_t kHeaderBytes = 7 * sizeof(int32_t);
// Limits that no real llama2.c checkpoint exceeds; they keep a corrupt header from requesting
// absurd allocations before the size check can reject it.
constexpr int64_t kMaxDim = 1 << 16;
constexpr int64_t kMaxLayers = 1 << 10;
constexpr int64_t kMaxVocab = 1 << 22;
constexpr int64_t kMaxSeqLen = 1 << 20;

void validate_header(const Llama2cConfig& c, const std::string& path) {
  auto in_range = [&](const char* name, int64_t v, int64_t hi) {
    GRADQ_CHECK(v > 0 && v <= hi, "'{}' is not a llama2.c checkpoint: header field {} = {} (expected 1..{})", path,
                name, v, hi);
  };
  in_range("dim", c.dim, kMaxDim);
  in_range("hidden_dim", c.hidden_dim, kMaxDim * 8);
  in_range("n_layers", c.n_layers, kMaxLayers);
  in_range("n_heads", c.n_heads, kMaxDim);
  in_range("n_kv_heads", c.n_kv_heads, kMaxDim);
  in_range("vocab_size", c.vocab_size, kMaxVocab);
  in_range("seq_len", c.seq_len, kMaxSeqLen);
  GRADQ_CHECK(c.dim % c.n_heads == 0, "'{}': dim {} is not divisible by n_heads {}", path, c.dim, c.n_heads);
  GRADQ_CHECK(c.n_kv_heads <= c.n_heads && c.n_heads % c.n_kv_heads == 0,
              "'{}': n_heads {} must be a multiple of n_kv_heads {}", path, c.n_heads, c.n_kv_heads);
  GRADQ_CHECK(c.head_size() % 2 == 0, "'{}': head size {} must be even for rotary embeddings", path,
              c.head_size());
}

// The run.c script of one module type: defined once on the first instance, shared by the rest.
const char* kRmsNormSource = R"(
def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight
)";

const char* kLinearSource = R"(
def forward(self, x):
    return torch.linear(x, self.weight)
)";

const char* kFeedForwardSource = R"(
def forward(self, x):
    gate = self.w1.forward(x)
    return self.w2.forward(gate * torch.sigmoid(gate) * self.w3.forward(x))
)";

// Rotary embedding on adjacent pairs (2i, 2i+1), as llama2.c's run.c applies it. The model's forward
// computes the angles in float32 and hands the tables and the mask over in the activations' dtype,
// so the module runs in whatever float dtype its parameters are converted to.
std::string attention_source(const Llama2cConfig& c) {
  return fmt::format(R"(
def rope(self, x, cos, sin):
    B = x.size(0)
    T = x.size(1)
    H = x.size(2)
    pairs = x.reshape(B, T, H, {half}, 2)
    x0 = pairs.select(-1, 0)
    x1 = pairs.select(-1, 1)
    c = cos.view(1, T, 1, {half})
    s = sin.view(1, T, 1, {half})
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).reshape(B, T, H, {hs})

def forward(self, x, cos, sin, mask):
    B = x.size(0)
    T = x.size(1)
    q = self.rope(self.wq.forward(x).view(B, T, {nh}, {hs}), cos, sin).transpose(1, 2)
    k = self.rope(self.wk.forward(x).view(B, T, {nkv}, {hs}), cos, sin).transpose(1, 2)
    v = self.wv.forward(x).view(B, T, {nkv}, {hs}).transpose(1, 2)
    k = k.repeat_interleave({kv_mul}, 1)
    v = v.repeat_interleave({kv_mul}, 1)
    scores = torch.matmul(q, k.transpose(2, 3)) * {scale} + mask
    out = torch.matmul(torch.softmax(scores, -1), v)
    return self.wo.forward(out.transpose(1, 2).reshape(B, T, {qdim}))
)",
                     fmt::arg("half", c.head_size() / 2), fmt::arg("hs", c.head_size()), fmt::arg("nh", c.n_heads),
                     fmt::arg("nkv", c.n_kv_heads), fmt::arg("kv_mul", c.n_heads / c.n_kv_heads),
                     fmt::arg("scale", fmt::format("{:.17g}", 1.0 / std::sqrt(static_cast<double>(c.head_size())))),
                     fmt::arg("qdim", c.n_heads * c.head_size()));
}

const char* kBlockSource = R"(
def forward(self, x, cos, sin, mask):
    h = x + self.attention.forward(self.attention_norm.forward(x), cos, sin, mask)
    return h + self.feed_forward.forward(self.ffn_norm.forward(h))
)";

std::string layers_source(int32_t n_layers) {
  std::string body = "def forward(self, x, cos, sin, mask):\n";
  for (int32_t i = 0; i < n_layers; ++i) body += fmt::format("    x = getattr(self, \"{}\").forward(x, cos, sin, mask)\n", i);
  return body + "    return x\n";
}

// The rotary angles and the mask are made on the tokens' device, so that the model (and its packed
// export, which keeps this forward) runs where it is moved to, a GPU included.
std::string model_source(const Llama2cConfig& c) {
  return fmt::format(R"(
def forward(self, tokens):
    T = tokens.size(1)
    assert T <= {seq_len}, "sequence longer than the model's seq_len {seq_len}"
    x = torch.embedding(self.tok_embeddings.weight, tokens)
    inv_freq = 1.0 / torch.pow(10000.0, torch.arange(0, {hs}, 2, device=tokens.device).float() / {hs})
    angles = torch.outer(torch.arange(T, device=tokens.device).float(), inv_freq)
    mask = torch.triu(torch.full([T, T], float("-inf"), dtype=x.dtype, device=x.device), 1)
    x = self.layers.forward(x, torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype), mask)
    return torch.linear(self.norm.forward(x), self.{head}.weight)
)",
                     fmt::arg("seq_len", c.seq_len), fmt::arg("hs", c.head_size()),
                     fmt::arg("head", c.shared_classifier ? "tok_embeddings" : "output"));
}

// Creates modules that share one class type per kind, as a scripted Python model's layers do.
class ModuleFactory {
 public:
  torch::jit::Module make(const std::string& kind) {
    auto it = types_.find(kind);
    if (it == types_.end()) {
      torch::jit::Module m(c10::QualifiedName("__torch__.gradq.llama." + kind), cu_, /*shouldMangle=*/false);
      types_.emplace(kind, m.type());
      return m;
    }
    return torch::jit::Module(cu_, it->second);
  }
  bool defined(const torch::jit::Module& m) const { return m.find_method("forward").has_value(); }

 private:
  std::shared_ptr<torch::jit::CompilationUnit> cu_ = std::make_shared<torch::jit::CompilationUnit>();
  std::unordered_map<std::string, c10::ClassTypePtr> types_;
};

}  // namespace

torch::jit::Module build_llama_module(const Llama2cConfig& c, const std::unordered_map<std::string, at::Tensor>& weights) {
  auto weight = [&](const std::string& name) {
    auto it = weights.find(name);
    GRADQ_CHECK(it != weights.end(), "missing weight '{}'", name);
    return it->second;
  };
  ModuleFactory factory;
  auto with_weight = [&](const std::string& kind, const std::string& name, const char* source) {
    torch::jit::Module m = factory.make(kind);
    m.register_parameter("weight", weight(name), /*is_buffer=*/false);
    if (!factory.defined(m)) m.define(source);
    return m;
  };

  torch::jit::Module model = factory.make("Llama");
  torch::jit::Module embeddings = factory.make("Embedding");
  embeddings.register_parameter("weight", weight("tok_embeddings.weight"), false);
  model.register_module("tok_embeddings", embeddings);

  torch::jit::Module layers = factory.make("Layers");
  const std::string attention_src = attention_source(c);
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const std::string p = fmt::format("layers.{}.", l);
    torch::jit::Module attention = factory.make("Attention");
    for (const char* w : {"wq", "wk", "wv", "wo"})
      attention.register_module(w, with_weight("Linear", p + "attention." + w + ".weight", kLinearSource));
    if (!factory.defined(attention)) attention.define(attention_src);
    torch::jit::Module ffn = factory.make("FeedForward");
    for (const char* w : {"w1", "w2", "w3"})
      ffn.register_module(w, with_weight("Linear", p + "feed_forward." + w + ".weight", kLinearSource));
    if (!factory.defined(ffn)) ffn.define(kFeedForwardSource);

    torch::jit::Module block = factory.make("Block");
    block.register_module("attention_norm", with_weight("RMSNorm", p + "attention_norm.weight", kRmsNormSource));
    block.register_module("attention", attention);
    block.register_module("ffn_norm", with_weight("RMSNorm", p + "ffn_norm.weight", kRmsNormSource));
    block.register_module("feed_forward", ffn);
    if (!factory.defined(block)) block.define(kBlockSource);
    layers.register_module(std::to_string(l), block);
  }
  layers.define(layers_source(c.n_layers));
  model.register_module("layers", layers);
  model.register_module("norm", with_weight("RMSNorm", "norm.weight", kRmsNormSource));
  if (!c.shared_classifier) model.register_module("output", with_weight("Linear", "output.weight", kLinearSource));
  model.define(model_source(c));
  model.eval();
  return model;
}

Llama2cCheckpoint parse_llama2c(std::string_view bytes, const std::string& path, at::ScalarType dtype,
                                const std::function<void(size_t begin, size_t end)>& consumed) {
  const int64_t file_bytes = static_cast<int64_t>(bytes.size());
  GRADQ_CHECK(file_bytes >= kHeaderBytes, "'{}' is truncated: {} bytes, a llama2.c header alone needs {}", path,
              file_bytes, kHeaderBytes);
  int32_t header[7];
  std::memcpy(header, bytes.data(), kHeaderBytes);

  Llama2cConfig c;
  c.dim = header[0];
  c.hidden_dim = header[1];
  c.n_layers = header[2];
  c.n_heads = header[3];
  c.n_kv_heads = header[4];
  c.shared_classifier = header[5] > 0;
  c.vocab_size = header[5] == INT32_MIN ? 0 : std::abs(header[5]);
  c.seq_len = header[6];
  validate_header(c, path);

  const int64_t dim = c.dim, hidden = c.hidden_dim, L = c.n_layers, kv = c.kv_dim(), vocab = c.vocab_size;
  const int64_t q_dim = static_cast<int64_t>(c.n_heads) * c.head_size();
  const int64_t per_layer = 2 * dim + q_dim * dim + 2 * kv * dim + dim * q_dim + 3 * hidden * dim;
  const int64_t body = vocab * dim + L * per_layer + dim;
  const int64_t rope_tables = static_cast<int64_t>(c.seq_len) * c.head_size();  // two tables of seq_len x head/2
  const int64_t classifier = c.shared_classifier ? 0 : vocab * dim;
  const int64_t expected_full = kHeaderBytes + 4 * (body + rope_tables + classifier);
  // A tied checkpoint may end right after rms_final: the RoPE tables are optional for a reader.
  const int64_t expected_short = kHeaderBytes + 4 * body;
  const bool size_ok = file_bytes == expected_full || (c.shared_classifier && file_bytes == expected_short);
  GRADQ_CHECK(size_ok, "'{}' has {} bytes but its header (dim {}, hidden {}, layers {}, heads {}/{}, vocab {}{}, seq_len {}) "
              "implies {} bytes: the file is {}",
              path, file_bytes, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, vocab,
              c.shared_classifier ? " tied" : " untied", c.seq_len, expected_full,
              file_bytes < expected_full ? "truncated" : "oversized or not a llama2.c legacy checkpoint");

  Llama2cCheckpoint checkpoint;
  checkpoint.config = c;
  auto& weights = checkpoint.weights;
  // The weights follow the 28-byte header, so they are 4-byte aligned at best: from_blob on a
  // float pointer needs no more. Each tensor is copied out of `bytes` in `dtype` on its own (one
  // tensor in flight beside the result), checked while still float32 (a corrupt file) and after
  // the conversion (float16 has no finite value beyond 65504).
  const auto* data = reinterpret_cast<const float*>(bytes.data() + kHeaderBytes);
  int64_t offset = 0;
  auto take_at = [&](const std::string& name, int64_t at, const std::vector<int64_t>& shape) {
    const at::Tensor stored = at::from_blob(const_cast<float*>(data + at), shape, at::kFloat);
    GRADQ_CHECK(at::isfinite(stored).all().item<bool>(), "'{}' is corrupt: weight '{}' holds non-finite values", path,
                name);
    at::Tensor t = dtype == at::kFloat ? stored.clone() : stored.to(dtype);
    GRADQ_CHECK(at::isfinite(t).all().item<bool>(),
                "'{}': weight '{}' has values beyond {}'s range (largest magnitude {}); keep float32 or use bfloat16",
                path, name, dtype == at::kHalf ? "float16" : c10::toString(dtype), stored.abs().max().item<float>());
    weights[name] = std::move(t);
    if (consumed) {
      const size_t begin = kHeaderBytes + sizeof(float) * static_cast<size_t>(at);
      consumed(begin, begin + stored.nbytes());
    }
  };
  auto take = [&](const std::string& name, const std::vector<int64_t>& shape) {
    take_at(name, offset, shape);
    offset += c10::multiply_integers(shape);
  };
  // The file stores each weight for all layers together.
  auto per_layer_tensors = [&](const std::string& suffix, const std::vector<int64_t>& shape) {
    const int64_t n = c10::multiply_integers(shape);
    for (int64_t l = 0; l < L; ++l) take_at(fmt::format("layers.{}.{}", l, suffix), offset + l * n, shape);
    offset += L * n;
  };
  take("tok_embeddings.weight", {vocab, dim});
  per_layer_tensors("attention_norm.weight", {dim});
  per_layer_tensors("attention.wq.weight", {q_dim, dim});
  per_layer_tensors("attention.wk.weight", {kv, dim});
  per_layer_tensors("attention.wv.weight", {kv, dim});
  per_layer_tensors("attention.wo.weight", {dim, q_dim});
  per_layer_tensors("ffn_norm.weight", {dim});
  per_layer_tensors("feed_forward.w1.weight", {hidden, dim});
  per_layer_tensors("feed_forward.w2.weight", {dim, hidden});
  per_layer_tensors("feed_forward.w3.weight", {hidden, dim});
  take("norm.weight", {dim});
  if (!c.shared_classifier) {
    offset += rope_tables;
    take("output.weight", {vocab, dim});
  }
  return checkpoint;
}

torch::jit::Module load_llama2c(const std::string& path, Llama2cConfig* config_out, at::ScalarType dtype) {
  namespace fs = std::filesystem;
  GRADQ_CHECK(fs::exists(path), "checkpoint '{}' does not exist", path);
  GRADQ_CHECK(fs::is_regular_file(path), "checkpoint '{}' is not a regular file", path);
  const MappedFile file(path);
  const Llama2cCheckpoint checkpoint =
      parse_llama2c(file.bytes(), path, dtype, [&](size_t begin, size_t end) { file.release(begin, end); });
  if (config_out) *config_out = checkpoint.config;
  return build_llama_module(checkpoint.config, checkpoint.weights);
}

Llama2cConfig convert_llama2c(const std::string& input_path, const std::string& output_path, at::ScalarType dtype) {
  GRADQ_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "convert: the dtype must be float32, float16 or bfloat16, got {}", c10::toString(dtype));
  check_output_is_not_input(output_path, {input_path});
  Llama2cConfig config;
  save_module(load_llama2c(input_path, &config, dtype), output_path);
  return config;
}

}  // namespace gradq
