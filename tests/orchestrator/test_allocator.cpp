// The budget allocator (optimizer/allocator.h) on made-up curves, and the search by allocation
// (PrecisionOptimizer::allocate) on stories260K.

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>

#include "optimizer/allocator.h"
#include "orchestrator/gradual_quantizer.h"
#include "report/quantize_report.h"
#include "support/test_helpers.h"
#include "support/test_support.h"

namespace gradq {
namespace {
using test::whole_model_kl;

CurvePoint point(int64_t bytes, double kl) {
  CurvePoint p;
  p.spec.level = QuantLevel::kInt4;
  p.spec.group_size = bytes;  // tells the points apart in failure messages
  p.bytes = bytes;
  p.kl = kl;
  return p;
}

TEST(Allocator, LowerHullDropsDominatedAndConcavePoints) {
  // (10, 1.0) (20, 0.5) (30, 0.45) (40, 0.1) (50, 0.2) (25, 0.9): 50 is dominated by 40, 25 lies
  // above the segment 20-40... no: (25, 0.9) is above the line from (20, 0.5); 30 lies above the
  // segment from 20 to 40 (0.5 -> 0.1 passes 0.3 at 30).
  const auto hull = lower_hull({point(10, 1.0), point(20, 0.5), point(30, 0.45), point(40, 0.1), point(50, 0.2),
                                point(25, 0.9)});
  ASSERT_EQ(hull.size(), 3u);
  EXPECT_EQ(hull[0].bytes, 10);
  EXPECT_EQ(hull[1].bytes, 20);
  EXPECT_EQ(hull[2].bytes, 40);
  EXPECT_THROW(lower_hull({}), Error);
  // Negative KL (noise) counts as none.
  EXPECT_EQ(lower_hull({point(10, -0.01)})[0].kl, 0.0);
}

// Every state of the greedy is a Lagrangian optimum: no combination of hull points stores at most
// as many bytes with less predicted KL. Checked against every combination on random curves.
TEST(Allocator, EveryGreedyPlanIsTheLeastKlForItsBytes) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int trial = 0; trial < 20; ++trial) {
    ErrorCurves curves;
    for (int w = 0; w < 4; ++w) {
      std::vector<CurvePoint> pts;
      for (int i = 0; i < 5; ++i) pts.push_back(point(10 + 10 * i + static_cast<int64_t>(9 * u(rng)), u(rng)));
      curves["w" + std::to_string(w)] = pts;
    }
    std::map<std::string, std::vector<CurvePoint>> hulls;
    for (const auto& [name, pts] : curves) hulls[name] = lower_hull(pts);
    // Every combination of hull points: (bytes, kl).
    std::vector<std::pair<int64_t, double>> combos = {{0, 0.0}};
    for (const auto& [name, hull] : hulls) {
      std::vector<std::pair<int64_t, double>> next;
      for (const auto& c : combos)
        for (const CurvePoint& p : hull) next.emplace_back(c.first + p.bytes, c.second + p.kl);
      combos = next;
    }
    for (double max_kl : {0.0, 0.2, 0.5, 1.0, 1.5, 2.0, 5.0}) {
      const Allocation a = allocate_for_kl(curves, max_kl);
      double best = INFINITY;
      for (const auto& [bytes, kl] : combos)
        if (bytes <= a.bytes) best = std::min(best, kl);
      EXPECT_NEAR(a.predicted_kl, best, 1e-12) << "trial " << trial << " max_kl " << max_kl;
      double sum = 0;
      int64_t bytes = 0;
      for (const auto& [name, i] : a.choice) sum += a.chosen(name).kl, bytes += a.chosen(name).bytes;
      EXPECT_NEAR(sum, a.predicted_kl, 1e-12);
      EXPECT_EQ(bytes, a.bytes);
      // Meets the limit unless every weight is already at its most accurate point.
      bool all_top = true;
      for (const auto& [name, i] : a.choice) all_top &= i + 1 == a.hulls.at(name).size();
      EXPECT_TRUE(a.predicted_kl <= max_kl || all_top);
    }
    for (int64_t max_bytes : {0, 100, 150, 200, 400}) {
      const Allocation a = allocate_for_bytes(curves, max_bytes);
      int64_t cheapest = 0;
      for (const auto& [name, hull] : hulls) cheapest += hull.front().bytes;
      EXPECT_TRUE(a.bytes <= max_bytes || a.bytes == cheapest) << a.bytes << " > " << max_bytes;
    }
  }
}

