// The sweep readers: a previous sweep.json (the regression gate reads it and compares it with the
// current sweep; its points are also plotted) and --shard's "i/n".
#include "fuzz_common.h"
#include "sweep/sweep.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text = gradq::fuzz::as_string(data, size);
  gradq::fuzz::expect_only_gradq_errors([&] {
    const gradq::SweepResult previous = gradq::sweep_from_json(text);
    gradq::find_regressions(previous, previous, {});
    gradq::pareto_svg(previous);
    gradq::sweep_markdown(previous);
  });
  gradq::fuzz::expect_only_gradq_errors([&] { gradq::Shard::parse(text); });
  return 0;
}
