#include "support/gpt_fixture.h"

#include <fmt/format.h>

namespace gradq::test {
namespace {
// Every module here is its own type in its own compilation unit; types that share a qualified name
// send TorchScript's resolver into unbounded recursion, so each gets a unique name.
c10::QualifiedName qualified(const std::string& name) {
  static int counter = 0;
  return c10::QualifiedName("__torch__.gpt_fixture." + name + "_" + std::to_string(counter++));
}

torch::jit::Module with_params(const c10::QualifiedName& name, std::vector<std::pair<std::string, at::Tensor>> params) {
  torch::jit::Module m(name);
  for (auto& [n, t] : params) m.register_parameter(n, t, false);
  return m;
}
}  // namespace

torch::jit::Module make_gpt_fixture(const GptConfig& c, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  auto randn = [&](std::vector<int64_t> shape, double std) { return at::normal(0.0, std, shape, gen); };
  const int64_t d = c.dim, hd = d / c.heads;

  torch::jit::Module h(qualified("H"));
  for (int64_t l = 0; l < c.layers; ++l) {
    auto ln = [&] { return with_params(qualified("LayerNorm"), {{"weight", 1 + randn({d}, 0.05)}, {"bias", randn({d}, 0.02)}}); };
    auto conv1d = [&](int64_t in, int64_t out) {
      return with_params(qualified("Conv1D"), {{"weight", randn({in, out}, 0.5 / std::sqrt(double(in)))}, {"bias", randn({out}, 0.02)}});
    };
    torch::jit::Module attn(qualified("Attention"));
    attn.register_module("c_attn", conv1d(d, 3 * d));
    attn.register_module("c_proj", conv1d(d, d));
    attn.define(fmt::format(R"(
def forward(self, x, mask):
    B = x.size(0)
    T = x.size(1)
    qkv = torch.matmul(x, self.c_attn.weight) + self.c_attn.bias
    q, k, v = qkv.split({d}, 2)
    q = q.view(B, T, {nh}, {hd}).transpose(1, 2)
    k = k.view(B, T, {nh}, {hd}).transpose(1, 2)
    v = v.view(B, T, {nh}, {hd}).transpose(1, 2)
    att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / {scale} + mask, -1)
    y = torch.matmul(att, v).transpose(1, 2).reshape(B * T, {d})
    return torch.addmm(self.c_proj.bias, y, self.c_proj.weight).view(B, T, {d})
)", fmt::arg("d", d), fmt::arg("nh", c.heads), fmt::arg("hd", hd), fmt::arg("scale", std::sqrt(double(hd)))));
    torch::jit::Module mlp(qualified("MLP"));
    mlp.register_module("c_fc", conv1d(d, 4 * d));
    mlp.register_module("c_proj", conv1d(4 * d, d));
    mlp.define(R"(
def forward(self, x):
    h = torch.matmul(x, self.c_fc.weight) + self.c_fc.bias
    h = 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    return torch.matmul(h, self.c_proj.weight) + self.c_proj.bias
)");
    torch::jit::Module block(qualified("GPTBlock"));
    block.register_module("ln_1", ln());
    block.register_module("attn", attn);
    block.register_module("ln_2", ln());
    block.register_module("mlp", mlp);
    block.define(R"(
def forward(self, x, mask):
    x = x + self.attn.forward(torch.layer_norm(x, [x.size(-1)], self.ln_1.weight, self.ln_1.bias, 1e-5), mask)
    return x + self.mlp.forward(torch.layer_norm(x, [x.size(-1)], self.ln_2.weight, self.ln_2.bias, 1e-5))
)");
    h.register_module(std::to_string(l), block);
  }
  std::string chain = "def forward(self, x, mask):\n";
  for (int64_t l = 0; l < c.layers; ++l) chain += fmt::format("    x = getattr(self, \"{}\").forward(x, mask)\n", l);
  h.define(chain + "    return x\n");

  torch::jit::Module transformer(qualified("Transformer"));
  transformer.register_module("wte", with_params(qualified("Embedding"), {{"weight", randn({c.vocab, d}, 0.1)}}));
  transformer.register_module("wpe", with_params(qualified("Embedding"), {{"weight", randn({c.positions, d}, 0.02)}}));
  transformer.register_module("h", h);
  transformer.register_module("ln_f", with_params(qualified("LayerNorm"), {{"weight", 1 + randn({d}, 0.05)}, {"bias", randn({d}, 0.02)}}));

  torch::jit::Module model(qualified("GPT2LMHeadModel"));
  model.register_module("transformer", transformer);
  model.register_module("lm_head", with_params(qualified("Linear"), {{"weight", randn({c.vocab, d}, 0.5 / std::sqrt(double(d)))}}));
  model.define(R"(
def forward(self, tokens):
    T = tokens.size(1)
    pos = torch.arange(T)
    x = torch.embedding(self.transformer.wte.weight, tokens) + torch.embedding(self.transformer.wpe.weight, pos)
    mask = torch.triu(torch.full([T, T], float("-inf")), 1)
    x = self.transformer.h.forward(x, mask)
    x = torch.layer_norm(x, [x.size(-1)], self.transformer.ln_f.weight, self.transformer.ln_f.bias, 1e-5)
    return torch.linear(x, self.lm_head.weight)
)");
  model.eval();
  return model;
}

torch::jit::Module make_gpt_fixture_with_defaulted_inputs() {
  GptConfig config;
  config.layers = 2;
  torch::jit::Module wrapper("WithDefaultedInputs");
  wrapper.register_module("inner", make_gpt_fixture(config));
  wrapper.define(
      "def forward(self, tokens, attention_mask: Optional[Tensor] = None, scale: float = 1.0):\n"
      "    x = self.inner.forward(tokens)\n"
      "    if attention_mask is not None:\n"
      "        x = x * attention_mask.unsqueeze(-1)\n"
      "    return x * scale\n");
  return wrapper;
}

}  // namespace gradq::test