struct Stories {
  CausalLM model = CausalLM::load(test::stories_pt());
  DataSplit data = test::small_stories_data();
};
Stories& stories() {
  static Stories s;
  return s;
}

SearchResult allocate_stories(const Budget& budget, SearchOptions o) {
  Stories& s = stories();
  GradualEvaluator evaluator(s.data.calibration, EvaluatorOptions{});
  evaluator.set_reference(s.model);
  const auto stats = s.model.capture_input_stats(s.data.calibration.inputs, 4, /*with_xtx=*/false);
  o.strategy = SearchStrategy::kAllocate;
  o.method = RoundingMethod::kClip;  // needs no X^T X; GPTQ candidates are the orchestrator tests'
  PrecisionOptimizer optimizer(s.model, evaluator, budget, o, PrecisionPolicy{}, stats);
  return optimizer.allocate();
}

// The plan meets the budget on the KL its weights really have (a whole pass over them), every
// weight has its measured curve, and the target search measured whole plans against predictions.
// The candidate cache (unbounded here) ends holding the integer points of the hulls and nothing
// else: the rest are never read again and only spent the cache's bound.
TEST(PrecisionOptimizer, AllocationMeetsTheBudgetOnItsMeasuredKl) {
  Stories& s = stories();
  Budget budget;
  budget.max_kl = 0.05;
  SearchOptions o;
  o.group_sizes = {128, 32};
  o.shared_candidates = std::make_shared<CandidateCache>(int64_t{1} << 40);
  const SearchResult r = allocate_stories(budget, o);
  size_t on_hulls = 0, measured = 0;
  for (const auto& [name, curve] : r.curves) {
    for (const CurvePoint& p : lower_hull(curve)) on_hulls += p.spec.is_integer();
    for (const CurvePoint& p : curve) measured += p.spec.is_integer();
  }
  EXPECT_EQ(o.shared_candidates->size(), on_hulls);
  EXPECT_LT(on_hulls, measured) << "the test needs candidates off the hulls";
  EXPECT_TRUE(budget.quality_met(r.calibration, safety_used(budget, SearchStrategy::kAllocate)))
      << r.calibration.kl->mean.value;
  EXPECT_NEAR(r.calibration.kl->mean.value, whole_model_kl(s.model, s.data.calibration, r.weights), 1e-6);
  ASSERT_EQ(r.curves.size(), s.model.weights().size());
  for (const auto& [name, curve] : r.curves)
    EXPECT_EQ(curve.size(), 1 + o.bits.size() * 2 * o.encodings.size()) << name;  // fp16 + every width x 2 groups x encodings
  ASSERT_FALSE(r.confirmations.empty());
  bool kept = false;
  for (const Confirmation& c : r.confirmations) kept |= c.kept;
  EXPECT_TRUE(kept);
  EXPECT_EQ(r.plan.entries.size(), s.model.weights().size());
  for (const PlanEntry& e : r.plan.entries) EXPECT_EQ(e.spec, r.weights.at(e.name).spec);
  EXPECT_LT(plan_size(s.model, r.plan).bits_per_weight(), 8.0);
  int64_t kept_bytes = 0;
  for (const auto& [name, i] : r.allocation.choice) kept_bytes += r.allocation.chosen(name).bytes;
  EXPECT_EQ(kept_bytes, r.allocation.bytes);
}

// The allocator asks for its hull points again in every whole-plan pass. A cache smaller than them
// quantizes again what it dropped; with a spill file it reads them back instead. Either way the plan
// is the unbounded cache's.
TEST(PrecisionOptimizer, AllocationReadsDroppedCandidatesBackFromTheSpill) {
  Budget budget;
  budget.max_kl = 0.05;
  SearchOptions o;
  o.group_sizes = {128, 32};
  o.shared_candidates = std::make_shared<CandidateCache>(int64_t{1} << 40);
  const SearchResult unbounded = allocate_stories(budget, o);
  const int64_t hulls = o.shared_candidates->bytes();
  EXPECT_EQ(unbounded.candidates_read_back, 0);

  o.shared_candidates = std::make_shared<CandidateCache>(hulls / 4);
  const SearchResult dropped = allocate_stories(budget, o);
  EXPECT_EQ(dropped.plan.to_json(), unbounded.plan.to_json());
  EXPECT_GT(dropped.candidates_quantized, unbounded.candidates_quantized);
  EXPECT_EQ(dropped.candidates_read_back, 0);

  o.shared_candidates = std::make_shared<CandidateCache>(hulls / 4, CandidateSpillOptions{"", int64_t{1} << 30});
  const SearchResult spilled = allocate_stories(budget, o);
  EXPECT_EQ(spilled.plan.to_json(), unbounded.plan.to_json());
  EXPECT_EQ(spilled.candidates_quantized, unbounded.candidates_quantized);
  EXPECT_GT(spilled.candidates_read_back, 0);
  EXPECT_LE(o.shared_candidates->bytes(), hulls / 4);
  EXPECT_GT(o.shared_candidates->spilled_bytes(), 0);
}

