// The reference-file reader (gradq eval --load-reference), then its check against the windows of
// an evaluation (set_reference), as gradq eval does.
#include <cstdio>
#include <cstdlib>

#include "eval/evaluator.h"
#include "fuzz_common.h"

namespace {

gradq::Windows fuzz_windows() {
  std::vector<int64_t> tokens(40);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int64_t>(i % 7);
  gradq::WindowSpec spec;
  spec.ctx = 8;
  spec.stride = 8;
  return gradq::make_windows(tokens, spec);
}

}  // namespace

// GRADQ_FUZZ_WRITE_SEED=<path> writes a valid reference for the fuzzer's windows (the seed in
// tests/fuzz/corpus/reference) and exits, so the seed always matches the windows above.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* path = std::getenv("GRADQ_FUZZ_WRITE_SEED")) {
    const gradq::Windows w = fuzz_windows();
    at::Tensor scored = at::arange(w.inputs.size(1)).unsqueeze(0) >= w.score_from.unsqueeze(1);
    gradq::Reference r;
    r.targets = w.targets.index({scored});
    r.log_probs = at::log_softmax(at::randn({r.targets.size(0), 7}), -1);
    r.windows_fingerprint = w.inputs;
    r.save(path);
    std::printf("wrote %s\n", path);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static gradq::GradualEvaluator evaluator(fuzz_windows());
  gradq::fuzz::expect_only_gradq_errors([&] {
    gradq::Reference r = gradq::Reference::from_bytes(gradq::fuzz::as_string(data, size), "fuzz.ref");
    evaluator.set_reference(std::move(r));
  });
  return 0;
}
