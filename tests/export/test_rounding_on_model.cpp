// The rounding methods of csrc/quant on real stories260K layers with their captured calibration
// inputs: trained rounding and GPTQ lower the layer output error below round-to-nearest's (and GPTQ
// below the clipping search's), GPTQ's codes are exactly those of the straightforward reference GPTQ
// (tests/support/gptq_ref.h), the trained ones those of the scalar loop it replaced within the
// stated tolerance, and a plan with method gptq round-trips and exports exactly GPTQ's codes.

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/script.h>

#include <iostream>
#include <map>
#include <numeric>
#include <string>

#include "data/dataset.h"
#include "export/export.h"
#include "model/causal_lm.h"
#include "optimizer/plan.h"
#include "quant/gptq.h"
#include "quant/quantize.h"
#include "quant/trained_rounding.h"
#include "support/gptq_ref.h"
#include "support/test_helpers.h"
#include "support/test_support.h"
#include "support/trained_rounding_ref.h"

namespace gradq {
namespace {

using test::bitwise_equal;
using test::unpack_codes;

// sum over calibration rows x of |x (W - W_q)^T|^2 = trace(dW X^T X dW^T), in double.
double output_error(const at::Tensor& w, const at::Tensor& w_q, const at::Tensor& xtx) {
  const at::Tensor dw = w.to(at::kDouble) - w_q.to(at::kDouble);
  return (dw.matmul(xtx.to(at::kDouble)) * dw).sum().item<double>();
}

// The loss a result reports against the one recomputed from what the model computes with.
void expect_loss_of_packed(const TrainedRoundingResult& r, const at::Tensor& w, const at::Tensor& xtx) {
  const double loss = output_error(w, dequantize(r.packed), xtx);
  EXPECT_NEAR(r.loss, loss, 1e-9 * std::abs(loss)) << "reported loss is not the loss of the packed weight";
  EXPECT_LE(r.loss, r.rtn_loss);
}

struct Stories {
  CausalLM model;
  std::map<std::string, InputStats> stats;
};

const Stories& stories() {
  static const Stories s = [] {
    CausalLM model = CausalLM::load(test::stories_pt());
    DataOptions data;
    data.calib_windows = 8;
    data.eval_windows = 1;
    const DataSplit split = test::stories_data(data);
    auto stats = model.capture_input_stats(split.calibration.inputs, 8, /*with_xtx=*/true);
    return Stories{std::move(model), std::move(stats)};
  }();
  return s;
}

// The largest quantizable weight, the one with the longest rows among equals (172 inputs).
const WeightInfo& largest_weight(const CausalLM& model) {
  const WeightInfo* best = &model.weights().front();
  for (const WeightInfo& w : model.weights()) {
    if (w.numel() > best->numel() || (w.numel() == best->numel() && w.in_features > best->in_features)) best = &w;
  }
  return *best;
}

class TrainedRoundingStories : public ::testing::TestWithParam<std::string> {};

TEST_P(TrainedRoundingStories, BeatsRoundToNearestOnRealLayers) {
  const Stories& s = stories();
  const QuantSpec spec = parse_quant_spec(GetParam());
  const std::string largest = largest_weight(s.model).name;
  // The largest layer (in = 172) and an attention projection of the last block (64 x 64).
  std::string last_wq;
  for (const WeightInfo& w : s.model.weights()) {
    if (w.name.find("wq") != std::string::npos) last_wq = w.name;
  }
  ASSERT_FALSE(last_wq.empty());
  for (const std::string& name : {largest, last_wq}) {
    const at::Tensor w = s.model.weight(name);
    const at::Tensor& xtx = s.stats.at(name).xtx;
    const TrainedRoundingResult r = train_rounding(w, spec, xtx);
    std::cout << fmt::format("{} {} [{}x{}]: output error rtn {:.5g} trained {:.5g} ({:.1f}% lower, best iterate {})\n",
                             GetParam(), name, w.size(0), w.size(1), r.rtn_loss, r.loss,
                             100 * (1 - r.loss / r.rtn_loss), r.best_iteration);
    expect_loss_of_packed(r, w, xtx);
    EXPECT_LT(r.loss, 0.85 * r.rtn_loss) << name;
    // The scalar loop it replaced, on real activations (tolerance: tests/quant/trained_rounding_test.cpp).
    const TrainedRoundingResult ref = test::train_rounding_ref(w, spec, xtx);
    EXPECT_NEAR(r.rtn_loss, ref.rtn_loss, 1e-12 * ref.rtn_loss) << name;
    EXPECT_NEAR(r.loss, ref.loss, 0.02 * ref.loss) << name;
    const double differ = (unpack_codes(r.packed) != unpack_codes(ref.packed)).sum().item<double>() / double(w.numel());
    std::cout << fmt::format("  reference loss {:.5g}, best iterate {}; {:.2f}% of codes differ\n", ref.loss,
                             ref.best_iteration, 100 * differ);
    EXPECT_LE(differ, 0.05) << name;
    EXPECT_GT(r.best_iteration, 0) << name;
    EXPECT_GT(dequantize(r.packed).abs().sum().item<double>(), 0.0) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(Specs, TrainedRoundingStories, ::testing::Values("b2g64", "b3g128"),
                         [](const auto& info) { return info.param; });


// ---- GPTQ ---------------------------------------------------------------------------------------

class GptqStories : public ::testing::TestWithParam<std::string> {};

TEST_P(GptqStories, ExactlyTheReferenceAndLowerOutputErrorThanRtnAndClip) {
  const Stories& s = stories();
  const QuantSpec spec = parse_quant_spec(GetParam());
  const Plan rtn_plan = uniform_plan(s.model, spec, RoundingMethod::kRtn);
  const QuantizedWeights rtn = apply_plan(s.model, rtn_plan, s.stats);
  const QuantizedWeights clip = apply_plan(s.model, uniform_plan(s.model, spec, RoundingMethod::kClip), s.stats);
  const QuantizedWeights gptq = apply_plan(s.model, uniform_plan(s.model, spec, RoundingMethod::kGptq), s.stats);
  double e_rtn = 0, e_clip = 0, e_gptq = 0;
  int below_both = 0;
  for (const WeightInfo& info : s.model.weights()) {
    const at::Tensor w = s.model.weight(info.name);
    const at::Tensor& xtx = s.stats.at(info.name).xtx;
    const QuantizedTensor& q = gptq.at(info.name);
    EXPECT_TRUE(at::equal(unpack_codes(q.packed), test::gptq_ref(w, spec, xtx).codes)) << info.name;
    const double r = output_error(w, rtn.at(info.name).dequantize(), xtx);
    const double c = output_error(w, clip.at(info.name).dequantize(), xtx);
    const double g = output_error(w, q.dequantize(), xtx);
    e_rtn += r;
    e_clip += c;
    e_gptq += g;
    below_both += g < r && g < c;
  }
  std::cout << fmt::format("{}: layer output error summed over {} layers: rtn {:.5g} clip {:.5g} gptq {:.5g} "
                           "({:.1f}% below clip); gptq lowest on {} layers\n",
                           GetParam(), s.model.weights().size(), e_rtn, e_clip, e_gptq, 100 * (1 - e_gptq / e_clip),
                           below_both);
  EXPECT_LT(e_gptq, e_clip);
  EXPECT_LT(e_clip, e_rtn);
  EXPECT_EQ(below_both, static_cast<int>(s.model.weights().size()));
}

INSTANTIATE_TEST_SUITE_P(Specs, GptqStories, ::testing::Values("b4g32", "b4g128", "b3g32", "b2g64"),
                         [](const auto& info) { return info.param; });

// A plan with method gptq survives JSON, re-applies to the same bits, and is exported with exactly
// the codes quantize_gptq produced.
TEST(GptqStories, PlanRoundTripAndExportedCodes) {
  const Stories& s = stories();
  const std::string name = largest_weight(s.model).name;
  Plan plan = uniform_plan(s.model, parse_quant_spec("b4g32"), RoundingMethod::kGptq);
  plan.entries[1].spec = parse_quant_spec("b3g64");
  const Plan loaded = Plan::from_json(plan.to_json());
  ASSERT_EQ(loaded.entries.size(), plan.entries.size());
  for (size_t i = 0; i < plan.entries.size(); ++i) {
    EXPECT_EQ(loaded.entries[i].method, RoundingMethod::kGptq);
    EXPECT_EQ(loaded.entries[i].spec, plan.entries[i].spec);
  }
  EXPECT_NE(plan.to_json().find("\"method\": \"gptq\""), std::string::npos);
  bool with_xtx = false;
  EXPECT_TRUE(plan_needs_stats(loaded, &with_xtx));
  EXPECT_TRUE(with_xtx);
  const QuantizedWeights a = apply_plan(s.model, plan, s.stats);
  const QuantizedWeights b = apply_plan(s.model, loaded, s.stats);
  for (const auto& [n, t] : a) EXPECT_TRUE(bitwise_equal(t.packed.codes, b.at(n).packed.codes)) << n;

  const PackedWeight direct = quantize_gptq(s.model.weight(name), parse_quant_spec("b4g32"), s.stats.at(name).xtx);
  const std::string path = test::temp_dir("rounding_gptq") + "/q.pt";
  export_packed(s.model, a, path);
  at::Tensor codes;
  for (const auto& buf : torch::jit::load(path).named_buffers())
    if (buf.name == name + "_codes") codes = buf.value;
  ASSERT_TRUE(codes.defined());
  EXPECT_TRUE(bitwise_equal(codes, direct.codes));
  EXPECT_FALSE(bitwise_equal(codes, quantize(s.model.weight(name), parse_quant_spec("b4g32")).codes));

  // Without X^T X the method says what it needs.
  std::map<std::string, InputStats> no_xtx = s.stats;
  for (auto& [n, st] : no_xtx) st.xtx = at::Tensor();
  const std::string msg = test::expect_error([&] { apply_plan(s.model, plan, no_xtx); });
  EXPECT_NE(msg.find("gptq rounding of"), std::string::npos) << msg;
  EXPECT_NE(msg.find("X^T X"), std::string::npos) << msg;
}

// A re-applied plan collects X^T X one block at a time (what keeps `gradq quantize --uniform`
// within memory on a deep model): exactly the weights of the whole-model capture, same windows and
// batches.
TEST(GptqStories, PlanAppliedBlockByBlockEqualsTheWholeCapture) {
  const Stories& s = stories();
  DataOptions data;
  data.calib_windows = 8;
  data.eval_windows = 1;
  const DataSplit split = test::stories_data(data);
  CausalLM model = CausalLM::load(test::stories_pt());  // the fixture's, writable (the stream may set weights)
  Plan plan = uniform_plan(model, parse_quant_spec("b4g32"), RoundingMethod::kGptq);
  plan.entries[1].spec = parse_quant_spec("b3g64");
  plan.entries[2].method = RoundingMethod::kClip;
  ASSERT_TRUE(plan_in_blocks(model, plan));
  const QuantizedWeights whole = apply_plan(s.model, plan, s.stats);
  std::vector<int64_t> done_blocks;
  const QuantizedWeights by_block = apply_plan_by_block(model, plan, split.calibration.inputs, 8, {}, false,
                                                        [&](int64_t done, int64_t blocks) {
                                                          EXPECT_EQ(blocks, static_cast<int64_t>(model.blocks().size()));
                                                          done_blocks.push_back(done);
                                                        });
  std::vector<int64_t> every_block(model.blocks().size());
  std::iota(every_block.begin(), every_block.end(), 1);
  EXPECT_EQ(done_blocks, every_block) << "one progress call per block, in order";
  ASSERT_EQ(by_block.size(), whole.size());
  for (const auto& [n, t] : whole) {
    SCOPED_TRACE(n);
    ASSERT_TRUE(by_block.count(n));
    EXPECT_TRUE(bitwise_equal(t.packed.codes, by_block.at(n).packed.codes));
    EXPECT_TRUE(bitwise_equal(t.dequantize(), by_block.at(n).dequantize()));
    EXPECT_GT(t.dequantize().abs().sum().item<double>(), 0.0);
  }

  // A weight outside every block (the embedding) keeps the whole capture.
  Plan with_embedding = plan;
  with_embedding.entries.push_back({"tok_embeddings.weight", parse_quant_spec("b8g128"), RoundingMethod::kRtn});
  EXPECT_FALSE(plan_in_blocks(model, with_embedding));
  const std::string msg =
      test::expect_error([&] { apply_plan_by_block(model, with_embedding, split.calibration.inputs, 8); });
  EXPECT_NE(msg.find("'tok_embeddings.weight' is not a quantizable weight of a block"), std::string::npos) << msg;
}

// Sequential fitting (GPTQ's order): block b is fitted on what blocks 0..b-1, already quantized,
// hand on. Checked against the whole-model capture of a model whose earlier blocks hold the
// quantized weights, so the stream's set-advance-restore is not what checks itself.
TEST(GptqStories, SequentialFitUsesTheQuantizedEarlierBlocks) {
  CausalLM model = CausalLM::load(test::stories_pt());
  DataOptions data;
  data.calib_windows = 8;
  data.eval_windows = 1;
  const at::Tensor inputs = test::stories_data(data).calibration.inputs;
  const Plan plan = uniform_plan(model, parse_quant_spec("b3g32"), RoundingMethod::kGptq);
  const QuantizedWeights original_fit = apply_plan_by_block(model, plan, inputs, 8);
  const QuantizedWeights sequential = apply_plan_by_block(model, plan, inputs, 8, {}, /*sequential=*/true);
  ASSERT_EQ(sequential.size(), original_fit.size());
  for (const WeightInfo& w : model.weights()) EXPECT_TRUE(model.holds_original(w.name)) << w.name;

  const auto& blocks = model.blocks();
  ASSERT_GE(blocks.size(), 2u);
  // Block 0 sees the embedding either way.
  for (size_t i : blocks.front().weights) {
    const std::string& name = model.weights()[i].name;
    EXPECT_TRUE(bitwise_equal(sequential.at(name).packed.codes, original_fit.at(name).packed.codes)) << name;
  }
  // The last block: fitted on the statistics of the model with every earlier block quantized.
  for (size_t b = 0; b + 1 < blocks.size(); ++b)
    for (size_t i : blocks[b].weights) model.set_weight(model.weights()[i].name, sequential.at(model.weights()[i].name).dequantize());
  const auto stats = model.capture_input_stats(inputs, 8, /*with_xtx=*/true);
  model.restore_all();
  int differ = 0;
  for (size_t i : blocks.back().weights) {
    const PlanEntry& e = plan.entries.at(i);
    ASSERT_EQ(e.name, model.weights()[i].name);
    SCOPED_TRACE(e.name);
    const QuantizedTensor expected = quantize_weight(model.weight(e.name), e.name, e.spec, e.method, stats.at(e.name));
    EXPECT_TRUE(bitwise_equal(sequential.at(e.name).packed.codes, expected.packed.codes));
    EXPECT_TRUE(bitwise_equal(sequential.at(e.name).dequantize(), expected.dequantize()));
    differ += !bitwise_equal(sequential.at(e.name).packed.codes, original_fit.at(e.name).packed.codes);
  }
  EXPECT_GT(differ, 0) << "the last block's rounding did not change with its inputs";
}

}  // namespace
}  // namespace gradq