// Local curves: a candidate in a block is its block's output error times a factor calibrated by one
// exact measurement per block, so each costs one block instead of the blocks after its own. The
// predictions follow the exact curves (same order of magnitude, ranked alike), and the plan still
// meets the budget on a whole pass, since the target search measures whole plans either way.
TEST(PrecisionOptimizer, LocalCurvesPredictTheExactOnesAtOneBlockPerCandidate) {
  Stories& s = stories();
  Budget budget;
  budget.max_kl = 0.05;
  SearchOptions o;
  o.group_sizes = {128, 32};
  EXPECT_EQ(o.measurement_used(), CandidateMeasurement::kLocal) << "the allocator's default";
  o.measurement = CandidateMeasurement::kExact;
  const SearchResult exact = allocate_stories(budget, o);
  o.measurement = CandidateMeasurement::kLocal;
  const SearchResult local = allocate_stories(budget, o);
  EXPECT_EQ(local.measurement, "local");
  EXPECT_EQ(exact.local_measurements, 0);
  const int64_t blocks = s.model.stages()->num_blocks();
  int64_t in_blocks = 0;  // candidates of weights inside blocks
  for (const WeightInfo& w : s.model.weights())
    in_blocks += (w.block_index >= 0) * static_cast<int64_t>(o.bits.size() * o.group_sizes.size() * o.encodings.size());
  EXPECT_EQ(local.local_measurements, in_blocks + blocks) << "one block per candidate, one per calibration";
  EXPECT_LT(local.blocks_run, 0.6 * exact.blocks_run);

  // Predicted against measured, over the candidates whose exact KL is above the windows' noise.
  std::vector<std::pair<double, double>> pairs;
  for (const auto& [name, curve] : exact.curves)
    for (size_t i = 1; i < curve.size(); ++i)
      if (curve[i].kl > 1e-3) pairs.emplace_back(curve[i].kl, local.curves.at(name)[i].kl);
  ASSERT_GT(pairs.size(), 20u);
  double log_ratio = 0;
  int64_t concordant = 0, comparable = 0;
  for (size_t i = 0; i < pairs.size(); ++i) {
    log_ratio += std::abs(std::log(pairs[i].second / pairs[i].first));
    for (size_t j = i + 1; j < pairs.size(); ++j) {
      ++comparable;
      concordant += (pairs[i].first < pairs[j].first) == (pairs[i].second < pairs[j].second);
    }
  }
  EXPECT_LT(std::exp(log_ratio / pairs.size()), 2.0) << "geometric mean of predicted / exact, either way";
  EXPECT_GT(double(concordant) / comparable, 0.8) << "pairs ranked alike";

  EXPECT_TRUE(budget.quality_met(local.calibration, safety_used(budget, SearchStrategy::kAllocate)))
      << local.calibration.kl->mean.value;
  EXPECT_NEAR(local.calibration.kl->mean.value, whole_model_kl(s.model, s.data.calibration, local.weights), 1e-6);
  EXPECT_LT(plan_size(s.model, local.plan).bits_per_weight(), 8.0);
}

