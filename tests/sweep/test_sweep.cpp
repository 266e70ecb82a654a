// Sweeps on stories260K with small data: every point measured, the report, resume after an
// interruption, shards and merge, the refusal of another configuration, and the regression gate.
// The search order is given (the analysis is the orchestrator's business), except in the CLI test.

#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join (in fmt/format.h before fmt 11)
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "common/files.h"
#include "optimizer/plan.h"
#include "support/test_helpers.h"
#include "support/test_support.h"
#include "sweep/sweep.h"

namespace gradq {
namespace {
namespace fs = std::filesystem;

struct Fixture {
  CausalLM model = CausalLM::load(test::stories_pt());
  DataSplit data;
  std::vector<std::string> order;  // model order reversed: the last layers first
  SweepResult full;                // the uninterrupted sweep
  std::string full_dir = test::temp_dir("sweep_full");

  Fixture() {
    data = test::small_stories_data();
    for (const WeightInfo& w : model.weights()) order.insert(order.begin(), w.name);
    full = run(options_for(), full_dir);
  }
  SweepOptions options_for(Shard shard = {}) const {
    SweepOptions s;
    s.points = sweep_points({0.2, 0.02}, {parse_quant_spec("b8g128"), parse_quant_spec("b4g128")});
    s.shard = shard;
    s.quantizer.order = order;
    s.quantizer.search.group_sizes = {128};  // fewer candidates: the tests are about the sweep, not the plans
    // Exact curves cost one pass per weight and candidate, which makes their reuse visible in the passes.
    s.quantizer.search.measurement = CandidateMeasurement::kExact;
    s.quantizer.search.rounding.trained.iterations = 20;
    return s;
  }
  SweepResult run(const SweepOptions& s, const std::string& dir) {
    return SweepRunner(model, data.calibration, data.evaluation, s).run(dir);
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

// Everything a point measured, timings aside.
void expect_same_points(const SweepResult& a, const SweepResult& b) {
  ASSERT_EQ(a.points.size(), b.points.size());
  for (size_t i = 0; i < a.points.size(); ++i) {
    const SweepPointResult &p = a.points[i], &q = b.points[i];
    SCOPED_TRACE(p.id);
    EXPECT_EQ(p.id, q.id);
    EXPECT_EQ(p.met, q.met);
    EXPECT_EQ(p.quantized_bytes, q.quantized_bytes);
    EXPECT_EQ(p.bits_per_weight, q.bits_per_weight);
    EXPECT_EQ(p.ppl, q.ppl);
    EXPECT_EQ(p.kl_mean, q.kl_mean);
    EXPECT_EQ(p.kl_p99, q.kl_p99);
    EXPECT_EQ(p.same_top_rate, q.same_top_rate);
    // A run's first allocation measures the error curves its later budget points reuse, so a
    // budget point's own passes depend on which points ran before it in the same process.
    if (!p.budget) EXPECT_EQ(p.passes, q.passes);
  }
}

std::vector<std::string> point_files(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir + "/points")) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

TEST(Sweep, MeasuresEveryPointWithinItsBudgetAndWritesTheReport) {
  Fixture& f = fixture();
  const SweepResult& r = f.full;
  ASSERT_TRUE(r.complete());
  ASSERT_EQ(r.points.size(), 4u);
  EXPECT_EQ(r.points[0].id, "budget-0.02");  // budgets ascending, then the baselines as given
  EXPECT_EQ(r.points[1].id, "budget-0.2");
  EXPECT_EQ(r.points[2].id, "uniform-b8g128");
  EXPECT_EQ(r.points[3].id, "uniform-b4g128");
  EXPECT_EQ(r.points[0].search, "allocate") << "the default strategy";
  EXPECT_EQ(r.points[2].search, "");
  for (const SweepPointResult& p : r.points) {
    SCOPED_TRACE(p.id);
    EXPECT_TRUE(p.met);
    if (p.budget) EXPECT_LE(p.ppl_increase, *p.budget);
    EXPECT_DOUBLE_EQ(p.bits_per_weight, 8.0 * double(p.quantized_bytes) / (double(p.fp16_bytes) / 2));
    EXPECT_EQ(p.reference_ppl, r.points[0].reference_ppl) << "every point is judged against one reference";
  }
  EXPECT_LT(r.points[1].bits_per_weight, r.points[0].bits_per_weight) << "a 10x looser budget buys fewer bits";
  EXPECT_GT(r.points[2].bits_per_weight, r.points[3].bits_per_weight);
  // The second allocation reuses the first one's error curves (one pass per weight and candidate).
  EXPECT_LT(r.points[1].passes + 3 * int64_t(f.model.weights().size()), r.points[0].passes);
  // The references are shared: a uniform point runs only its statistics, its block inputs (GPTQ's
  // X^T X one block at a time) and held-out passes.
  EXPECT_EQ(r.points[2].passes, 3);

  // Each point's plan re-applies to the same size.
  const Plan plan = Plan::load(f.full_dir + "/points/budget-0.2.plan.json");
  EXPECT_EQ(plan_size(f.model, plan).quantized_bytes, r.points[1].quantized_bytes);

  write_sweep_report(f.full_dir, r);
  for (const char* file : {"sweep.json", "sweep.csv", "sweep.md", "pareto.svg", "shared.json"})
    EXPECT_TRUE(fs::exists(f.full_dir + "/" + file)) << file;
  const std::string csv = read_file(f.full_dir + "/sweep.csv");
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 5) << csv;
  EXPECT_EQ(csv.rfind("id,kind,budget,spec,search,met,bits_per_weight", 0), 0u) << csv;
  EXPECT_NE(csv.find("budget-0.02,budget,0.02,,allocate,1,"), std::string::npos) << csv;
  const std::string md = read_file(f.full_dir + "/sweep.md");
  EXPECT_NE(md.find("| budget-0.02"), std::string::npos) << md;
  EXPECT_NE(md.find("the sweep takes"), std::string::npos) << md;
  const std::string svg = read_file(f.full_dir + "/pareto.svg");
  size_t circles = 0;
  for (size_t at = svg.find("<circle"); at != std::string::npos; at = svg.find("<circle", at + 1)) ++circles;
  EXPECT_EQ(circles, 4u);
  EXPECT_NE(svg.find("b4g128"), std::string::npos);

