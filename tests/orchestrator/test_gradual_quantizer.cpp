// GradualQuantizer driven as a training harness would: through the C++ API, on stories260K, with
// small data so the whole suite stays fast. The search order is given (the harness's own
// ranking) where the analysis is not what a test is about; the CLI test runs the full default path.

#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join (in fmt/format.h before fmt 11)
#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include "common/files.h"
#include "export/export.h"
#include "orchestrator/gradual_quantizer.h"
#include "report/quantize_report.h"
#include "support/test_helpers.h"
#include "support/test_support.h"

namespace gradq {
namespace {
namespace fs = std::filesystem;
using test::bitwise_equal;
using test::whole_model_kl;

struct Fixture {
  CausalLM model = CausalLM::load(test::stories_pt());
  DataSplit data;
  std::vector<std::string> order;  // model order reversed: the last layers first
  Fixture() {
    data = test::small_stories_data();
    for (const WeightInfo& w : model.weights()) order.insert(order.begin(), w.name);
  }
  QuantizerOptions options(double max_ppl_increase) const {
    QuantizerOptions q;
    q.budget.max_ppl_increase = max_ppl_increase;
    q.order = order;
    // These tests are about the progressive search's flow (test_allocator.cpp has the allocator's).
    q.search.strategy = SearchStrategy::kProgressive;
    q.search.method = RoundingMethod::kClip;
    q.search.group_sizes = {128, 32};  // fewer candidates: the tests are about the flow, not the plan
    q.search.rounding.trained.iterations = 20;
    return q;
  }
  QuantizeOutcome run(const QuantizerOptions& q) {
    return GradualQuantizer(model, data.calibration, data.evaluation, q).run();
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

TEST(GradualQuantizer, HarnessRunMeetsTheBudgetAndLeavesTheModelAsItWas) {
  Fixture& f = fixture();
  const at::Tensor tokens = f.data.evaluation.inputs.slice(0, 0, 2);
  const at::Tensor before = f.model.logits(tokens);
  std::vector<std::string> seen;
  QuantizerOptions q = f.options(0.05);
  q.on_progress = [&](const std::string& phase, int64_t, int64_t, const std::string&) {
    if (seen.empty() || seen.back() != phase) seen.push_back(phase);
  };
  const QuantizeOutcome out = f.run(q);
  EXPECT_TRUE(bitwise_equal(f.model.logits(tokens), before)) << "run() must restore the full-precision weights";
  ASSERT_EQ(out.status, QuantizeStatus::kMet) << fmt::format("{}", fmt::join(out.messages, "; "));
  ASSERT_TRUE(out.heldout.has_value());
  EXPECT_LE(ppl_increase(*out.heldout), 0.05);
  EXPECT_EQ(out.plan.entries.size(), f.model.weights().size());
  EXPECT_LT(out.size.bits_per_weight(), 8.0) << "the search should take some layers below 8 bits";
  EXPECT_GT(out.search_steps.size(), f.model.weights().size());
  EXPECT_EQ(seen, (std::vector<std::string>{"reference", "feasibility", "statistics", "search", "validation"}));
  // The plan's accounting is the report's, and the held-out numbers are those of the written model.
  const std::string dir = test::temp_dir("quantizer_harness");
  export_outcome(f.model, out, dir + "/q.pt", dir + "/fq.pt");
  CausalLM packed = CausalLM::load(dir + "/q.pt");
  CausalLM fake = CausalLM::load(dir + "/fq.pt");
  EXPECT_TRUE(bitwise_equal(packed.logits(tokens), fake.logits(tokens)));
  GradualEvaluator heldout(f.data.evaluation);
  heldout.set_reference(f.model);
  EXPECT_DOUBLE_EQ(heldout.evaluate(packed).ppl.value, out.heldout->ppl.value);
  const std::string report = quantize_report_json(f.model, out, {});
  EXPECT_NE(report.find("\"bits_per_weight\""), std::string::npos);
  EXPECT_NE(bits_per_block_svg(f.model, out, {}).find("<svg"), std::string::npos);

  // Same inputs, same plan; re-applying the plan gives the same quantized tensors.
  const QuantizeOutcome again = f.run(f.options(0.05));
  EXPECT_EQ(again.plan.to_json(), out.plan.to_json());
  QuantizerOptions replay;
  replay.plan = Plan::from_json(out.plan.to_json());
  replay.search.method = RoundingMethod::kClip;  // the plan names each entry's method; this must not matter
  replay.search.rounding.trained.iterations = 20;
  const QuantizeOutcome replayed = f.run(replay);
  for (const auto& [name, t] : out.weights) EXPECT_TRUE(bitwise_equal(replayed.weights.at(name).dequantize(), t.dequantize())) << name;
}

// GPTQ as the search's candidate method: the statistics phase captures X^T X for it, the plan names
// it for every integer weight, and replaying the plan gives the same quantized tensors.
TEST(GradualQuantizer, SearchWithGptqCandidates) {
  Fixture& f = fixture();
  QuantizerOptions q = f.options(0.05);
  q.search.method = RoundingMethod::kGptq;
  q.search.trained_fallback = false;
  const QuantizeOutcome out = f.run(q);
  ASSERT_EQ(out.status, QuantizeStatus::kMet) << fmt::format("{}", fmt::join(out.messages, "; "));
  int gptq_entries = 0;
  for (const PlanEntry& e : out.plan.entries) {
    if (!e.spec.is_integer()) continue;
    EXPECT_EQ(e.method, RoundingMethod::kGptq) << e.name;
    ++gptq_entries;
  }
  EXPECT_GT(gptq_entries, 0);
  QuantizerOptions replay;
  replay.plan = Plan::from_json(out.plan.to_json());
  const QuantizeOutcome replayed = f.run(replay);
  for (const auto& [name, t] : out.weights) EXPECT_TRUE(bitwise_equal(replayed.weights.at(name).dequantize(), t.dequantize())) << name;
}

// The search measures candidates from cached block inputs: the same KL at every step, and so the
// same plan, as whole passes, with fewer blocks computed.
TEST(GradualQuantizer, StagedSearchEqualsTheWholeModelSearch) {
  Fixture& f = fixture();
  AdapterOptions whole_options;
  whole_options.split_stages = false;
  CausalLM whole_model(f.model.module(), whole_options);
  QuantizerOptions q = f.options(0.05);
  q.search.trained_fallback = false;
  q.search.measurement = CandidateMeasurement::kExact;
  const QuantizeOutcome staged = f.run(q);
  const QuantizeOutcome whole = GradualQuantizer(whole_model, f.data.calibration, f.data.evaluation, q).run();
  EXPECT_EQ(staged.search_measurement, "exact");
  EXPECT_NE(whole.search_measurement.find("turned off"), std::string::npos) << whole.search_measurement;
  EXPECT_EQ(staged.plan.to_json(), whole.plan.to_json());
  ASSERT_EQ(staged.search_steps.size(), whole.search_steps.size());
  for (size_t i = 0; i < staged.search_steps.size(); ++i) EXPECT_EQ(staged.search_steps[i].kl, whole.search_steps[i].kl) << i;
  EXPECT_LT(staged.search_blocks_run, 0.8 * staged.search_blocks_whole);
  whole_model.restore_all();
}

// A search of the fixture's model in its order, on the calibration windows.
SearchResult search_fixture(Fixture& f, const Budget& budget, const SearchOptions& o) {
  GradualEvaluator evaluator(f.data.calibration, EvaluatorOptions{});
  evaluator.set_reference(f.model);
  const auto stats = f.model.capture_input_stats(f.data.calibration.inputs, 4, /*with_xtx=*/false);
  PrecisionOptimizer optimizer(f.model, evaluator, budget, o, PrecisionPolicy{}, stats);
  return optimizer.search(f.order);
}

SearchOptions fixture_search_options(CandidateMeasurement how) {
  SearchOptions o;
  o.method = RoundingMethod::kClip;  // the statistics have no X^T X
  o.group_sizes = {128, 32};
  o.trained_fallback = false;
  o.measurement = how;
  return o;
}

// Local measurement: candidates predicted from their block's output error, accepted changes
// confirmed by exact passes. The search ends on an exactly measured model within the budget, with a
// plan about as small as exact measurement of every candidate gives.
TEST(PrecisionOptimizer, LocalSearchEndsOnAConfirmedModelWithFewerBlocks) {
  Fixture& f = fixture();
  Budget budget;
  budget.max_kl = 0.05;  // what local errors predict (perplexity can move apart from it)
  const SearchResult exact = search_fixture(f, budget, fixture_search_options(CandidateMeasurement::kExact));
  const SearchResult local = search_fixture(f, budget, fixture_search_options(CandidateMeasurement::kLocal));
  EXPECT_EQ(local.measurement, "local");
  // The final state was measured, not predicted: the same KL as a whole pass over its weights.
  EXPECT_NEAR(local.calibration.kl->mean.value, whole_model_kl(f.model, f.data.calibration, local.weights), 1e-6);
  EXPECT_TRUE(budget.quality_met(local.calibration, safety_used(budget, SearchStrategy::kProgressive)));
  ASSERT_FALSE(local.confirmations.empty());
  int64_t predicted_kept = 0, confirmed_kept = 0;
  for (const SearchStep& s : local.steps) predicted_kept += s.predicted && s.accepted;
  for (const Confirmation& c : local.confirmations) confirmed_kept += c.kept ? c.changes : 0;
  EXPECT_GT(predicted_kept, 0);
  EXPECT_EQ(predicted_kept, confirmed_kept) << "every change kept on a prediction was confirmed";
  EXPECT_GT(local.local_measurements, 0);
  // On 5 blocks the factor calibrations and confirmations cost about what they save against exact
  // measurement (tools/bench_depth.sh measures deeper models); both stay below whole passes.
  EXPECT_LT(local.blocks_run, 0.5 * local.blocks_whole);
  const double exact_bits = plan_size(f.model, exact.plan).bits_per_weight();
  const double local_bits = plan_size(f.model, local.plan).bits_per_weight();
  EXPECT_LE(local_bits, 1.05 * exact_bits);
}

// The progressive search's held-out validation is the allocator's verify_and_repair, moving each
// weight along the states the search took it through: over a tighter budget it upgrades (in groups,
// back up those states, the search's own tensors) until the budget holds; then it may take back down
// only what it upgraded. Within a looser budget nothing can go lower than the search went: one pass.
TEST(PrecisionOptimizer, ProgressiveSearchIsRepairedAlongItsOwnStates) {
  Fixture& f = fixture();
  Budget searched_for;
  searched_for.max_kl = 0.05;
  searched_for.safety = 1.0;
  const SearchResult base = search_fixture(f, searched_for, fixture_search_options(CandidateMeasurement::kExact));
  // One ladder per weight: its states, cheapest (the final one) first and chosen, storing more bytes
  // at every step back, each with the calibration KL the steps down to it added.
  ASSERT_EQ(base.allocation.hulls.size(), f.model.weights().size());
  int64_t lowered = 0;
  for (const auto& [name, ladder] : base.allocation.hulls) {
    const auto& states = base.history.at(name);
    ASSERT_EQ(ladder.size(), states.size()) << name;
    EXPECT_EQ(base.allocation.choice.at(name), 0u) << name;
    EXPECT_EQ(ladder.front().spec, base.weights.at(name).spec) << name;
    EXPECT_EQ(ladder.back().spec, states.front().spec) << name;
    EXPECT_EQ(ladder.back().kl, 0.0) << name << ": the start state adds nothing";
    for (size_t i = 1; i < ladder.size(); ++i) EXPECT_GT(ladder[i].bytes, ladder[i - 1].bytes) << name;
    lowered += ladder.size() > 1;
  }
  ASSERT_GT(lowered, 10);
  GradualEvaluator calibration(f.data.calibration, EvaluatorOptions{}), heldout(f.data.evaluation, EvaluatorOptions{});
  calibration.set_reference(f.model);
  heldout.set_reference(f.model);
  const auto stats = f.model.capture_input_stats(f.data.calibration.inputs, 4, /*with_xtx=*/false);
  for (double limit : {0.01, 0.5}) {
    Budget budget;
    budget.max_kl = limit;
    PrecisionOptimizer optimizer(f.model, calibration, budget, fixture_search_options(CandidateMeasurement::kExact),
                                 PrecisionPolicy{}, stats);
    SearchResult r = base;
    EvalResult measured;
    const std::vector<ValidationStep> steps = optimizer.verify_and_repair(r, heldout, measured);
    EXPECT_TRUE(budget.quality_met(measured)) << limit << ": " << measured.kl->mean.value;
    EXPECT_NEAR(measured.kl->mean.value, whole_model_kl(f.model, f.data.evaluation, r.weights), 1e-6);
    if (limit > 0.05) {
      EXPECT_TRUE(steps.empty()) << "nothing below the search's own states";
      EXPECT_EQ(r.plan.to_json(), base.plan.to_json());
      continue;
    }
    ASSERT_FALSE(steps.empty());
    EXPECT_GT(steps.front().extra_bits, 0) << "over the budget: an upgrade first";
    std::set<int64_t> passes;
    for (const ValidationStep& v : steps) passes.insert(v.pass);
    EXPECT_LT(passes.size(), steps.size()) << "upgrades are measured in growing groups";
    for (const auto& [name, i] : r.allocation.choice) {
      // Every weight holds one of the states the search gave it, bit for bit, as its plan entry says.
      const auto& states = base.history.at(name);
      EXPECT_TRUE(bitwise_equal(r.weights.at(name).dequantize(), states.rbegin()[i].dequantize())) << name;
      for (const PlanEntry& e : r.plan.entries)
        if (e.name == name) EXPECT_EQ(e.spec, states.rbegin()[i].spec) << name;
    }
    EXPECT_GT(r.allocation.bytes, base.allocation.bytes);
  }
  f.model.restore_all();
}

// The candidate cache keeps at most its byte budget, and a candidate dropped from it is quantized
// again with the same result: the bounded search makes the plan of the unbounded one, step by step.
TEST(PrecisionOptimizer, CandidateCacheStaysWithinItsByteBudgetWithTheSamePlan) {
  Fixture& f = fixture();
  Budget budget;
  budget.max_kl = 0.05;
  SearchOptions o = fixture_search_options(CandidateMeasurement::kExact);
  o.shared_candidates = std::make_shared<CandidateCache>(int64_t{1} << 40);
  const SearchResult unbounded = search_fixture(f, budget, o);
  const int64_t all = o.shared_candidates->bytes();
  ASSERT_GT(all, 0);
  o.shared_candidates = std::make_shared<CandidateCache>(all / 4);
  const SearchResult bounded = search_fixture(f, budget, o);
  EXPECT_LE(o.shared_candidates->bytes(), all / 4);
  EXPECT_LT(o.shared_candidates->size(), unbounded.steps.size());
  EXPECT_EQ(bounded.plan.to_json(), unbounded.plan.to_json());
  ASSERT_EQ(bounded.steps.size(), unbounded.steps.size());
  for (size_t i = 0; i < bounded.steps.size(); ++i) EXPECT_EQ(bounded.steps[i].kl, unbounded.steps[i].kl) << i;
  // The search's own cache takes its budget from the options.
  o.shared_candidates = nullptr;
  o.candidate_cache_bytes = -1;
  GRADQ_EXPECT_THROW_MSG(search_fixture(f, budget, o), "byte budget must be >= 0, got -1");
}

// Predictions that are far too optimistic (factors near 0) are caught by the confirmation: the
// changes are taken back and measured again exactly, and the search still ends within budget, on
// the KL its final weights really have.
TEST(PrecisionOptimizer, LocalSearchTakesBackChangesAFailedConfirmationRejects) {
  Fixture& f = fixture();
  ASSERT_NE(f.model.stages(), nullptr);
  Budget budget;
  budget.max_kl = 0.02;
  SearchOptions o = fixture_search_options(CandidateMeasurement::kLocal);
  o.local_factors.assign(f.model.stages()->num_blocks(), 1e-9);
  const SearchResult r = search_fixture(f, budget, o);
  bool failed = false, taken_back = false;
  for (const Confirmation& c : r.confirmations) failed |= !c.kept;
  for (const SearchStep& s : r.steps) taken_back |= s.taken_back;
  EXPECT_TRUE(failed);
  EXPECT_TRUE(taken_back);
  EXPECT_TRUE(budget.quality_met(r.calibration, safety_used(budget, SearchStrategy::kProgressive)))
      << r.calibration.kl->mean.value;
  EXPECT_NEAR(r.calibration.kl->mean.value, whole_model_kl(f.model, f.data.calibration, r.weights), 1e-6);
}

TEST(SearchOptions, CandidateMeasurementNamesAndLimits) {
  EXPECT_EQ(parse_candidate_measurement("local"), CandidateMeasurement::kLocal);
  EXPECT_EQ(candidate_measurement_name(CandidateMeasurement::kExact), "exact");
  GRADQ_EXPECT_THROW_MSG(parse_candidate_measurement("fast"), "expected exact or local");
  SearchOptions o;
  o.confirm_share = 0;
  GRADQ_EXPECT_THROW_MSG(o.validate(), "confirm_share must be in (0, 1]");
  o.confirm_share = 0.5;
  o.local_factors = {1.0, -2.0};
  GRADQ_EXPECT_THROW_MSG(o.validate(), "local factor of block 1");
}

// A trained entry of a plan is exported with exactly the codes train_rounding produced.
TEST(GradualQuantizer, ExportedCodesAreTheTrainedOnes) {
  Fixture& f = fixture();
  const std::string name = f.model.weights()[3].name;
  const auto stats = f.model.capture_input_stats(f.data.calibration.inputs, 4, /*with_xtx=*/true);
  RoundingOptions rounding;
  rounding.trained.iterations = 30;
  const QuantSpec spec = parse_quant_spec("b2g32");
  const TrainedRoundingResult direct = train_rounding(f.model.weight(name), spec, stats.at(name).xtx, rounding.trained);
  ASSERT_GT(direct.best_iteration, 0) << "training should improve on round-to-nearest here";
  Plan plan;
  plan.entries.push_back({name, spec, RoundingMethod::kTrained});
  const QuantizedWeights q = apply_plan(f.model, plan, stats, rounding);
  const std::string path = test::temp_dir("quantizer_trained") + "/q.pt";
  export_packed(f.model, q, path);
  at::Tensor codes;
  for (const auto& b : torch::jit::load(path).named_buffers())
    if (b.name == name + "_codes") codes = b.value;
  ASSERT_TRUE(codes.defined());
  EXPECT_TRUE(bitwise_equal(codes, direct.packed.codes));
  EXPECT_FALSE(bitwise_equal(codes, quantize(f.model.weight(name), spec).codes));
}

TEST(GradualQuantizer, BudgetThatEvenEightBitsBreaksIsReportedNotSearched) {
  Fixture& f = fixture();
  QuantizerOptions q = f.options(0.05);
  q.budget.max_ppl_increase.reset();
  q.budget.max_kl = 1e-7;
  const QuantizeOutcome out = f.run(q);
  EXPECT_EQ(out.status, QuantizeStatus::kBudgetUnmet);
  ASSERT_TRUE(out.all8_heldout.has_value());
  EXPECT_GT(out.all8_heldout->kl->mean.value, 1e-7);
  EXPECT_TRUE(out.search_steps.empty());
  ASSERT_FALSE(out.messages.empty());
  EXPECT_NE(out.messages.front().find("best achievable"), std::string::npos) << out.messages.front();
}

TEST(GradualQuantizer, MemoryTargetStopsTheSearchOrIsReportedUnreachable) {
  Fixture& f = fixture();
  QuantizerOptions easy = f.options(0.05);
  easy.budget.target_memory_reduction = 0.3;
  const QuantizeOutcome met = f.run(easy);
  EXPECT_TRUE(met.memory_target_met);
  EXPECT_GE(1.0 - double(met.size.quantized_bytes) / met.size.fp16_bytes, 0.3);
  EXPECT_LT(met.size.bits_per_weight(), 16 * 0.7 + 1e-9);
  QuantizerOptions hard = f.options(0.05);
  hard.budget.target_memory_reduction = 0.95;
  const QuantizeOutcome unmet = f.run(hard);
  EXPECT_EQ(unmet.status, QuantizeStatus::kMet);
  EXPECT_FALSE(unmet.memory_target_met);
  ASSERT_FALSE(unmet.messages.empty());
  EXPECT_NE(unmet.messages.back().find("not reachable"), std::string::npos) << unmet.messages.back();
  EXPECT_GT(met.size.bits_per_weight(), unmet.size.bits_per_weight()) << "stopping at the target keeps more bits";
}

TEST(GradualQuantizer, PolicyBoundsEveryLevel) {
  Fixture& f = fixture();
  QuantizerOptions q = f.options(0.2);
  q.policy = PrecisionPolicy::from_json(R"({"format": "gradq-policy", "rules": [
      {"pattern": "^{last_block}\\.", "min": "int8"},
      {"pattern": "feed_forward", "max": "int4"}]})");
  const QuantizeOutcome out = f.run(q);
  const std::string last = f.model.blocks().back().name + ".";
  for (const PlanEntry& e : out.plan.entries) {
    if (e.name.rfind(last, 0) == 0) {
      EXPECT_GE(e.spec.level, QuantLevel::kInt8) << e.name;
      if (e.name.find("feed_forward") != std::string::npos) EXPECT_EQ(e.spec.level, QuantLevel::kFp16) << e.name;
    } else if (e.name.find("feed_forward") != std::string::npos) {
      EXPECT_LE(e.spec.level, QuantLevel::kInt4) << e.name << " is " << e.spec.name();
    }
  }
}

TEST(GradualQuantizer, DynamicPolicyAssignsLevelsByImportanceShare) {
  Fixture& f = fixture();
  QuantizerOptions q;
  q.order = f.order;
  q.dynamic = DynamicPolicy::from_json(R"({"format": "gradq-dynamic-policy", "high_share": 0.2, "low_share": 0.4,
                                           "high": "fp16", "middle": "b8g128", "low": "b4g128"})");
  const QuantizeOutcome out = f.run(q);
  const auto n = static_cast<int64_t>(f.order.size());
  std::map<std::string, QuantSpec> spec_of;
  for (const PlanEntry& e : out.plan.entries) spec_of[e.name] = e.spec;
  for (int64_t i = 0; i < n; ++i) {
    const std::string expected = i < 14 ? "b4g128" : i >= n - 7 ? "fp16" : "b8g128";  // 35 units: 14 low, 7 high
    EXPECT_EQ(spec_of.at(f.order[i]).name(), expected) << f.order[i];
  }
  EXPECT_TRUE(out.search_steps.empty());
}

TEST(PrecisionPolicy, BadFilesAreNamed) {
  EXPECT_NE(test::expect_error([] { PrecisionPolicy::from_json("{}"); }).find("gradq-policy"), std::string::npos);
  EXPECT_NE(test::expect_error([] {
              PrecisionPolicy::from_json(R"({"format": "gradq-policy", "rules": [{"pattern": "x", "min": "int7"}]})");
            }).find("unknown precision level 'int7'"),
            std::string::npos);
  EXPECT_NE(test::expect_error([] {
              PrecisionPolicy::from_json(R"({"format": "gradq-policy", "rules": [{"pattern": "x", "min": "fp16", "max": "int4"}]})");
            }).find("min fp16 is above max int4"),
            std::string::npos);
  EXPECT_NE(test::expect_error([] { PrecisionPolicy::load("/nonexistent/policy.json"); }).find("/nonexistent/policy.json"),
            std::string::npos);
}

// Every shipped policy parses and binds to stories260K.
TEST(PrecisionPolicy, ShippedPoliciesLoad) {
  int loaded = 0;
  for (const auto& entry : fs::directory_iterator(std::string(GRADQ_TEST_SOURCE_DIR) + "/configs/policies")) {
    const std::string text = read_file(entry.path().string());
    if (text.find("gradq-dynamic-policy") != std::string::npos) {
      DynamicPolicy::from_json(text);
    } else {
      PrecisionPolicy p = PrecisionPolicy::from_json(text);
      p.bind(fixture().model);
    }
    ++loaded;
  }
  EXPECT_GE(loaded, 3);
}

// The CLI's default path end to end (the allocator with GPTQ candidates), on small data; then exit
// code 2 with a report and no model for a budget nothing meets.
TEST(QuantizeCli, DefaultSearchAndUnmeetableBudget) {
  const std::string dir = test::temp_dir("quantize_cli");
  const std::string data = " --threads 1 --ctx 128 --calib-windows 4 --eval-windows 8 --trained-iterations 20";
  auto [rc, out] = test::run(test::cli() + " quantize -o " + dir + "/q.pt --report " + dir + "/r.json --save-plan " +
                             dir + "/plan.json" + data);
  ASSERT_EQ(rc, 0) << out;
  for (const char* s : {"statistics", "search", "validation", "bits per weight", "held-out", "wrote"})
    EXPECT_NE(out.find(s), std::string::npos) << s << "\n" << out;
  EXPECT_EQ(out.find("analysis"), std::string::npos) << "the default search needs no importance analysis: " << out;
  const std::string report = read_file(dir + "/r.json");
  EXPECT_NE(report.find("\"strategy\": \"allocate\""), std::string::npos) << "the default search";
  EXPECT_NE(read_file(dir + "/plan.json").find("\"gptq\""), std::string::npos) << "the default rounding";
  for (const char* f : {"q.pt", "r.json", "r-blocks.svg", "r-levels.svg", "r-formats.svg", "plan.json"})
    EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;
  auto [grc, gout] = test::run(test::cli() + " generate --model " + dir + "/q.pt --steps 10 --threads 1");
  EXPECT_EQ(grc, 0) << gout;

  auto [urc, uout] = test::run(test::cli() + " quantize --max-kl 1e-9 -o " + dir + "/never.pt --report " + dir +
                               "/never.json" + data);
  EXPECT_EQ(urc, 2) << uout;
  EXPECT_NE(uout.find("budget not met"), std::string::npos) << uout;
  EXPECT_FALSE(fs::exists(dir + "/never.pt"));
  EXPECT_NE(read_file(dir + "/never.json").find("\"budget_unmet\""), std::string::npos);
}

}  // namespace
}  // namespace gradq
