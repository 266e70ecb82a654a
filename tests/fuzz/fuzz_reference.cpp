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

// GRADQ_FUZZ_WRITE_SEED=<path> writes a valid reference for the fuzzer's windows (the seeds in
// tests/fuzz/corpus/reference) and exits, so the seeds always match the windows above;
// GRADQ_FUZZ_SEED_STORAGE=fp16|top<K> writes one of that storage (default fp32).
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* path = std::getenv("GRADQ_FUZZ_WRITE_SEED")) {
    const char* storage = std::getenv("GRADQ_FUZZ_SEED_STORAGE");
    const gradq::Windows w = fuzz_windows();
    at::Tensor scored = at::arange(w.inputs.size(1)).unsqueeze(0) >= w.score_from.unsqueeze(1);
    at::Tensor targets = w.targets.index({scored});
    gradq::Reference r = gradq::Reference::from_log_probs(at::log_softmax(at::randn({targets.size(0), 7}), -1), targets,
                                                          gradq::ReferenceStorage::parse(storage ? storage : "fp32"));
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
