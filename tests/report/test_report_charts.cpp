// The charts a run writes: each weight's chosen format by block, the model, budget and achieved
// change on every quantize chart, and the sweep's Pareto plot with its frontier and token count.

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "model/model_loader.h"
#include "optimizer/plan.h"
#include "report/quantize_report.h"
#include "report/svg_chart.h"
#include "support/test_support.h"
#include "sweep/sweep.h"

namespace gradq {
namespace {

bool has(const std::string& svg, const std::string& text) { return svg.find(text) != std::string::npos; }

// A run's outcome built by hand: stories260K with every weight at b4g32 except two, and a held-out
// result of +4.69% perplexity on 1234 tokens.
struct QuantizeRun {
  CausalLM model = load_model(test::stories_bin());
  QuantizeOutcome outcome;
  ReportFiles files;
  QuantizeRun() {
    outcome.plan = uniform_plan(model, parse_quant_spec("b4g32"), RoundingMethod::kRtn);
    for (PlanEntry& e : outcome.plan.entries) {
      if (e.name == "layers.1.feed_forward.w2.weight") e.spec = parse_quant_spec("b8g128");
      if (e.name == "layers.3.attention.wq.weight") e.spec = parse_quant_spec("b2g16");
    }
    outcome.weights = apply_plan(model, outcome.plan);
    outcome.size = plan_size(model, outcome.plan);
    EvalResult r;
    r.tokens = 1234;
    r.reference_ppl = Estimate{10.0, 0};
    r.ppl = Estimate{10.469, 0};
    r.kl = KlStats{};
    r.kl->mean = Estimate{0.0796, 0};
    outcome.heldout = r;
    files.model = "stories260K.bin";
    files.budget = "perplexity +5%";
  }
};

TEST(QuantizeCharts, FormatsChartShowsEachWeightsBitsAndGroupSizeByBlock) {
  QuantizeRun run;
  const std::string svg = weight_formats_svg(run.model, run.outcome, run.files);
  for (const WeightInfo& w : run.model.weights()) {
    const std::string spec = run.outcome.plan.entries.front().spec.name();  // b4g32 unless changed below
    ASSERT_FALSE(w.block.empty()) << w.name << ": every quantizable weight of stories260K is in a block";
    const std::string local = w.name.substr(w.block.size() + 1);
    const std::string expected = w.name == "layers.1.feed_forward.w2.weight" ? "b8g128"
                                 : w.name == "layers.3.attention.wq.weight" ? "b2g16"
                                                                            : spec;
    EXPECT_TRUE(has(svg, ">" + w.block + " | " + local + ": " + expected + "<")) << w.name << " " << expected;
  }
  // The bar's value is the weight's bits per weight with its side information.
  const WeightInfo& w = run.model.weights().front();
  const std::string bits = format_number(parse_quant_spec("b4g32").bits_per_weight(w.out_features, w.in_features));
  EXPECT_TRUE(has(svg, ": b4g32 bits per weight: " + bits + "<")) << bits;
  // Blocks appear in order: layers.0's weights before layers.1's.
  EXPECT_LT(svg.find(">layers.0 | "), svg.find(">layers.1 | "));
  for (const char* level : {">int2<", ">int4<", ">int8<"}) EXPECT_TRUE(has(svg, level)) << level << " in the legend";
}

TEST(QuantizeCharts, EveryChartNamesModelBudgetAndAchievedChange) {
  QuantizeRun run;
  for (const std::string& svg : {weight_formats_svg(run.model, run.outcome, run.files),
                                 bits_per_block_svg(run.model, run.outcome, run.files),
                                 level_distribution_svg(run.model, run.outcome, run.files)}) {
    EXPECT_TRUE(has(svg, "model stories260K.bin; budget perplexity +5%")) << svg.substr(0, 600);
    EXPECT_TRUE(has(svg, "held-out (1234 tokens): perplexity +4.69%, KL mean 0.0796")) << svg.substr(0, 600);
    EXPECT_TRUE(has(svg, fmt::format("{:.3f} bits per weight", run.outcome.size.bits_per_weight())));
  }
  run.outcome.heldout.reset();
  EXPECT_TRUE(has(bits_per_block_svg(run.model, run.outcome, run.files), "not evaluated on held-out text"));
}

SweepPointResult point(const std::string& id, std::optional<double> budget, const std::string& spec, double bits,
                       double increase) {
  SweepPointResult p;
  p.id = id;
  p.kind = budget ? "budget" : "uniform";
  p.budget = budget;
  p.spec = spec;
  p.bits_per_weight = bits;
  p.ppl_increase = increase;
  p.tokens = 16320;
  return p;
}

TEST(ParetoChart, DrawsTheFrontierAndNamesModelBudgetsAndTokens) {
  SweepResult r;
  r.model_name = "stories260K.bin";
  r.points = {point("budget-0.01", 0.01, "", 6.6, 0.009), point("budget-0.05", 0.05, "", 4.8, 0.047),
              point("b8g128", std::nullopt, "b8g128", 8.25, 0.001), point("b4g128", std::nullopt, "b4g128", 4.3, 0.068),
              point("b4g32", std::nullopt, "b4g32", 5.0, 0.08)};  // b4g32 is off the frontier (budget-0.05 beats it)
  const std::string svg = pareto_svg(r);
  EXPECT_TRUE(has(svg, ">Pareto frontier (all points)<")) << "frontier legend";
  // The frontier is a line through the four frontier points in order of bits: b4g128, +5%, +1%, b8g128.
  const size_t line = svg.find("<polyline");
  ASSERT_NE(line, std::string::npos);
  const std::string points = svg.substr(line, svg.find("/>", line) - line);
  EXPECT_EQ(std::count(points.begin(), points.end(), ','), 4) << points;
  EXPECT_TRUE(has(svg, "stroke=\"#222222\"")) << "the frontier's colour";
  EXPECT_TRUE(has(svg, "model stories260K.bin; perplexity budgets +1%, +5%"));
  EXPECT_TRUE(has(svg, "evaluated on 16320 held-out tokens per point"));
}

}  // namespace
}  // namespace gradq