// Verify and repair on held-out windows: a budget tighter than the one allocated for makes it
// upgrade until it holds; a looser one makes it downgrade while it holds. Either way the result is
// what a whole pass over the final weights measures, and the plan names the final weights.
TEST(PrecisionOptimizer, VerifyAndRepairGoesBothWays) {
  Stories& s = stories();
  SearchOptions o;
  o.group_sizes = {128, 32};
  o.strategy = SearchStrategy::kAllocate;
  o.method = RoundingMethod::kClip;
  o.repair_failures = 3;
  GradualEvaluator calibration(s.data.calibration, EvaluatorOptions{}), heldout(s.data.evaluation, EvaluatorOptions{});
  calibration.set_reference(s.model);
  heldout.set_reference(s.model);
  const auto stats = s.model.capture_input_stats(s.data.calibration.inputs, 4, /*with_xtx=*/false);
  Budget allocated_for;
  allocated_for.max_kl = 0.04;
  allocated_for.safety = 1.0;
  const SearchResult base = PrecisionOptimizer(s.model, calibration, allocated_for, o, PrecisionPolicy{}, stats).allocate();
  for (double limit : {0.01, 0.2}) {
    Budget budget;
    budget.max_kl = limit;
    PrecisionOptimizer optimizer(s.model, calibration, budget, o, PrecisionPolicy{}, stats);
    SearchResult r = base;
    EvalResult measured;
    const std::vector<ValidationStep> steps = optimizer.verify_and_repair(r, heldout, measured);
    EXPECT_TRUE(budget.quality_met(measured)) << limit << ": " << measured.kl->mean.value;
    EXPECT_NEAR(measured.kl->mean.value, whole_model_kl(s.model, s.data.evaluation, r.weights), 1e-6);
    ASSERT_FALSE(steps.empty());
    if (limit < 0.04) EXPECT_GT(steps.front().extra_bits, 0) << "over the budget: an upgrade first";
    for (const ValidationStep& v : steps)
      if (limit > 0.04) EXPECT_LT(v.extra_bits, 0) << v.weight << ": within the budget, only downgrades";
    EXPECT_EQ(limit < 0.04, r.allocation.bytes > base.allocation.bytes);
    for (const PlanEntry& e : r.plan.entries) EXPECT_EQ(e.spec, r.weights.at(e.name).spec) << e.name;
    // Changes are measured in groups: one held-out pass per group, its KL shared by its changes.
    std::set<int64_t> passes;
    int64_t kept = 0;
    for (size_t i = 0; i < steps.size(); ++i) {
      passes.insert(steps[i].pass);
      kept += steps[i].kept;
      if (i > 0) EXPECT_GE(steps[i].pass, steps[i - 1].pass);
      if (i > 0 && steps[i].pass == steps[i - 1].pass) EXPECT_EQ(steps[i].kl_after, steps[i - 1].kl_after);
    }
    EXPECT_EQ(*passes.begin(), 1);
    EXPECT_EQ(*passes.rbegin(), static_cast<int64_t>(passes.size()));
    if (limit > 0.04) {
      ASSERT_GE(kept, 3) << "room for several downgrades";
      EXPECT_LT(passes.size(), steps.size()) << "downgrades that succeed are measured in growing groups";
      // It stops after repair_failures failed groups in all (kept ones between them do not restart the
      // count), or when nothing is left to try: every weight at its cheapest point but those whose
      // single downgrade failed.
      std::map<int64_t, std::vector<const ValidationStep*>> by_pass;
      for (const ValidationStep& v : steps) by_pass[v.pass].push_back(&v);
      int64_t failed = 0;
      std::set<std::string> dropped;
      for (const auto& [pass, changes] : by_pass) {
        if (changes.front()->kept) continue;
        ++failed;
        if (changes.size() == 1) dropped.insert(changes.front()->weight);
      }
      EXPECT_LE(failed, o.repair_failures);
      if (failed < o.repair_failures)
        for (const auto& [name, i] : r.allocation.choice)
          if (!dropped.count(name)) EXPECT_EQ(i, 0u) << name << " could still go down";
    }
  }
}

// GPTQ's X^T X collected one block at a time from the full-precision block inputs gives the
// allocation that X^T X captured for every weight up front gives: the same curves and plan.
TEST(PrecisionOptimizer, GptqWithXtxPerBlockEqualsXtxUpFront) {
  Stories& s = stories();
  ASSERT_TRUE(collects_xtx_per_block(s.model));
  Budget budget;
  budget.max_kl = 0.05;
  SearchOptions o;
  o.strategy = SearchStrategy::kAllocate;
  o.method = RoundingMethod::kGptq;
  o.group_sizes = {128};
  GradualEvaluator evaluator(s.data.calibration, EvaluatorOptions{});
  evaluator.set_reference(s.model);
  const auto batch = evaluator.batch();
  const auto with_xtx = s.model.capture_input_stats(s.data.calibration.inputs, batch, /*with_xtx=*/true);
  const auto without = s.model.capture_input_stats(s.data.calibration.inputs, batch, /*with_xtx=*/false);
  const SearchResult up_front = PrecisionOptimizer(s.model, evaluator, budget, o, PrecisionPolicy{}, with_xtx).allocate();
  const SearchResult per_block = PrecisionOptimizer(s.model, evaluator, budget, o, PrecisionPolicy{}, without).allocate();
  EXPECT_EQ(per_block.plan.to_json(), up_front.plan.to_json());
  for (const auto& [name, curve] : up_front.curves)
    for (size_t i = 0; i < curve.size(); ++i) EXPECT_EQ(per_block.curves.at(name)[i].kl, curve[i].kl) << name << " " << i;
  for (const auto& [name, t] : up_front.weights)
    EXPECT_TRUE(test::bitwise_equal(per_block.weights.at(name).dequantize(), t.dequantize())) << name;
}

