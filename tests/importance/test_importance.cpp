// ImportanceAnalyzer on stories260K (real weights, real TinyStories text) and on the GPT-style
// fixture: probes restore the model bit for bit, RTN sensitivity orders by bit width, disabling a
// block costs more than 8-bit RTN of it, same seed gives the same analysis, the JSON round-trips, and
// the CLI prints its probe count, ranking and stability verdict.

#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "common/error.h"
#include "common/files.h"
#include "data/dataset.h"
#include "importance/analyzer.h"
#include "quant/quantize.h"
#include "report/analysis_chart.h"
#include "report/svg_chart.h"
#include "support/gpt_fixture.h"
#include "support/test_helpers.h"
#include "support/test_support.h"
#include "tokenizer/tokenizer.h"

namespace gradq {
namespace {
namespace fs = std::filesystem;

const std::vector<int64_t>& text_tokens() {
  static const std::vector<int64_t> tokens = [] {
    auto tok = Tokenizer::load_sentencepiece(test::tokenizer_model());
    return tok->encode(read_text_file(test::tinystories_text()).substr(0, 60000));
  }();
  return tokens;
}

Windows calibration(int64_t n, int64_t ctx) {
  WindowSpec spec;
  spec.ctx = ctx;
  spec.stride = ctx;
  spec.bos_id = 1;
  spec.max_windows = n;
  return make_windows(text_tokens(), spec);
}

// Small calibration settings keep the suite fast on 2 cores; the speed benchmark uses the CLI defaults.
AnalyzerOptions small_options() {
  AnalyzerOptions o;
  o.subsets = 4;
  o.batch = 8;
  o.group_size = 64;
  return o;
}

struct ParamSnapshot {
  std::vector<std::pair<std::string, at::Tensor>> values;
  std::vector<bool> requires_grad;
  std::vector<bool> has_grad;
  explicit ParamSnapshot(CausalLM& m) {
    for (const auto& p : m.module().named_parameters(true)) {
      values.emplace_back(p.name, p.value.detach().clone());
      requires_grad.push_back(p.value.requires_grad());
      has_grad.push_back(p.value.grad().defined());
    }
  }
  void expect_same(CausalLM& m) const {
    size_t i = 0;
    for (const auto& p : m.module().named_parameters(true)) {
      ASSERT_LT(i, values.size());
      EXPECT_EQ(p.name, values[i].first);
      EXPECT_TRUE(test::bitwise_equal(p.value.detach(), values[i].second)) << p.name;
      EXPECT_EQ(p.value.requires_grad(), requires_grad[i]) << p.name;
      EXPECT_EQ(p.value.grad().defined(), has_grad[i]) << p.name;
      ++i;
    }
    EXPECT_EQ(i, values.size());
  }
};

// One full analysis of stories260K shared by the tests that only read it.
struct StoriesAnalysis {
  CausalLM model = CausalLM::load(test::stories_pt());
  at::Tensor probe_tokens = calibration(2, 64).inputs;
  at::Tensor logits_before = model.logits(probe_tokens);
  ParamSnapshot params{model};
  std::vector<AnalysisProgress> progress;
  int64_t planned = 0;
  ImportanceAnalysis analysis;
  StoriesAnalysis() {
    AnalyzerOptions o = small_options();
    o.on_progress = [this](const AnalysisProgress& p) { progress.push_back(p); };
    ImportanceAnalyzer analyzer(model, calibration(8, 64), o);
    planned = analyzer.planned_passes();
    analysis = analyzer.run();
  }
};
StoriesAnalysis& stories() {
  static StoriesAnalysis s;
  return s;
}

// ---- Rank statistics, config, units ---------------------------------------------------------------

TEST(Stability, SpearmanAndVerdicts) {
  EXPECT_DOUBLE_EQ(spearman({1, 2, 3, 4}, {10, 20, 30, 40}), 1.0);
  EXPECT_DOUBLE_EQ(spearman({1, 2, 3, 4}, {4, 3, 2, 1}), -1.0);
  // Ties get average ranks: {1, 2.5, 2.5, 4} against {1, 2, 3, 4}.
  EXPECT_NEAR(spearman({1, 5, 5, 9}, {1, 2, 3, 4}), 0.9486832980505138, 1e-12);
  EXPECT_EQ(average_ranks({3, 1, 3, 2}), (std::vector<double>{3.5, 1, 3.5, 2}));
  EXPECT_NE(test::expect_error([] { spearman({1}, {1}); }).find("at least 2"), std::string::npos);

  StabilityReport same = rank_stability({{1, 2, 3}, {1, 2, 3}, {2, 4, 6}}, 0.7, 0.4);
  EXPECT_EQ(same.pairs.size(), 3u);
  EXPECT_DOUBLE_EQ(same.spearman_mean, 1.0);
  EXPECT_EQ(same.verdict, "stable");
  StabilityReport mixed = rank_stability({{1, 2, 3, 4}, {4, 3, 2, 1}}, 0.7, 0.4);
  EXPECT_DOUBLE_EQ(mixed.spearman_min, -1.0);
  EXPECT_EQ(mixed.verdict, "unstable");
  EXPECT_EQ(rank_stability({{1, 2, 3, 4, 5}, {1, 2, 3, 5, 4}}, 0.95, 0.4).verdict, "moderate");  // rho = 0.9
  EXPECT_EQ(rank_stability({{1, 2, 3}}, 0.7, 0.4).verdict, "n/a");

  Distribution d = describe({4, 1, 2, 8}, {"a", "b", "c", "d"}, 2);
  EXPECT_DOUBLE_EQ(d.min, 1);
  EXPECT_DOUBLE_EQ(d.max, 8);
  EXPECT_DOUBLE_EQ(d.median, 3);
  EXPECT_DOUBLE_EQ(d.mean, 3.75);
  EXPECT_NEAR(d.std, std::sqrt((0.0625 + 7.5625 + 3.0625 + 18.0625) / 4), 1e-12);
  ASSERT_TRUE(d.max_min_ratio.has_value());
  EXPECT_DOUBLE_EQ(*d.max_min_ratio, 8);
  EXPECT_EQ(d.top, (std::vector<std::string>{"d", "a"}));
  EXPECT_EQ(d.bottom, (std::vector<std::string>{"b", "c"}));
  EXPECT_FALSE(describe({0, 1}, {"x", "y"}).max_min_ratio.has_value());
}

TEST(Config, DefaultFileHasTheIssueWeights) {
  const std::string path = default_importance_config_path();
  ASSERT_TRUE(fs::exists(path)) << path;
  EXPECT_EQ(fs::canonical(path), fs::canonical(fs::path(GRADQ_TEST_SOURCE_DIR) / "configs" / "importance.json"));
  ImportanceConfig c = load_importance_config(path);
  EXPECT_DOUBLE_EQ(c.weights.at("rtn"), 0.40);
  EXPECT_DOUBLE_EQ(c.weights.at("upgrade"), 0.25);
  EXPECT_DOUBLE_EQ(c.weights.at("disable"), 0.20);
  EXPECT_DOUBLE_EQ(c.weights.at("noise"), 0.15);
  EXPECT_EQ(c.normalization, ScoreNormalization::kMax);
  EXPECT_EQ(c.rtn_score_bits, 4);
}

TEST(Config, BadFilesGiveClearErrors) {
  const std::string dir = test::temp_dir("importance_config");
  EXPECT_NE(test::expect_error([&] { load_importance_config(dir + "/missing.json"); }).find("does not exist"),
            std::string::npos);
  auto bad = [&](const std::string& text) {
    write_file_atomically(dir + "/c.json", text);
    return test::expect_error([&] { load_importance_config(dir + "/c.json"); });
  };
  EXPECT_NE(bad("{\"weights\": {\"rtn\": -1}}").find("must be a finite number >= 0, got -1"), std::string::npos);
  EXPECT_NE(bad("{\"weights\": {\"rtm\": 1}}").find("unknown score signal 'rtm'"), std::string::npos);
  EXPECT_NE(bad("{\"weights\": {\"rtn\": 0}}").find("must not all be zero"), std::string::npos);
  EXPECT_NE(bad("{\"weights\": {\"rtn\": \"high\"}}").find("must be a number"), std::string::npos);
  EXPECT_NE(bad("{\"normalisation\": \"max\"}").find("unknown key 'normalisation'"), std::string::npos);
  EXPECT_NE(bad("{\"normalization\": \"z\"}").find("\"max\" or \"rank\""), std::string::npos);
  EXPECT_NE(bad("{\"rtn_score_bits\": 3}").find("must be 2, 4 or 8 (the RTN probes measured), got 3"), std::string::npos);
  EXPECT_NE(bad("{\"stability\": {\"stable_above\": 0.2}}").find("moderate_above <= stable_above"), std::string::npos);
  EXPECT_NE(bad("{weights").find("not valid JSON"), std::string::npos);
  ImportanceConfig ok = [&] {
    write_file_atomically(dir + "/c.json", "{\"_comment\": \"x\", \"weights\": {\"fisher\": 2}, \"normalization\": \"rank\"}");
    return load_importance_config(dir + "/c.json");
  }();
  EXPECT_EQ(ok.weights.size(), 1u);
  EXPECT_EQ(ok.normalization, ScoreNormalization::kRank);
}

TEST(Units, LayersThenBlocks) {
  CausalLM model = CausalLM::load(test::stories_pt());
  auto units = importance_units(model);
  ASSERT_EQ(units.size(), 40u);  // 35 weights + 5 blocks
  EXPECT_EQ(units[0].kind, UnitKind::kLayer);
  EXPECT_EQ(units[0].name, "layers.0.attention.wq.weight");
  EXPECT_EQ(units[0].block, "layers.0");
  EXPECT_EQ(units[35].kind, UnitKind::kBlock);
  EXPECT_EQ(units[35].name, "layers.0");
  EXPECT_EQ(units[35].weights.size(), 7u);
  int64_t numel = 0;
  for (size_t i = 0; i < 7; ++i) numel += units[i].numel;
  EXPECT_EQ(units[35].numel, numel);
  EXPECT_EQ(noise_seed(1, "a"), noise_seed(1, "a"));
  EXPECT_NE(noise_seed(1, "a"), noise_seed(2, "a"));
  EXPECT_NE(noise_seed(1, "a"), noise_seed(1, "b"));
}

// ---- Probes on their own ----------------------------------------------------------------------------

TEST(Probes, WeightScopeRestoresBitExactly) {
  CausalLM model(test::make_gpt_fixture());
  ParamSnapshot before(model);
  const std::string w = model.weights()[0].name, bias = "transformer.h.0.attn.c_attn.bias";
  {
    WeightScope scope(model);
    scope.set_weight(w, at::zeros_like(model.weight(w)));
    scope.set_weight(w, at::ones_like(model.weight(w)));  // the first saved value wins
    scope.zero_parameter(bias);
    EXPECT_EQ(model.parameter(bias).abs().sum().item<double>(), 0.0);
    EXPECT_EQ(model.weight(w).sum().item<double>(), static_cast<double>(model.weight(w).numel()));
  }
  before.expect_same(model);
}

// Fake-quantized weights are kept up to the byte budget, least recently used dropped first, and are
// the same values whether they come from the cache or are made again.
TEST(Probes, WeightCacheStaysWithinItsByteBudget) {
  CausalLM model = CausalLM::load(test::stories_pt());
  const std::string a = model.weights()[0].name, b = model.weights()[1].name;
  const QuantSpec int4 = parse_quant_spec("b4g32");
  const int64_t one = static_cast<int64_t>(fake_quantize(model.weight(a), int4).nbytes());
  WeightCache cache(model, one);
  const at::Tensor first = cache.fake_quant(a, int4);
  EXPECT_EQ(cache.bytes(), one);
  EXPECT_TRUE(test::bitwise_equal(first, fake_quantize(model.weight(a), int4)));
  EXPECT_TRUE(cache.fake_quant(a, int4).is_same(first)) << "a hit returns the kept tensor";
  cache.fake_quant(b, int4);  // a is dropped for b
  EXPECT_LE(cache.bytes(), one);
  const at::Tensor again = cache.fake_quant(a, int4);
  EXPECT_FALSE(again.is_same(first)) << "a was dropped and made again";
  EXPECT_TRUE(test::bitwise_equal(again, first));
  GRADQ_EXPECT_THROW_MSG(WeightCache(model, -1), "byte budget must be >= 0");
}

TEST(Probes, EachProbeOnItsOwn) {
  CausalLM model = CausalLM::load(test::stories_pt());
  ProbeEvaluator ev(model, calibration(4, 64), 2);
  EXPECT_EQ(ev.passes(), 1);
  EXPECT_EQ(ev.subsets(), 2);
  EXPECT_EQ(ev.subset_tokens(0) + ev.subset_tokens(1), ev.scored_tokens());
  ProbeMeasure self = ev.measure(model);
  EXPECT_EQ(self.kl, 0.0);  // the reference against itself
  EXPECT_NEAR(self.delta_ppl, 0.0, 1e-9);
  WeightCache cache(model);
  auto units = importance_units(model);
  const ImportanceUnit& wq = units[0];
  QuantSpec prune;
  prune.level = QuantLevel::kPrune;
  ProbeMeasure pruned = probe_rtn(model, ev, cache, wq, prune);
  ProbeMeasure disabled = probe_disable(model, ev, wq);
  EXPECT_GT(pruned.kl, 0);
  EXPECT_EQ(pruned.kl, disabled.kl);  // pruning a layer is disabling it
  EXPECT_EQ(pruned.subset_kl, disabled.subset_kl);
  // The mean KL is the token-weighted mean of the subset means.
  const double n0 = static_cast<double>(ev.subset_tokens(0)), n1 = static_cast<double>(ev.subset_tokens(1));
  EXPECT_NEAR(pruned.kl, (n0 * pruned.subset_kl[0] + n1 * pruned.subset_kl[1]) / (n0 + n1), 1e-9 * pruned.kl);
  ProbeMeasure small = probe_noise(model, ev, cache, wq, 0.01, 7), large = probe_noise(model, ev, cache, wq, 0.5, 7);
  EXPECT_GT(small.kl, 0);
  EXPECT_GT(large.kl, small.kl);
  EXPECT_EQ(probe_noise(model, ev, cache, wq, 0.5, 7).kl, large.kl);  // seeded
  QuantSpec q4, q8;
  q4.group_size = q8.group_size = 64;
  q8.level = QuantLevel::kInt8;
  ProbeMeasure base = probe_baseline(model, ev, cache, q4);
  ProbeMeasure up = probe_upgrade(model, ev, cache, units[35], q4, q8);
  EXPECT_GT(base.kl, up.kl);  // raising a whole block to 8 bits recovers KL
  EXPECT_EQ(ev.passes(), 1 + 1 + 2 + 3 + 2);
  EXPECT_TRUE(test::bitwise_equal(model.weight(wq.name), cache.original(wq.name)));
}

TEST(Probes, StaticSignalsNeedAutogradAndRestoreFlags) {
  CausalLM model = CausalLM::load(test::stories_pt());
  ProbeEvaluator ev(model, calibration(4, 64), 2);
  WeightCache cache(model);
  QuantSpec q4;
  q4.group_size = 64;
  ParamSnapshot before(model);
  {
    c10::InferenceMode guard;
    EXPECT_NE(test::expect_error([&] { static_signals(model, ev, cache, q4, 4); }).find("InferenceMode"), std::string::npos);
  }
  StaticSignals s = static_signals(model, ev, cache, q4, 4);
  before.expect_same(model);
  ASSERT_EQ(s.weights.size(), 35u);
  for (const auto& [name, w] : s.weights) {
    EXPECT_NEAR(w.weight_magnitude, cache.original(name).abs().mean().item<double>(), 1e-6 * w.weight_magnitude) << name;
    EXPECT_GT(w.activation_sq_mean, 0) << name;
    EXPECT_GT(w.gradient_magnitude, 0) << name;
    EXPECT_GT(w.fisher, 0) << name;
    ASSERT_EQ(w.gradient_magnitude_subsets.size(), 2u);
    ASSERT_EQ(w.fisher_subsets.size(), 2u);
  }
  // The gradient of one weight against a finite difference of the mean NLL over all windows.
  const std::string name = "layers.4.feed_forward.w2.weight";
  at::Tensor w = cache.original(name);
  auto nll = [&](const at::Tensor& value) {
    WeightScope scope(model);
    scope.set_weight(name, value);
    return std::log(ev.measure(model).delta_ppl + ev.reference_ppl());
  };
  at::Tensor dir = at::sign(w) * 1e-3;  // the directional derivative along sign(W) is sum |g_ij| only for aligned signs
  const double fd = (nll(w + dir) - nll(w - dir)) / 2;
  EXPECT_GT(std::abs(fd), 0);
  EXPECT_LE(std::abs(fd), s.weights.at(name).gradient_magnitude * static_cast<double>(w.numel()) * 1e-3 * 1.05);
}

// ---- The full analysis on stories260K ------------------------------------------------------------------

TEST(Analysis, ModelIsBitIdenticalAfterwards) {
  StoriesAnalysis& s = stories();
  EXPECT_TRUE(test::bitwise_equal(s.model.logits(s.probe_tokens), s.logits_before));
  s.params.expect_same(s.model);
}

TEST(Analysis, CountsPassesAndReportsProgress) {
  StoriesAnalysis& s = stories();
  const ImportanceAnalysis& a = s.analysis;
  ASSERT_EQ(a.units.size(), 40u);
  // Local measurement (the default): per block one exact calibration probe, which is also the block
  // unit's RTN-4 probe, its local error, and the block's local error at the upgrade baseline.
  EXPECT_EQ(a.measurement, "local");
  EXPECT_EQ(s.planned, 1 + 1 + 6 * 40 + 2 + 2 * 5);
  EXPECT_EQ(a.timing.forward_passes, 1 + 1 + 6 * 40 + 2 * 5);
  EXPECT_EQ(a.timing.gradient_passes, 1);
  EXPECT_EQ(a.timing.capture_passes, 1);
  EXPECT_GT(a.timing.seconds_per_pass(), 0);
  ASSERT_EQ(static_cast<int64_t>(s.progress.size()), s.planned);
  for (size_t i = 0; i < s.progress.size(); ++i) {
    EXPECT_EQ(s.progress[i].done, static_cast<int64_t>(i) + 1);
    EXPECT_EQ(s.progress[i].total, s.planned);
  }
  EXPECT_EQ(s.progress.front().what, "reference");
  EXPECT_EQ(a.windows, 8);
  EXPECT_EQ(a.ctx, 64);
  EXPECT_EQ(a.scored_tokens, 8 * 64);
}

// ---- Measurement modes -------------------------------------------------------------------------

TEST(Measurement, ExactFromTheBlockEqualsTheWholeModel) {
  CausalLM model = CausalLM::load(test::stories_pt());
  ProbeEvaluator evaluator(model, calibration(8, 64), 4);
  ASSERT_NE(evaluator.cache(), nullptr) << model.stages_unavailable_reason();
  WeightCache cache(model);
  for (const char* name : {"layers.2.attention.wk.weight", "layers.4.feed_forward.w2.weight"}) {
    const ImportanceUnit unit = importance_units(model)[model.weight_index(name)];
    const int64_t block = model.block_position(unit.block);
    const QuantSpec spec = parse_quant_spec("b2g64");
    const ProbeMeasure whole = probe_rtn(model, evaluator, cache, unit, spec);
    const ProbeMeasure exact = probe_rtn(model, evaluator, cache, unit, spec, {Measurement::kExact, block});
    EXPECT_GT(whole.kl, 0) << name;
    EXPECT_EQ(exact.kl, whole.kl) << name;
    EXPECT_EQ(exact.delta_ppl, whole.delta_ppl) << name;
    EXPECT_EQ(exact.subset_kl, whole.subset_kl) << name;
  }
}

TEST(Measurement, LocalNeedsACalibratedBlockAndPredictsTheCalibrationExactly) {
  CausalLM model = CausalLM::load(test::stories_pt());
  ProbeEvaluator evaluator(model, calibration(8, 64), 4);
  WeightCache cache(model);
  const auto units = importance_units(model);
  const ImportanceUnit& block_unit = units.back();  // layers.4
  ASSERT_EQ(block_unit.kind, UnitKind::kBlock);
  const int64_t block = model.block_position(block_unit.block);
  GRADQ_EXPECT_THROW_MSG(evaluator.measure_local(block), "no calibrated local factor");
  const QuantSpec spec = parse_quant_spec("b4g64");
  const ProbeMeasure exact = calibrate_local(model, evaluator, cache, block_unit, block, spec);
  EXPECT_GT(exact.local_error, 0);
  EXPECT_GT(evaluator.local_factor(block), 0);
  const ProbeMeasure local = probe_rtn(model, evaluator, cache, block_unit, spec, {Measurement::kLocal, block});
  EXPECT_NEAR(local.kl, exact.kl, 1e-9 * exact.kl);
  EXPECT_DOUBLE_EQ(local.local_error, exact.local_error);
}

// How well local measurement ranks the layers, against exact measurements of the same probes.
TEST(Measurement, LocalRanksLayersLikeExact) {
  CausalLM model = CausalLM::load(test::stories_pt());
  AnalyzerOptions o = small_options();
  o.static_signals = false;
  o.measurement = Measurement::kExact;
  const ImportanceAnalysis exact = ImportanceAnalyzer(model, calibration(8, 64), o).run();
  EXPECT_EQ(exact.measurement, "exact");
  const ImportanceAnalysis& local = stories().analysis;
  std::vector<double> kl_exact, kl_local;
  for (size_t i = 0; i < exact.units.size(); ++i) {
    if (exact.units[i].unit.kind != UnitKind::kLayer) continue;
    kl_exact.push_back(exact.units[i].probes.at("rtn_int4").kl);
    kl_local.push_back(local.units[i].probes.at("rtn_int4").kl);
    const double ratio = kl_local.back() / kl_exact.back();
    EXPECT_GT(ratio, 0.2) << exact.units[i].unit.name;
    EXPECT_LT(ratio, 5.0) << exact.units[i].unit.name;
  }
  const double rho = spearman(kl_exact, kl_local);
  std::cout << "local vs exact rtn_int4 KL over " << kl_exact.size() << " layers: Spearman " << rho << "\n";
  EXPECT_GT(rho, 0.8);
}

TEST(Analysis, RtnSensitivityOrdersByBits) {
  for (const UnitImportance& u : stories().analysis.units) {
    const double kl8 = u.probes.at("rtn_int8").kl, kl4 = u.probes.at("rtn_int4").kl, kl2 = u.probes.at("rtn_int2").kl;
    EXPECT_GT(kl8, 0) << u.unit.name;
    EXPECT_GT(kl4, kl8) << u.unit.name;
    EXPECT_GT(kl2, kl4) << u.unit.name;
  }
}

TEST(Analysis, DisablingABlockCostsMoreThanRtn8OfIt) {
  int blocks = 0;
  for (const UnitImportance& u : stories().analysis.units) {
    if (u.unit.kind != UnitKind::kBlock) continue;
    ++blocks;
    EXPECT_GT(u.probes.at("disable").kl, u.probes.at("rtn_int8").kl) << u.unit.name;
    EXPECT_GT(u.probes.at("disable").delta_ppl, 0) << u.unit.name;
  }
  EXPECT_EQ(blocks, 5);
}

TEST(Analysis, ScoresRanksStabilityAndDistribution) {
  const ImportanceAnalysis& a = stories().analysis;
  for (UnitKind kind : {UnitKind::kLayer, UnitKind::kBlock}) {
    auto ranked = a.ranked(kind);
    ASSERT_EQ(ranked.size(), kind == UnitKind::kLayer ? 35u : 5u);
    for (size_t i = 0; i < ranked.size(); ++i) {
      EXPECT_EQ(ranked[i]->rank, static_cast<int64_t>(i) + 1);
      if (i) EXPECT_GE(ranked[i - 1]->score, ranked[i]->score);
      EXPECT_GE(ranked[i]->score, 0);
      EXPECT_LE(ranked[i]->score, 1 + 1e-12);
      EXPECT_EQ(ranked[i]->subset_scores.size(), 4u);
    }
  }
  // Max normalization: the top unit of each weighted signal has normalized value 1; the score is the
  // weighted mean of the normalized signals.
  for (const UnitImportance& u : a.units) {
    double expected = 0;
    for (const auto& [signal, w] : a.options.config.weights) expected += w * u.normalized.at(signal);
    EXPECT_NEAR(u.score, expected, 1e-12) << u.unit.name;
    EXPECT_NEAR(u.signals.at("upgrade").front(), a.baseline.kl - u.probes.at("upgrade").kl, 1e-15);
  }
  double max_rtn = 0;
  for (const UnitImportance* u : a.ranked(UnitKind::kLayer)) max_rtn = std::max(max_rtn, u->normalized.at("rtn"));
  EXPECT_DOUBLE_EQ(max_rtn, 1.0);
  EXPECT_EQ(a.layer_stability.subsets, 4);
  EXPECT_EQ(a.layer_stability.pairs.size(), 6u);
  EXPECT_LE(a.layer_stability.spearman_min, a.layer_stability.spearman_mean);
  EXPECT_EQ(a.verdict, a.layer_stability.verdict);
  EXPECT_TRUE(a.verdict == "stable" || a.verdict == "moderate" || a.verdict == "unstable") << a.verdict;
  ASSERT_TRUE(a.layer_distribution.has_value());
  EXPECT_EQ(a.layer_distribution->top.front(), a.ranked(UnitKind::kLayer).front()->unit.name);
  EXPECT_EQ(a.layer_distribution->bottom.front(), a.ranked(UnitKind::kLayer).back()->unit.name);
  EXPECT_DOUBLE_EQ(a.layer_distribution->max, a.ranked(UnitKind::kLayer).front()->score);
  // Static signals are present for every unit, positive, and a block's Fisher term is its layers' sum.
  for (const UnitImportance& u : a.units) {
    for (const char* key : {"weight_magnitude", "activation_sq_mean", "gradient_magnitude", "fisher"})
      EXPECT_GT(u.signals.at(key).front(), 0) << u.unit.name << " " << key;
    if (u.unit.kind == UnitKind::kBlock) {
      double sum = 0;
      for (const std::string& w : u.unit.weights) sum += a.unit(w).signals.at("fisher").front();
      EXPECT_NEAR(u.signals.at("fisher").front(), sum, 1e-12 * sum);
    }
  }
}

TEST(Analysis, RescoringWithRankNormalization) {
  ImportanceAnalysis a = stories().analysis;
  ImportanceConfig c;
  c.normalization = ScoreNormalization::kRank;
  c.weights = {{"gradient_magnitude", 1.0}};
  score_analysis(a, c);
  const UnitImportance* top = a.ranked(UnitKind::kLayer).front();
  for (const UnitImportance* u : a.ranked(UnitKind::kLayer)) {
    EXPECT_GE(top->signals.at("gradient_magnitude").front(), u->signals.at("gradient_magnitude").front());
    EXPECT_DOUBLE_EQ(u->score, u->normalized.at("gradient_magnitude"));
  }
  EXPECT_DOUBLE_EQ(top->score, 1.0);
  EXPECT_DOUBLE_EQ(a.ranked(UnitKind::kLayer).back()->score, 0.0);
}

TEST(Analysis, JsonRoundTripsAndChartIsWritten) {
  const ImportanceAnalysis& a = stories().analysis;
  const std::string dir = test::temp_dir("importance_json");
  save_analysis(dir + "/a.json", a);
  ImportanceAnalysis loaded = load_analysis(dir + "/a.json");
  EXPECT_EQ(analysis_json(loaded), read_file(dir + "/a.json"));
  EXPECT_EQ(loaded.units.size(), a.units.size());
  EXPECT_EQ(loaded.unit("layers.2").rank, a.unit("layers.2").rank);
  auto j = nlohmann::json::parse(read_file(dir + "/a.json"));
  EXPECT_EQ(j["format"], "gradq-importance-analysis");
  EXPECT_EQ(j["ranking"]["layers"].size(), 35u);
  EXPECT_EQ(j["units"][0]["probes"].size(), 6u);
  for (const char* key : {"rtn_int8", "rtn_int4", "rtn_int2", "noise", "disable", "upgrade"})
    EXPECT_TRUE(j["units"][0]["probes"].contains(key)) << key;
  EXPECT_EQ(j["units"][0]["signals"].size(), kScoreSignals.size());
  EXPECT_TRUE(j["stability"]["layers"].contains("spearman_mean"));
  EXPECT_TRUE(j["distribution"]["layers"].contains("max_min_ratio"));
  EXPECT_GT(j["timing"]["seconds_per_pass"].get<double>(), 0);

  EXPECT_NE(test::expect_error([&] { load_analysis(dir + "/missing.json"); }).find("missing.json"), std::string::npos);
  write_file_atomically(dir + "/bad.json", "{\"format\": \"gradq-importance-analysis\", \"version\": 1}");
  EXPECT_NE(test::expect_error([&] { load_analysis(dir + "/bad.json"); }).find("bad.json"), std::string::npos);
  write_file_atomically(dir + "/other.json", "{\"tokens\": 5}");
  EXPECT_NE(test::expect_error([&] { load_analysis(dir + "/other.json"); }).find("not a gradq importance analysis"),
            std::string::npos);

  const std::string svg = analysis_chart_svg(a);
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  for (const UnitImportance* u : a.ranked(UnitKind::kLayer)) EXPECT_NE(svg.find(u->unit.name), std::string::npos);
  EXPECT_EQ(std::count(svg.begin(), svg.end(), '\n') > 35, true);
  write_svg(dir + "/a.svg", svg);
  EXPECT_EQ(read_file(dir + "/a.svg"), svg);
}

TEST(Analysis, TableShowsRankingAndVerdict) {
  const std::string table = format_analysis_table(stories().analysis);
  for (const char* s : {"layers (35)", "blocks (5)", "rtn int4", "stability verdict:", "Spearman mean", "max/min",
                        "most important:", "forward ("})
    EXPECT_NE(table.find(s), std::string::npos) << s << "\n" << table;
}

// ---- Determinism ------------------------------------------------------------------------------------------

std::string without_timing(const ImportanceAnalysis& a) {
  auto j = nlohmann::json::parse(analysis_json(a));
  j.erase("timing");
  return j.dump();
}

TEST(Analysis, SameSeedSameResultOtherSeedOtherNoise) {
  // Block 0 only (the other weights excluded), to keep the three analyses quick.
  AdapterOptions adapter;
  adapter.exclude = {R"(^layers\.[1-9])"};
  CausalLM model = CausalLM::load(test::stories_pt(), adapter);
  ASSERT_EQ(model.weights().size(), 7u);
  AnalyzerOptions o = small_options();
  o.seed = 42;
  const Windows w = calibration(8, 32);
  ImportanceAnalysis a = ImportanceAnalyzer(model, w, o).run();
  ImportanceAnalysis b = ImportanceAnalyzer(model, w, o).run();
  EXPECT_EQ(without_timing(a), without_timing(b));
  for (size_t i = 0; i < a.units.size(); ++i) EXPECT_EQ(a.units[i].rank, b.units[i].rank);
  o.seed = 43;
  ImportanceAnalysis c = ImportanceAnalyzer(model, w, o).run();
  for (size_t i = 0; i < a.units.size(); ++i) {
    EXPECT_NE(a.units[i].probes.at("noise").kl, c.units[i].probes.at("noise").kl) << a.units[i].unit.name;
    EXPECT_EQ(a.units[i].probes.at("rtn_int4").kl, c.units[i].probes.at("rtn_int4").kl) << a.units[i].unit.name;
  }
}

// A head reference in the probes (kHead, or kAuto resolved to it) recomputes the reference with
// float32's formula: every probe's KL equals float32 storage's bit for bit. A model whose embeddings
// are probed cannot have one: explicit head says why, auto keeps fp16.
TEST(Analysis, HeadReferenceEqualsFloat32) {
  AdapterOptions adapter;
  adapter.exclude = {R"(^layers\.[1-9])"};
  CausalLM model = CausalLM::load(test::stories_pt(), adapter);
  AnalyzerOptions o = small_options();
  const Windows w = calibration(8, 32);
  o.reference_storage = ReferenceStorage::float32();
  const ImportanceAnalysis full = ImportanceAnalyzer(model, w, o).run();
  o.reference_storage = ReferenceStorage::head();
  const ImportanceAnalysis head = ImportanceAnalyzer(model, w, o).run();
  ASSERT_EQ(full.units.size(), head.units.size());
  int64_t measured = 0;
  for (size_t i = 0; i < full.units.size(); ++i) {
    ASSERT_EQ(full.units[i].probes.size(), head.units[i].probes.size());
    for (const auto& [probe, m] : full.units[i].probes) {
      measured += m.kl > 0;
      EXPECT_EQ(m.kl, head.units[i].probes.at(probe).kl) << full.units[i].unit.name << " " << probe;
      EXPECT_EQ(m.subset_kl, head.units[i].probes.at(probe).subset_kl) << full.units[i].unit.name << " " << probe;
    }
    EXPECT_EQ(full.units[i].rank, head.units[i].rank);
  }
  EXPECT_GT(measured, 10);
  adapter.include = {"tok_embeddings"};
  CausalLM with_embeddings = CausalLM::load(test::stories_pt(), adapter);
  GRADQ_EXPECT_THROW_MSG(ImportanceAnalyzer(with_embeddings, w, o).run(),
                         "only weights inside blocks may be quantized; 'tok_embeddings.weight'");
  o.reference_storage = ReferenceStorage::automatic();
  EXPECT_NO_THROW(ImportanceAnalyzer(with_embeddings, w, o).run());
}

// ---- The GPT-style fixture ----------------------------------------------------------------------------

TEST(Analysis, RunsOnTheGptFixture) {
  test::GptConfig cfg;
  cfg.layers = 4;
  CausalLM model(test::make_gpt_fixture(cfg));
  const Windows w = calibration(4, 48);
  at::Tensor before = model.logits(w.inputs);
  ParamSnapshot params(model);
  AnalyzerOptions o = small_options();
  o.subsets = 2;
  o.group_size = 32;
  ImportanceAnalysis a = ImportanceAnalyzer(model, w, o).run();
  EXPECT_TRUE(test::bitwise_equal(model.logits(w.inputs), before));
  params.expect_same(model);  // block-disable zeroes biases too: they are back
  ASSERT_EQ(a.units.size(), 4u * 4 + 4);
  EXPECT_EQ(a.unit("transformer.h.0.attn.c_attn.weight").unit.kind, UnitKind::kLayer);
  for (const UnitImportance& u : a.units) {
    EXPECT_GT(u.probes.at("rtn_int4").kl, u.probes.at("rtn_int8").kl) << u.unit.name;
    EXPECT_GT(u.probes.at("rtn_int2").kl, u.probes.at("rtn_int4").kl) << u.unit.name;
    if (u.unit.kind == UnitKind::kBlock) EXPECT_GT(u.probes.at("disable").kl, u.probes.at("rtn_int8").kl) << u.unit.name;
  }
  EXPECT_EQ(a.layer_stability.pairs.size(), 1u);
}

// ---- Errors ---------------------------------------------------------------------------------------------

TEST(Analysis, BadOptionsGiveClearErrors) {
  CausalLM model = CausalLM::load(test::stories_pt());
  const Windows w = calibration(4, 32);
  auto error = [&](const std::function<void(AnalyzerOptions&)>& change) {
    AnalyzerOptions o = small_options();
    o.subsets = 2;
    change(o);
    return test::expect_error([&] { ImportanceAnalyzer(model, w, o); });
  };
  EXPECT_NE(error([](AnalyzerOptions& o) { o.subsets = 5; }).find("at least as many calibration windows as subsets (5), got 4"),
            std::string::npos);
  EXPECT_NE(error([](AnalyzerOptions& o) { o.group_size = 100; }).find("100"), std::string::npos);
  EXPECT_NE(error([](AnalyzerOptions& o) { o.noise_alpha = 0; }).find("alpha"), std::string::npos);
  EXPECT_NE(error([](AnalyzerOptions& o) { o.upgrade_from_bits = 8; }).find("from 8 to 8 bits"), std::string::npos);
  EXPECT_NE(error([](AnalyzerOptions& o) { o.config.weights = {{"rtn", -0.5}}; }).find("-0.5"), std::string::npos);
  EXPECT_NE(error([](AnalyzerOptions& o) { o.config.weights = {{"speed", 1}}; }).find("unknown score signal 'speed'"),
            std::string::npos);
  EXPECT_NE(error([](AnalyzerOptions& o) {
              o.static_signals = false;
              o.config.weights["fisher"] = 0.5;
            }).find("static signal 'fisher' (0.5), but static signals are off"),
            std::string::npos);
  // A model whose quantizable weights are all excluded has nothing to analyze.
  AdapterOptions none;
  none.exclude = {"."};
  CausalLM empty = CausalLM::load(test::stories_pt(), none);
  EXPECT_NE(test::expect_error([&] { ImportanceAnalyzer(empty, w, small_options()); }).find("no quantizable weights"),
            std::string::npos);
}

// ---- CLI ---------------------------------------------------------------------------------------------------

TEST(Cli, AnalyzePrintsProbesRankingAndVerdict) {
  const std::string dir = test::temp_dir("importance_cli");
  auto [hrc, hout] = test::run(test::cli() + " --help");
  EXPECT_NE(hout.find("analyze"), std::string::npos);
  auto [rc, out] = test::run(test::cli() + " analyze --model " + test::stories_pt() +
                             " --calib-windows 8 --ctx 64 --batch 8 --group-size 64 --threads 1 -o " + dir +
                             "/a.json --chart " + dir + "/a.svg");
  ASSERT_EQ(rc, 0) << out;
  for (const char* s : {"analyzing 40 units (35 layers, 5 blocks): 241 probes, 254 passes", "[####", "ETA",
                        "layers (35), most important first", "stability verdict: ", "wrote "})
    EXPECT_NE(out.find(s), std::string::npos) << s << "\n" << out;
  ImportanceAnalysis a = load_analysis(dir + "/a.json");
  EXPECT_EQ(a.units.size(), 40u);
  EXPECT_NE(out.find("stability verdict: " + a.verdict), std::string::npos);
  EXPECT_EQ(a.inputs.at("model"), test::stories_pt());
  EXPECT_EQ(read_file(dir + "/a.svg").rfind("<?xml", 0), 0u);
}

TEST(Cli, AnalyzeErrorsAreOneLine) {
  const std::string dir = test::temp_dir("importance_cli_err");
  write_file_atomically(dir + "/bad.json", "{\"weights\": {\"rtn\": -1}}");
  for (const std::string args :
       {std::string("analyze --calib-windows 2"), "analyze -o " + dir + "/a.json --config " + dir + "/missing.json",
        "analyze -o " + dir + "/a.json --config " + dir + "/bad.json",
        "analyze -o " + dir + "/a.json --calib-windows 2 --subsets 4 --ctx 32",
        "analyze -o " + test::tokenizer_model()}) {
    auto [rc, out] = test::run(test::cli() + " " + args);
    EXPECT_EQ(rc, 1) << args << ": " << out;
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << args << ": " << out;
    EXPECT_NE(out.find("gradq analyze: error:"), std::string::npos) << out;
  }
  EXPECT_FALSE(fs::exists(dir + "/a.json"));
}

}  // namespace
}  // namespace gradq
