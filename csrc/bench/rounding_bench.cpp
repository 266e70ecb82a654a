#include "bench/rounding_bench.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include <ctime>
#include <ostream>

#include "common/timing.h"

namespace gradq::bench {
namespace {

double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

double output_error(const at::Tensor& w, const at::Tensor& w_q, const at::Tensor& xtx) {
  const at::Tensor d = w.to(at::kDouble) - w_q.to(at::kDouble);
  return (d.matmul(xtx) * d).sum().item<double>();
}

}  // namespace

std::vector<RoundingBenchRow> run_rounding_bench(const RoundingBenchOptions& options, std::ostream* log) {
  std::vector<RoundingBenchRow> rows;
  for (const BenchShape& shape : options.shapes) {
    at::Generator gen = at::detail::createCPUGenerator(options.seed);
    const at::Tensor w = at::randn({shape.out_features, shape.in_features}, gen, at::kFloat) * 0.02;
    const at::Tensor channel_scale = at::exp(at::randn({shape.in_features}, gen, at::kFloat) * 0.7);
    const at::Tensor x = (at::randn({options.rows, shape.in_features}, gen, at::kFloat) * channel_scale).to(at::kDouble);
    const at::Tensor xtx = x.t().matmul(x);
    const at::Tensor sq_mean = (xtx.diagonal() / static_cast<double>(options.rows)).to(at::kFloat);
    for (const QuantSpec& spec : options.specs) {
      double rtn_error = output_error(w, quantize_tensor(w, spec).dequantize(), xtx);
      for (RoundingMethod method : options.methods) {
        RoundingBenchRow row;
        row.method = method;
        row.spec = spec;
        row.shape = shape;
        const double cpu0 = process_cpu_seconds();
        const auto t0 = Clock::now();
        const QuantizedTensor q = quantize_tensor(w, spec, method, sq_mean, xtx, options.rounding);
        row.wall_seconds = seconds_since(t0);
        row.cpu_seconds = process_cpu_seconds() - cpu0;
        row.output_error = output_error(w, q.dequantize(), xtx);
        row.error_vs_rtn = rtn_error > 0 ? row.output_error / rtn_error : 0.0;
        if (log)
          *log << fmt::format("{} {} {}x{}: {:.3f} s ({:.3f} s CPU)\n", rounding_method_name(method), spec.name(),
                              shape.out_features, shape.in_features, row.wall_seconds, row.cpu_seconds);
        rows.push_back(row);
      }
    }
  }
  return rows;
}

std::string format_rounding_bench(const std::vector<RoundingBenchRow>& rows, int threads) {
  std::string out = fmt::format("threads: {}\n\n| method | spec | shape | wall s | CPU s | output error | vs rtn |\n"
                                "|---|---|---|---|---|---|---|\n",
                                threads);
  for (const RoundingBenchRow& r : rows)
    out += fmt::format("| {} | {} | {}x{} | {:.3f} | {:.3f} | {:.5g} | {:.4f} |\n", rounding_method_name(r.method),
                       r.spec.name(), r.shape.out_features, r.shape.in_features, r.wall_seconds, r.cpu_seconds,
                       r.output_error, r.error_vs_rtn);
  return out;
}

}  // namespace gradq::bench