// Under a perplexity budget the allocator prices each candidate at its KL times its block's
// ln-perplexity per KL, measured with the block's local factor: every hull point of the allocation is
// its curve point's KL times that ratio (the curves themselves stay KL), within [0.25, 4]. Under a KL
// budget, or with perplexity_prices off, the prices are the KLs.
TEST(PrecisionOptimizer, PerplexityBudgetsPriceEachBlockByItsPerplexityPerKl) {
  Stories& s = stories();
  SearchOptions o;
  o.group_sizes = {128, 32};
  o.first_order_weight = 0;  // prices alone (the next test adds the first-order terms)
  auto price_ratios = [&](const SearchResult& r) {
    std::map<std::string, double> ratio;
    for (const auto& [name, hull] : r.allocation.hulls) {
      const std::vector<CurvePoint>& curve = r.curves.at(name);
      for (const CurvePoint& p : hull) {
        const auto same = std::find_if(curve.begin(), curve.end(), [&](const CurvePoint& q) { return q.spec == p.spec; });
        EXPECT_NE(same, curve.end()) << name;
        if (same == curve.end() || same->kl <= 0) continue;
        const double r_p = p.kl / same->kl;
        if (ratio.count(name)) EXPECT_NEAR(ratio[name], r_p, 1e-9 * r_p) << name << ": one price per weight";
        ratio[name] = r_p;
      }
    }
    return ratio;
  };
  Budget perplexity;
  perplexity.max_ppl_increase = 0.05;
  const SearchResult priced = allocate_stories(perplexity, o);
  const int64_t blocks = s.model.stages()->num_blocks();
  ASSERT_EQ(static_cast<int64_t>(priced.ppl_per_kl.size()), blocks);
  bool any_not_one = false;
  for (double r : priced.ppl_per_kl) {
    EXPECT_GE(r, 0.25);
    EXPECT_LE(r, 4.0);
    any_not_one |= r != 1.0;
  }
  EXPECT_TRUE(any_not_one) << "every block measured exactly 1: the prices were not measured";
  const std::map<std::string, double> ratio = price_ratios(priced);
  for (const WeightInfo& w : s.model.weights()) {
    const int64_t b = s.model.block_position(w.block);
    if (!ratio.count(w.name)) continue;
    EXPECT_NEAR(ratio.at(w.name), b >= 0 ? priced.ppl_per_kl[static_cast<size_t>(b)] : 1.0, 1e-9) << w.name;
  }
  o.perplexity_prices = false;
  for (const auto& [name, r] : price_ratios(allocate_stories(perplexity, o))) EXPECT_NEAR(r, 1.0, 1e-12) << name;
  o.perplexity_prices = true;
  Budget kl;
  kl.max_kl = 0.05;
  for (const auto& [name, r] : price_ratios(allocate_stories(kl, o))) EXPECT_NEAR(r, 1.0, 1e-12) << name;
}

