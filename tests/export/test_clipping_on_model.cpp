// The clipping search on the real model: at the same bits it gives lower layer-output error than
// round-to-nearest, measured with the calibration activations' X^T X, and lower KL on held-out text.

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <iostream>

#include "data/dataset.h"
#include "eval/evaluator.h"
#include "model/causal_lm.h"
#include "optimizer/plan.h"
#include "support/test_support.h"

namespace gradq {
namespace {

// sum over calibration rows x of |x (W - W_q)^T|^2 = trace(dW X^T X dW^T).
double output_error(const at::Tensor& w, const at::Tensor& wq, const at::Tensor& xtx) {
  const at::Tensor dw = (w - wq).to(at::kDouble);
  return (dw.matmul(xtx) * dw).sum().item<double>();
}

class ClippingOnStories : public ::testing::TestWithParam<std::string> {};

TEST_P(ClippingOnStories, LowerOutputErrorAndKlThanRoundToNearest) {
  CausalLM model = CausalLM::load(test::stories_pt());
  DataOptions data;
  data.calib_windows = 8;
  data.eval_windows = 16;
  const DataSplit split = test::stories_data(data);
  const auto stats = model.capture_input_stats(split.calibration.inputs, 8, /*with_xtx=*/true);

  const QuantSpec spec = parse_quant_spec(GetParam());
  const QuantizedWeights rtn = apply_plan(model, uniform_plan(model, spec, RoundingMethod::kRtn));
  const QuantizedWeights clip = apply_plan(model, uniform_plan(model, spec, RoundingMethod::kClip), stats);
  double rtn_error = 0, clip_error = 0;
  int layers_better = 0;
  for (const WeightInfo& w : model.weights()) {
    const at::Tensor weight = model.weight(w.name);
    const double e_rtn = output_error(weight, rtn.at(w.name).dequantize(), stats.at(w.name).xtx);
    const double e_clip = output_error(weight, clip.at(w.name).dequantize(), stats.at(w.name).xtx);
    rtn_error += e_rtn;
    clip_error += e_clip;
    layers_better += e_clip < e_rtn;
  }
  std::cout << fmt::format("{}: output error rtn {:.4g} clip {:.4g} ({:.1f}% lower); clip lower on {}/{} layers\n",
                           GetParam(), rtn_error, clip_error, 100 * (1 - clip_error / rtn_error), layers_better,
                           model.weights().size());
  EXPECT_LT(clip_error, rtn_error);
  EXPECT_GT(layers_better, static_cast<int>(model.weights().size()) / 2);

  GradualEvaluator evaluator(split.evaluation);
  evaluator.set_reference(model);
  auto kl_of = [&](const QuantizedWeights& q) {
    for (const auto& [name, t] : q) model.set_weight(name, t.dequantize());
    const double kl = evaluator.evaluate(model).kl->mean.value;
    model.restore_all();
    return kl;
  };
  const double kl_rtn = kl_of(rtn), kl_clip = kl_of(clip);
  std::cout << fmt::format("{}: held-out KL rtn {:.5f} clip {:.5f}\n", GetParam(), kl_rtn, kl_clip);
  EXPECT_LT(kl_clip, kl_rtn);
}

INSTANTIATE_TEST_SUITE_P(Specs, ClippingOnStories, ::testing::Values("b4g128", "b3g64", "b2g32"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace gradq
