// The llama2.c checkpoint reader (header, sizes, finiteness, tensor split). Building the TorchScript
// module from an accepted checkpoint is not fuzzed: it takes only the validated header's integers.
#include "fuzz_common.h"
#include "model/llama2c.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  gradq::fuzz::expect_only_gradq_errors([&] {
    const std::string bytes = gradq::fuzz::as_string(data, size);
    const gradq::Llama2cCheckpoint c = gradq::parse_llama2c(bytes, "fuzz.bin");
    // Every accepted tensor lies inside the input: their floats add up to at most the file's.
    int64_t floats = 0;
    for (const auto& [name, t] : c.weights) floats += t.numel();
    if (floats * 4 > static_cast<int64_t>(size)) std::abort();
  });
  return 0;
}