// With first-order terms (the default under a perplexity budget) each chosen candidate's curve
// point carries <g, W_q - W>, g the whole model's gradient of the fit windows' mean NLL, and every
// hull point of the allocation is priced at its KL times its block's perplexity per KL plus
// first_order_weight times that term, at least kFirstOrderFloor of the former: no candidate with KL
// is free, so every weight keeps a way back up for the repair. With the weight 0, or under a KL
// budget, there are none.
TEST(PrecisionOptimizer, FirstOrderTermsPriceTheFitWindowsGradientTimesTheChange) {
  Stories& s = stories();
  SearchOptions o;
  o.group_sizes = {128, 32};
  o.fit = s.data.evaluation.slice(0, 3);  // windows of their own
  ASSERT_GT(o.first_order_weight, 0);
  Budget perplexity;
  perplexity.max_ppl_increase = 0.05;
  const SearchResult r = allocate_stories(perplexity, o);
  const std::map<std::string, at::Tensor> g = test::whole_model_nll_gradients(s.model, o.fit);
  int64_t negative = 0, positive = 0;
  for (const auto& [name, q] : r.weights) {
    const std::vector<CurvePoint>& curve = r.curves.at(name);
    const auto p = std::find_if(curve.begin(), curve.end(), [&](const CurvePoint& c) { return c.spec == q.spec; });
    ASSERT_NE(p, curve.end()) << name;
    const double expected = (g.at(name).to(at::kDouble) *
                             (q.dequantize().to(at::kDouble) - s.model.original_weight(name).to(at::kDouble)))
                                .sum()
                                .item<double>();
    EXPECT_NEAR(p->first_order, expected, 1e-3 * std::abs(expected) + 1e-9) << name << " at " << q.spec.name();
    negative += p->first_order < 0;
    positive += p->first_order > 0;
  }
  EXPECT_GT(negative, 0) << "first-order terms have either sign";
  EXPECT_GT(positive, 0);
  int64_t priced = 0, floored = 0;
  for (const auto& [name, hull] : r.allocation.hulls) {
    const int64_t b = s.model.block_position(s.model.weights()[s.model.weight_index(name)].block);
    ASSERT_GE(b, 0) << name;
    for (const CurvePoint& h : hull) {
      const std::vector<CurvePoint>& curve = r.curves.at(name);
      const auto p = std::find_if(curve.begin(), curve.end(), [&](const CurvePoint& c) { return c.spec == h.spec; });
      ASSERT_NE(p, curve.end()) << name;
      const double second_order = p->kl * r.ppl_per_kl[static_cast<size_t>(b)];
      const double expected = std::max(
          {0.0, second_order + o.first_order_weight * p->first_order, SearchOptions::kFirstOrderFloor * second_order});
      EXPECT_NEAR(h.kl, expected, 1e-12 + 1e-9 * expected) << name << " at " << h.spec.name();
      if (p->kl > 0) EXPECT_GT(h.kl, 0) << name << " at " << h.spec.name();
      floored += p->kl > 0 && second_order + o.first_order_weight * p->first_order < h.kl;
      ++priced;
    }
  }
  EXPECT_GT(priced, 0);
  EXPECT_GT(floored, 0) << "no hull point at the floor: the test does not reach it";
  auto any_first_order = [](const SearchResult& x) {
    for (const auto& [name, curve] : x.curves)
      for (const CurvePoint& p : curve)
        if (p.first_order != 0) return true;
    return false;
  };
  EXPECT_TRUE(any_first_order(r));
  SearchOptions off = o;
  off.first_order_weight = 0;
  EXPECT_FALSE(any_first_order(allocate_stories(perplexity, off)));
  Budget kl;
  kl.max_kl = 0.05;
  EXPECT_FALSE(any_first_order(allocate_stories(kl, o)));
}

// GPTQ's candidates off the hull of (bytes, GPTQ's own output error) are not measured: each
// weight's screened curve is a subset of the full one with the same KL at every point it keeps, the
// count of those left out is reported, and the full search (screen_candidates off) leaves none out.
TEST(PrecisionOptimizer, GptqCandidatesOffTheOutputErrorHullAreNotMeasured) {
  Stories& s = stories();
  Budget budget;
  budget.max_kl = 0.05;
  SearchOptions o;
  o.strategy = SearchStrategy::kAllocate;
  o.method = RoundingMethod::kGptq;
  o.group_sizes = {128, 32, 16};
  o.encodings = {"asym", "s"};
  GradualEvaluator evaluator(s.data.calibration, EvaluatorOptions{});
  evaluator.set_reference(s.model);
  const SearchResult screened = PrecisionOptimizer(s.model, evaluator, budget, o, PrecisionPolicy{}, {}).allocate();
  o.screen_candidates = false;
  const SearchResult full = PrecisionOptimizer(s.model, evaluator, budget, o, PrecisionPolicy{}, {}).allocate();
  EXPECT_EQ(full.candidates_screened, 0);
  EXPECT_GT(screened.candidates_screened, 0);
  int64_t left_out = 0;
  for (const auto& [name, curve] : full.curves) {
    const std::vector<CurvePoint>& kept = screened.curves.at(name);
    left_out += static_cast<int64_t>(curve.size() - kept.size());
    for (const CurvePoint& p : kept) {
      const auto same = std::find_if(curve.begin(), curve.end(), [&](const CurvePoint& q) { return q.spec == p.spec; });
      ASSERT_NE(same, curve.end()) << name << " " << p.spec.name();
      EXPECT_EQ(same->kl, p.kl) << name << " " << p.spec.name();
      EXPECT_EQ(same->bytes, p.bytes) << name << " " << p.spec.name();
    }
  }
  EXPECT_EQ(left_out, screened.candidates_screened);
  EXPECT_LE(screened.candidates_quantized, full.candidates_quantized) << "a left-out candidate is quantized once, for its error";
  EXPECT_TRUE(budget.quality_met(screened.calibration, safety_used(budget, SearchStrategy::kAllocate)))
      << screened.calibration.kl->mean.value;
}