  const SweepResult reread = sweep_from_json(read_file(f.full_dir + "/sweep.json"));
  expect_same_points(reread, r);
  EXPECT_EQ(reread.config_json, r.config_json);
  EXPECT_EQ(sweep_json(reread), sweep_json(r)) << "the report round-trips exactly";
}

TEST(Sweep, ResumedAfterAnInterruptionGivesTheUninterruptedResult) {
  Fixture& f = fixture();
  const std::string dir = test::temp_dir("sweep_resumed");
  SweepOptions interrupted = f.options_for();
  interrupted.on_point = [](const SweepPointResult&) { throw std::runtime_error("killed"); };
  EXPECT_THROW(f.run(interrupted, dir), std::runtime_error);
  EXPECT_EQ(point_files(dir), (std::vector<std::string>{"budget-0.02.json", "budget-0.02.plan.json"}))
      << "exactly the finished point, nothing half-written";
  EXPECT_FALSE(load_sweep_dir(dir, f.options_for().points).complete());

  SweepOptions resumed = f.options_for();
  std::vector<std::string> finished;
  std::string first_line;
  resumed.on_point = [&](const SweepPointResult& p) { finished.push_back(p.id); };
  resumed.on_progress = [&](const std::string& phase, int64_t, int64_t, const std::string& detail) {
    if (first_line.empty()) first_line = phase + ": " + detail;
  };
  const SweepResult r = f.run(resumed, dir);
  EXPECT_EQ(finished, (std::vector<std::string>{"budget-0.2", "uniform-b8g128", "uniform-b4g128"}));
  EXPECT_EQ(first_line, "sweep: 4 points in this shard, 1 finished earlier");
  ASSERT_TRUE(r.complete());
  expect_same_points(r, f.full);
  EXPECT_EQ(r.config_json, f.full.config_json);
  EXPECT_EQ(r.order_hash, f.full.order_hash);

  // Nothing left: a third run measures nothing.
  finished.clear();
  expect_same_points(f.run(resumed, dir), f.full);
  EXPECT_TRUE(finished.empty());
}

TEST(Sweep, ShardsMergeIntoTheUninterruptedResult) {
  Fixture& f = fixture();
  const std::string a = test::temp_dir("sweep_shard1"), b = test::temp_dir("sweep_shard2");
  const SweepResult first = f.run(f.options_for(Shard::parse("1/2")), a);
  const SweepResult second = f.run(f.options_for(Shard::parse("2/2")), b);
  EXPECT_EQ(first.points.size(), 2u);
  EXPECT_EQ(first.missing, (std::vector<std::string>{"budget-0.2", "uniform-b4g128"}));
  EXPECT_EQ(second.missing, (std::vector<std::string>{"budget-0.02", "uniform-b8g128"}));
  GRADQ_EXPECT_THROW_MSG(merge_sweeps({a}, test::temp_dir("sweep_merge_partial")),
                         "no shard has finished 2 of the 4 points: budget-0.2, uniform-b4g128");
  const std::string merged_dir = test::temp_dir("sweep_merged");
  const SweepResult merged = merge_sweeps({a, b}, merged_dir);
  ASSERT_TRUE(merged.complete());
  expect_same_points(merged, f.full);
  // Merging into one of the shards works too.
  expect_same_points(merge_sweeps({a, b}, a), f.full);
}

// `gradq sweep` reports both strategies: the same budgets searched the other way are points of their
// own, with their own line on the chart. Only a progressive point needs the importance order.
TEST(Sweep, ComparesSearchStrategiesAndAnalyzesOnlyForProgressivePoints) {
  Fixture& f = fixture();
  SweepOptions allocate_only = f.options_for();
  allocate_only.points = sweep_points({0.05}, {});
  allocate_only.quantizer.order.clear();
  const std::string plain = test::temp_dir("sweep_allocate_only");
  const SweepResult a = f.run(allocate_only, plain);
  ASSERT_TRUE(a.complete());
  EXPECT_FALSE(fs::exists(plain + "/analysis.json")) << "the allocator needs no importance analysis";
  EXPECT_NE(a.config_json.find("no point searches progressively"), std::string::npos) << a.config_json;

  SweepOptions both = f.options_for();
  both.points = sweep_points({0.05}, {}, {SearchStrategy::kProgressive});
  ASSERT_EQ(both.points.size(), 2u);
  EXPECT_EQ(both.points[1].id, "budget-0.05-progressive");
  const std::string dir = test::temp_dir("sweep_both_searches");
  const SweepResult r = f.run(both, dir);
  ASSERT_TRUE(r.complete());
  EXPECT_EQ(r.points[0].search, "allocate");
  EXPECT_EQ(r.points[1].search, "progressive");
  for (const SweepPointResult& p : r.points) {
    SCOPED_TRACE(p.id);
    EXPECT_TRUE(p.met);
    EXPECT_LE(p.ppl_increase, 0.05);
  }
  EXPECT_EQ(r.points[0].bits_per_weight, a.points[0].bits_per_weight) << "a point does not depend on its neighbours";
  write_sweep_report(dir, r);
  const std::string svg = read_file(dir + "/pareto.svg");
  EXPECT_NE(svg.find("gradq (allocate search)"), std::string::npos);
  EXPECT_NE(svg.find("gradq (progressive search)"), std::string::npos);
  EXPECT_EQ(sweep_json(sweep_from_json(read_file(dir + "/sweep.json"))), sweep_json(r));
}

TEST(Sweep, RefusesADirectoryOfAnotherConfiguration) {
  Fixture& f = fixture();
  SweepOptions other = f.options_for();
  other.quantizer.search.group_sizes = {128, 32};
  GRADQ_EXPECT_THROW_MSG(f.run(other, f.full_dir), "holds a sweep of another configuration (it differs in: search)");
  other = f.options_for();
  other.quantizer.search.rounding.gptq.refit_scales = true;  // a key only when on (earlier sweeps' hashes stay)
  GRADQ_EXPECT_THROW_MSG(f.run(other, f.full_dir), "differs in: search");
  other = f.options_for();
  other.quantizer.budget.safety = 3;
  GRADQ_EXPECT_THROW_MSG(f.run(other, f.full_dir), "differs in: safety");
  SweepOptions with_plan = f.options_for();
  with_plan.quantizer.plan = Plan{};
  GRADQ_EXPECT_THROW_MSG(SweepRunner(f.model, f.data.calibration, f.data.evaluation, with_plan),
                         "give no plan or dynamic policy");
}

TEST(Sweep, RegressionGateNamesWhatRegressedAndByHowMuch) {
  const SweepResult& now = fixture().full;
  EXPECT_TRUE(find_regressions(now, now, {}).empty());

  SweepResult previous = now;
  previous.points[0].ppl = now.points[0].ppl / 1.1;  // the previous sweep was 10% better here
  previous.points[1].bits_per_weight = now.points[1].bits_per_weight - 0.25;
  previous.points.push_back(now.points[3]);
  previous.points.back().id = "uniform-b2g32";
  const std::vector<std::string> found = find_regressions(now, previous, {});
  ASSERT_EQ(found.size(), 3u) << fmt::format("{}", fmt::join(found, "\n"));
  EXPECT_EQ(found[0], fmt::format("budget-0.02: held-out perplexity {:.4f} -> {:.4f} (+10.00% relative; tolerance +0.50%)",
                                  previous.points[0].ppl, now.points[0].ppl));
  EXPECT_EQ(found[1], fmt::format("budget-0.2: bits per weight {:.4f} -> {:.4f} (+0.2500; tolerance 0.01)",
                                  previous.points[1].bits_per_weight, now.points[1].bits_per_weight));
  EXPECT_EQ(found[2], "uniform-b2g32: missing from this sweep");

  // Within tolerance: no regression.
  RegressionTolerance loose;
  loose.ppl = 0.2;
  loose.bits = 0.3;
  previous.points.pop_back();
  EXPECT_TRUE(find_regressions(now, previous, loose).empty());

  // A budget that was met and no longer is.
  SweepResult unmet = now;
  unmet.points[0].met = false;
  EXPECT_EQ(find_regressions(unmet, now, loose).size(), 1u);

  // Another model: nothing to compare.
  SweepResult other = now;
  other.config_json = R"({"model":"0","calibration":{},"evaluation":{}})";
  GRADQ_EXPECT_THROW_MSG(find_regressions(now, other, {}), "the previous sweep measured another model");
}

TEST(Sweep, ParetoFrontier) {
  SweepResult r;
  auto point = [](const char* id, double bits, double ppl) {
    SweepPointResult p;
    p.id = id;
    p.bits_per_weight = bits;
    p.ppl_increase = ppl;
    return p;
  };
  r.points = {point("a", 4, 0.10), point("b", 5, 0.05), point("c", 4.5, 0.2), point("d", 5, 0.05)};
  EXPECT_EQ(r.pareto(), (std::vector<bool>{true, true, false, true}));  // equal points both stay
}

TEST(Sweep, PointListsAndShards) {
  const std::vector<SweepPointSpec> points = sweep_points({0.1, 0.01}, {parse_quant_spec("b4g32")});
  ASSERT_EQ(points.size(), 3u);
  EXPECT_EQ(points[0].id, "budget-0.01");
  EXPECT_EQ(points[2].id, "uniform-b4g32");
  GRADQ_EXPECT_THROW_MSG(sweep_points({0.1, 0.1}, {}), "lists point 'budget-0.1' twice");
  const std::vector<SweepPointSpec> compared = sweep_points({0.1}, {}, {SearchStrategy::kProgressive});
  ASSERT_EQ(compared.size(), 2u);
  EXPECT_EQ(compared[1].id, "budget-0.1-progressive");
  EXPECT_EQ(compared[1].search, SearchStrategy::kProgressive);
  EXPECT_FALSE(compared[0].search.has_value());
  GRADQ_EXPECT_THROW_MSG(sweep_points({-0.1}, {}), "got -0.1");
  GRADQ_EXPECT_THROW_MSG(sweep_points({}, {}), "at least one budget or baseline");
  const Shard s = Shard::parse("2/3");
  EXPECT_EQ(s.index, 1);
  EXPECT_EQ(s.count, 3);
  EXPECT_TRUE(s.owns(1));
  EXPECT_TRUE(s.owns(4));
  EXPECT_FALSE(s.owns(2));
  for (const char* bad : {"0/3", "4/3", "2", "a/b", "2/3x", "1/0"})
    EXPECT_THROW(Shard::parse(bad), Error) << bad;
}

TEST(SweepCli, RunsResumesMergesAndGatesRegressions) {
  const std::string dir = test::temp_dir("sweep_cli");
  const std::string common =
      " --budgets 0.2 --baselines b4g128 --ctx 128 --calib-windows 4 --eval-windows 8 --group-sizes 128 "
      "--trained-iterations 20 --threads 1";
  auto [rc, out] = test::run(test::cli() + " sweep --out " + dir + "/s" + common);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("analysis"), std::string::npos) << "a fresh analysis without --analysis: " << out;
  for (const char* file : {"sweep.json", "sweep.csv", "sweep.md", "pareto.svg", "analysis.json"})
    EXPECT_TRUE(fs::exists(dir + "/s/" + file)) << file;

