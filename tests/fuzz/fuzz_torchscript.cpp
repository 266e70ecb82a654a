// Loading a TorchScript model as far as gradq controls it: torch::jit::load's errors turned into
// gradq::Error, then the adapter (CausalLM: the probe forward, the logits checks, the weight and
// block analysis and the stage split). libtorch's own archive reader is not instrumented, so only
// what it hands back to gradq is checked here.
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "fuzz_common.h"
#include "model/causal_lm.h"

// GRADQ_FUZZ_WRITE_SEED=<path> writes the seed of tests/fuzz/corpus/torchscript (a two-block causal
// LM of a few kB) and exits.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* path = std::getenv("GRADQ_FUZZ_WRITE_SEED")) {
    torch::jit::Module block("Block");
    block.register_parameter("weight", at::randn({4, 4}), false);
    block.define("def forward(self, x):\n    return x + torch.relu(torch.matmul(x, self.weight.t()))\n");
    torch::jit::Module model("Model");
    model.register_parameter("embed", at::randn({6, 4}), false);
    model.register_module("b0", block.clone());
    model.register_module("b1", block.clone());
    model.register_parameter("head", at::randn({6, 4}), false);
    model.define(
        "def forward(self, tokens):\n"
        "    x = torch.embedding(self.embed, tokens)\n"
        "    x = self.b1.forward(self.b0.forward(x))\n"
        "    return torch.matmul(x, self.head.t())\n");
    model.save(path);
    std::printf("wrote %s\n", path);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  gradq::fuzz::expect_only_gradq_errors([&] {
    std::istringstream in(gradq::fuzz::as_string(data, size));
    gradq::CausalLM model = gradq::CausalLM::load(in, "fuzz.pt");
    if (model.vocab_size() <= 0) std::abort();
  });
  return 0;
}