// With fit windows GPTQ's X^T X comes from them, not from the windows that measure the candidates:
// the same weights as X^T X captured on the fit windows up front, other weights than the
// calibration windows' own.
TEST(PrecisionOptimizer, GptqIsFittedOnTheFitWindows) {
  Stories& s = stories();
  Budget budget;
  budget.max_kl = 0.05;
  SearchOptions o;
  o.bits = {8, 4};
  o.group_sizes = {128};
  GradualEvaluator evaluator(s.data.calibration, EvaluatorOptions{});
  evaluator.set_reference(s.model);
  const Windows fit = s.data.evaluation.slice(0, 4);  // any text but the calibration windows
  const auto fit_xtx = s.model.capture_input_stats(fit.inputs, evaluator.batch(), /*with_xtx=*/true);
  const SearchResult up_front = PrecisionOptimizer(s.model, evaluator, budget, o, PrecisionPolicy{}, fit_xtx).allocate();
  SearchOptions given = o;
  given.fit = fit;
  const SearchResult per_block = PrecisionOptimizer(s.model, evaluator, budget, given, PrecisionPolicy{}, {}).allocate();
  const SearchResult on_calibration = PrecisionOptimizer(s.model, evaluator, budget, o, PrecisionPolicy{}, {}).allocate();
  EXPECT_EQ(per_block.plan.to_json(), up_front.plan.to_json());
  int64_t differ = 0;
  for (const auto& [name, t] : up_front.weights) {
    EXPECT_TRUE(test::bitwise_equal(per_block.weights.at(name).dequantize(), t.dequantize())) << name;
    const QuantizedTensor& c = on_calibration.weights.at(name);
    differ += c.spec == t.spec && !test::bitwise_equal(c.dequantize(), t.dequantize());
  }
  EXPECT_GT(differ, 0) << "weights of the same format fitted on other windows are other weights";
  // Fitted on the calibration windows, X^T X comes from the curves' cache of their block inputs; fit
  // windows equal to them but not the same tensor take the separate stream: the same weights.
  SearchOptions copied = o;
  copied.fit = s.data.calibration;
  copied.fit.inputs = s.data.calibration.inputs.clone();
  const SearchResult streamed = PrecisionOptimizer(s.model, evaluator, budget, copied, PrecisionPolicy{}, {}).allocate();
  EXPECT_EQ(streamed.plan.to_json(), on_calibration.plan.to_json());
  for (const auto& [name, t] : on_calibration.weights)
    EXPECT_TRUE(test::bitwise_equal(streamed.weights.at(name).dequantize(), t.dequantize())) << name;
  SearchOptions bad = o;
  bad.fit.inputs = at::zeros({4}, at::kLong);
  const std::string msg = test::expect_error([&] { bad.validate(); });
  EXPECT_NE(msg.find("got Long [4]"), std::string::npos) << msg;
}

// A memory target within a loose quality budget: the least predicted KL that fits it (the dual).
TEST(PrecisionOptimizer, AllocationForAMemoryTargetFitsIt) {
  Stories& s = stories();
  Budget budget;
  budget.max_ppl_increase = 1.0;
  budget.target_memory_reduction = 0.7;
  SearchOptions o;
  o.group_sizes = {128, 32};
  const SearchResult r = allocate_stories(budget, o);
  const PlanSize size = plan_size(s.model, r.plan);
  EXPECT_TRUE(r.memory_target_met);
  EXPECT_LE(double(size.quantized_bytes), 0.3 * size.fp16_bytes);
  ASSERT_EQ(r.confirmations.size(), 1u) << "the plan at the target met the budget: no target search";
  EXPECT_TRUE(r.confirmations[0].kept);
}

