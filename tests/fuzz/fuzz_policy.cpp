// The constraint and dynamic policy readers (--policy, --dynamic-policy). Both read every input.
#include "fuzz_common.h"
#include "optimizer/policy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = gradq::fuzz::as_string(data, size);
  gradq::fuzz::expect_only_gradq_errors([&] { gradq::PrecisionPolicy::from_json(text); });
  gradq::fuzz::expect_only_gradq_errors([&] { gradq::DynamicPolicy::from_json(text); });
  return 0;
}
