#pragma once
// The second model fixture: a GPT-2-style causal LM built another way than the llama2.c converter,
// with learned positions, LayerNorm with biases, a GELU MLP, an untied head, Hugging Face names
// (transformer.h.L.attn.c_attn.weight ...) and Conv1D weights stored [in, out] and applied as
// x @ W + b (one of them through torch.addmm). Seeded random weights.

#include <torch/script.h>

namespace gradq::test {

struct GptConfig {
  int64_t vocab = 512;
  int64_t dim = 32;
  int64_t heads = 4;
  int64_t layers = 12;  ///< more than 10, so numeric block order is tested
  int64_t positions = 128;
};

torch::jit::Module make_gpt_fixture(const GptConfig& config = {}, uint64_t seed = 1234);

/// A 2-layer fixture inside a scripted forward with defaulted inputs after the tokens, as a user's
/// Hugging Face-style forward has them: forward(tokens, attention_mask: Optional[Tensor] = None,
/// scale: float = 1.0); a given mask multiplies each position's logits.
torch::jit::Module make_gpt_fixture_with_defaulted_inputs();

}  // namespace gradq::test