// A bf16 model (a scripted zoo model) starts from its own values, not rounded to fp16, and the
// search holds no copy of them: while the curves are measured, at most one block's weights differ
// from the loaded ones (before, every weight was set to its fp16 rounding: a second copy of the
// model for the whole search). Weights left unquantized are planned at bf16.
TEST(PrecisionOptimizer, ABfloat16ModelStartsFromItsLoadedWeights) {
  CausalLM model = CausalLM::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/zoo/models/hf_llama_tied_bf16.pt");
  ASSERT_EQ(model.dtype(), at::kBFloat16);
  EXPECT_EQ(search_start_spec(model.dtype()).level, QuantLevel::kBf16);
  EXPECT_EQ(search_start_spec(at::kFloat).level, QuantLevel::kFp16);
  EXPECT_EQ(search_start_spec(at::kHalf).level, QuantLevel::kFp16);
  const DataSplit data = test::small_stories_data();
  GradualEvaluator evaluator(data.calibration, EvaluatorOptions{});
  evaluator.set_reference(model);
  const auto stats = model.capture_input_stats(data.calibration.inputs, 4, /*with_xtx=*/false);
  Budget budget;
  budget.max_kl = 0.05;
  SearchOptions o;
  o.strategy = SearchStrategy::kAllocate;
  o.method = RoundingMethod::kClip;
  o.bits = {8, 4};
  PrecisionOptimizer optimizer(model, evaluator, budget, o, PrecisionPolicy{}, stats);
  int64_t largest_block = 0, model_bytes = 0;
  for (const BlockInfo& b : model.blocks()) {
    int64_t bytes = 0;
    for (size_t i : b.weights) bytes += 2 * model.weights()[i].numel();
    largest_block = std::max(largest_block, bytes);
  }
  for (const WeightInfo& w : model.weights()) model_bytes += 2 * w.numel();
  ASSERT_LT(largest_block, model_bytes) << "the test needs more than one block";
  int64_t reports = 0, most_changed = 0;
  const SearchResult r = optimizer.allocate([&](const SearchProgress& p) {
    if (p.detail.rfind("curves:", 0) != 0) return;
    ++reports;
    most_changed = std::max(most_changed, model.original_bytes());
  });
  ASSERT_GT(reports, 2);
  EXPECT_LE(most_changed, largest_block);
  for (const auto& [name, curve] : r.curves) EXPECT_EQ(curve.at(0).spec.level, QuantLevel::kBf16) << name;
  for (const PlanEntry& e : r.plan.entries)
    if (!e.spec.is_integer()) EXPECT_EQ(e.spec.level, QuantLevel::kBf16) << e.name;
  EXPECT_NEAR(r.calibration.kl->mean.value, whole_model_kl(model, data.calibration, r.weights), 1e-6);
  for (const WeightInfo& w : model.weights()) EXPECT_TRUE(model.holds_original(w.name)) << w.name;
}

TEST(SearchOptions, SearchStrategyNames) {
  EXPECT_EQ(parse_search_strategy("allocate"), SearchStrategy::kAllocate);
  EXPECT_EQ(search_strategy_name(parse_search_strategy("progressive")), "progressive");
  EXPECT_THROW(parse_search_strategy("greedy"), Error);
  // The defaults are what measured best on held-out text (docs/BENCHMARKS.md, "The budget allocator").
  EXPECT_EQ(SearchOptions{}.strategy, SearchStrategy::kAllocate);
  EXPECT_EQ(SearchOptions{}.method, RoundingMethod::kGptq);
}

// Through the orchestrator: no analysis phase, a plan within budget on held-out text.
TEST(GradualQuantizer, AllocationRunNeedsNoAnalysis) {
  Stories& s = stories();
  QuantizerOptions q;
  q.budget.max_ppl_increase = 0.05;
  q.search.strategy = SearchStrategy::kAllocate;
  q.search.group_sizes = {128, 32};
  const QuantizeOutcome out = GradualQuantizer(s.model, s.data.calibration, s.data.evaluation, q).run();
  EXPECT_EQ(out.status, QuantizeStatus::kMet);
  for (const PhaseTiming& p : out.phases) EXPECT_NE(p.name, "analysis");
  EXPECT_EQ(out.search_strategy, "allocate");
  EXPECT_FALSE(out.search_curves.empty());
  // The default screen (GPTQ's candidates) leaves some unmeasured, which the report and summary say.
  ASSERT_GT(out.search_candidates_screened, 0);
  const std::string report = quantize_report_json(s.model, out, {});
  EXPECT_NE(report.find(fmt::format("\"candidates_screened\": {}", out.search_candidates_screened)), std::string::npos);
  EXPECT_NE(format_quantize_summary(s.model, out, {}).find(fmt::format("{} not measured", out.search_candidates_screened)),
            std::string::npos);
}

}  // namespace
}  // namespace gradq
