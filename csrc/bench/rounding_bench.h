#pragma once
// `gradq bench rounding`: time and layer output error of the rounding methods (csrc/quant) on
// random weights, CPU. Each weight W [out, in] is Gaussian (std 0.02); its calibration inputs are
// `rows` Gaussian rows with per-channel scales exp(N(0, 0.7^2)) (unequal channel magnitudes, as LLM
// activations), XtX their float64 sum of x^T x. Output error: trace((W - W_q) XtX (W - W_q)^T),
// also given relative to round-to-nearest's. Time: wall and process CPU seconds of one call of
// quantize_tensor (the library path every plan takes), XtX and the weight made beforehand.

#include <cstdint>
#include <string>
#include <vector>

#include "bench/kernel_bench.h"
#include "quant/quantized_tensor.h"

namespace gradq::bench {

struct RoundingBenchOptions {
  std::vector<QuantSpec> specs = {QuantSpec{}};
  std::vector<BenchShape> shapes = {{768, 768}, {256, 688}};
  std::vector<RoundingMethod> methods = {RoundingMethod::kRtn, RoundingMethod::kClip, RoundingMethod::kGptq,
                                         RoundingMethod::kTrained};
  RoundingOptions rounding;  ///< trained.iterations etc.
  int64_t rows = 2048;       ///< calibration rows behind XtX
  uint64_t seed = 0;
};

struct RoundingBenchRow {
  RoundingMethod method = RoundingMethod::kRtn;
  QuantSpec spec;
  BenchShape shape;
  double wall_seconds = 0;
  double cpu_seconds = 0;
  double output_error = 0;
  double error_vs_rtn = 0;  ///< output_error / round-to-nearest's
};

/// Runs every method x spec x shape; progress lines to `log` when not null.
std::vector<RoundingBenchRow> run_rounding_bench(const RoundingBenchOptions& options, std::ostream* log = nullptr);
/// A markdown table of the rows.
std::string format_rounding_bench(const std::vector<RoundingBenchRow>& rows, int threads);

}  // namespace gradq::bench
