// The importance analysis reader (gradq quantize --analysis).
#include "fuzz_common.h"
#include "importance/analyzer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  gradq::fuzz::expect_only_gradq_errors([&] { gradq::analysis_from_json(gradq::fuzz::as_string(data, size)); });
  return 0;
}
