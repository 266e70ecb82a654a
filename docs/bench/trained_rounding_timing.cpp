// Times trained rounding (tensor implementation, or the scalar reference = the replaced loop) and
// GPTQ on one random weight with a synthetic XtX. Usage: rbench <new|ref|gptq|rtn|clip> OUT IN [iters]
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include "quant/gptq.h"
#include "quant/quantize.h"
#include "quant/trained_rounding.h"
#include "support/trained_rounding_ref.h"
using namespace gradq;
int main(int argc, char** argv) {
  at::set_num_threads(1);
  const std::string which = argv[1];
  const int64_t out = std::atoll(argv[2]), in = std::atoll(argv[3]);
  const int iters = argc > 4 ? std::atoi(argv[4]) : 200;
  at::Generator gen = at::detail::createCPUGenerator(1);
  const at::Tensor w = at::randn({out, in}, gen, at::kFloat) * 0.02;
  const at::Tensor cs = at::exp(at::randn({in}, gen, at::kFloat) * 0.7);
  const at::Tensor x = (at::randn({2048, in}, gen, at::kFloat) * cs).to(at::kDouble);
  const at::Tensor xtx = x.t().matmul(x);
  const QuantSpec spec = parse_quant_spec(argc > 5 ? argv[5] : "b4g128");
  TrainedRoundingOptions opt;
  opt.iterations = iters;
  auto err = [&](const PackedWeight& p) {
    const at::Tensor d = w.to(at::kDouble) - dequantize(p).to(at::kDouble);
    return (d.matmul(xtx) * d).sum().item<double>();
  };
  const auto t0 = std::chrono::steady_clock::now();
  double loss = 0, rtn = 0; int best = 0;
  if (which == "new") { auto r = train_rounding(w, spec, xtx, opt); loss = r.loss; rtn = r.rtn_loss; best = r.best_iteration; }
  else if (which == "ref") { auto r = test::train_rounding_ref(w, spec, xtx, opt); loss = r.loss; rtn = r.rtn_loss; best = r.best_iteration; }
  else if (which == "gptq") { loss = err(quantize_gptq(w, spec, xtx)); }
  else if (which == "rtn") { loss = err(quantize(w, spec)); }
  else if (which == "clip") { loss = err(quantize_clipped(w, spec, xtx.diagonal().to(at::kFloat))); }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s %s %lldx%lld iters %d: %.3f s wall (setup excluded), loss %.9g rtn_loss %.9g best %d\n", which.c_str(),
              spec.name().c_str(), (long long)out, (long long)in, iters, s, loss, rtn, best);
}
