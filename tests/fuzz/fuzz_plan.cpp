// The plan reader (gradq quantize --plan).
#include "fuzz_common.h"
#include "optimizer/plan.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  gradq::fuzz::expect_only_gradq_errors([&] {
    const gradq::Plan plan = gradq::Plan::from_json(gradq::fuzz::as_string(data, size));
    // An accepted plan writes back to a plan that reads as the same entries.
    const gradq::Plan again = gradq::Plan::from_json(plan.to_json());
    if (again.entries.size() != plan.entries.size()) std::abort();
  });
  return 0;
}