  // A re-run resumes: nothing is measured again, and the gate passes against the first report.
  std::tie(rc, out) = test::run(test::cli() + " sweep --out " + dir + "/s" + common + " --compare-to " + dir + "/s/sweep.json");
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("3 points in this shard, 3 finished earlier"), std::string::npos)
      << "budget-0.2, budget-0.2-progressive (--compare-search by default) and the baseline: " << out;
  EXPECT_NE(out.find("no regression against"), std::string::npos) << out;

  // A doctored baseline (a better previous perplexity) makes the gate fire with exit code 3.
  std::string report = read_file(dir + "/s/sweep.json");
  const size_t at = report.find("\"ppl\": ");
  report.replace(at, report.find(',', at) - at, "\"ppl\": 1.0");
  write_file_atomically(dir + "/doctored.json", report);
  std::tie(rc, out) = test::run(test::cli() + " sweep --out " + dir + "/s" + common + " --compare-to " + dir + "/doctored.json");
  EXPECT_EQ(rc, 3) << out;
  EXPECT_NE(out.find("1 regression(s)"), std::string::npos) << out;
  EXPECT_NE(out.find("budget-0.2: held-out perplexity 1.0000 -> "), std::string::npos) << out;

  std::tie(rc, out) = test::run(test::cli() + " sweep merge --out " + dir + "/m " + dir + "/s");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_TRUE(fs::exists(dir + "/m/sweep.json"));

  std::tie(rc, out) = test::run(test::cli() + " sweep --out " + dir + "/x --shard 3/2");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("gradq sweep: error: a shard i/n needs 1 <= i <= n, got '3/2'"), std::string::npos) << out;
  std::tie(rc, out) = test::run(test::cli() + " sweep");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("--out is required"), std::string::npos) << out;
  std::tie(rc, out) = test::run(test::cli() + " sweep --help");
  EXPECT_EQ(rc, 0);
  EXPECT_NE(out.find("--compare-to"), std::string::npos) << out;
}

}  // namespace
}  // namespace gradq
