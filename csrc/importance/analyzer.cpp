#include "importance/analyzer.h"

#include <algorithm>
#include <cmath>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <numeric>

#include "common/error.h"
#include "common/files.h"
#include "common/json_integer.h"
#include "common/timing.h"
#include "quant/quant_spec.h"

namespace gradq {

const std::vector<int> kRtnProbeBits = {8, 4, 2};

namespace {
using nlohmann::json;

constexpr const char* kFormat = "gradq-importance-analysis";
constexpr int kFormatVersion = 1;
constexpr int kProbesPerUnit = 6;  // noise, rtn x3, disable, upgrade

std::string rtn_key(int bits) { return fmt::format("rtn_int{}", bits); }

QuantSpec int_spec(int bits, int64_t group_size) {
  QuantSpec spec;
  spec.level = quant_level_for_bits(bits);
  spec.group_size = group_size;
  return spec;
}

void validate_options(const AnalyzerOptions& o) {
  GRADQ_CHECK(std::isfinite(o.noise_alpha) && o.noise_alpha > 0, "noise alpha must be a finite number > 0, got {}",
              o.noise_alpha);
  GRADQ_CHECK(o.subsets >= 1, "expected at least 1 calibration subset, got {}", o.subsets);
  GRADQ_CHECK(o.batch >= 1, "batch must be positive, got {}", o.batch);
  GRADQ_CHECK(o.upgrade_from_bits < o.upgrade_to_bits, "the upgrade probe must raise the bit width: from {} to {} bits",
              o.upgrade_from_bits, o.upgrade_to_bits);
  for (int bits : {o.upgrade_from_bits, o.upgrade_to_bits}) int_spec(bits, o.group_size).validate();
  int_spec(8, o.group_size).validate();  // names the valid group sizes for a bad one
  o.config.validate();
  if (!o.static_signals)
    for (const char* key : {"weight_magnitude", "activation_sq_mean", "gradient_magnitude", "fisher"})
      if (auto it = o.config.weights.find(key); it != o.config.weights.end())
        GRADQ_CHECK(it->second == 0, "the score weighs the static signal '{}' ({}), but static signals are off", key,
                    it->second);
}

// Normalized values over the units of one kind (importance_config.h).
std::vector<double> normalize(const std::vector<double>& v, ScoreNormalization how) {
  std::vector<double> out(v.size(), 0.0);
  if (v.empty()) return out;
  if (how == ScoreNormalization::kRank) {
    if (v.size() == 1) return {1.0};
    const std::vector<double> r = average_ranks(v);
    for (size_t i = 0; i < v.size(); ++i) out[i] = (r[i] - 1) / static_cast<double>(v.size() - 1);
    return out;
  }
  double mx = 0;
  for (double x : v) mx = std::max(mx, x);
  if (mx <= 0) return out;
  for (size_t i = 0; i < v.size(); ++i) out[i] = std::max(0.0, v[i]) / mx;
  return out;
}

json measure_json(const ProbeMeasure& m) {
  json j{{"kl", m.kl}, {"delta_ppl", m.delta_ppl}, {"subset_kl", m.subset_kl}};
  if (m.local_error >= 0) j["local_error"] = m.local_error;
  return j;
}
ProbeMeasure measure_from(const json& j) {
  return {j.at("kl").get<double>(), j.at("delta_ppl").get<double>(), j.at("subset_kl").get<std::vector<double>>(),
          j.value("local_error", -1.0)};
}

json stability_json(const StabilityReport& s) {
  return {{"subsets", s.subsets}, {"units", s.units}, {"pairs", s.pairs}, {"spearman_mean", s.spearman_mean},
          {"spearman_min", s.spearman_min}, {"verdict", s.verdict}};
}
StabilityReport stability_from(const json& j) {
  StabilityReport s;
  s.subsets = json_integer<int64_t>(j.at("subsets"), "subsets");
  s.units = json_integer<int64_t>(j.at("units"), "units");
  s.pairs = j.at("pairs").get<std::vector<double>>();
  s.spearman_mean = j.at("spearman_mean").get<double>();
  s.spearman_min = j.at("spearman_min").get<double>();
  s.verdict = j.at("verdict").get<std::string>();
  return s;
}

json distribution_json(const std::optional<Distribution>& d) {
  if (!d) return nullptr;
  json j{{"count", d->count}, {"min", d->min}, {"max", d->max}, {"median", d->median}, {"mean", d->mean}, {"std", d->std},
         {"max_min_ratio", d->max_min_ratio ? json(*d->max_min_ratio) : json(nullptr)}, {"top", d->top},
         {"bottom", d->bottom}};
  return j;
}
std::optional<Distribution> distribution_from(const json& j) {
  if (j.is_null()) return std::nullopt;
  Distribution d;
  d.count = json_integer<int64_t>(j.at("count"), "count");
  d.min = j.at("min").get<double>();
  d.max = j.at("max").get<double>();
  d.median = j.at("median").get<double>();
  d.mean = j.at("mean").get<double>();
  d.std = j.at("std").get<double>();
  if (!j.at("max_min_ratio").is_null()) d.max_min_ratio = j.at("max_min_ratio").get<double>();
  d.top = j.at("top").get<std::vector<std::string>>();
  d.bottom = j.at("bottom").get<std::vector<std::string>>();
  return d;
}

json config_json(const ImportanceConfig& c) {
  return {{"weights", c.weights}, {"normalization", score_normalization_name(c.normalization)},
          {"rtn_score_bits", c.rtn_score_bits},
          {"stability", {{"stable_above", c.stable_above}, {"moderate_above", c.moderate_above}}}};
}
ImportanceConfig config_from(const json& j) {
  ImportanceConfig c;
  c.weights = j.at("weights").get<std::map<std::string, double>>();
  const std::string norm = j.at("normalization").get<std::string>();
  GRADQ_CHECK(norm == "max" || norm == "rank", "normalization must be max or rank, got '{}'", norm);
  c.normalization = norm == "max" ? ScoreNormalization::kMax : ScoreNormalization::kRank;
  c.rtn_score_bits = json_integer<int>(j.at("rtn_score_bits"), "rtn_score_bits");
  c.stable_above = j.at("stability").at("stable_above").get<double>();
  c.moderate_above = j.at("stability").at("moderate_above").get<double>();
  c.validate();
  return c;
}
}  // namespace

// ---- ImportanceAnalysis ----------------------------------------------------------------------------

std::vector<const UnitImportance*> ImportanceAnalysis::ranked(UnitKind kind) const {
  std::vector<const UnitImportance*> out;
  for (const auto& u : units)
    if (u.unit.kind == kind) out.push_back(&u);
  std::stable_sort(out.begin(), out.end(), [](const UnitImportance* a, const UnitImportance* b) { return a->rank < b->rank; });
  return out;
}

const UnitImportance& ImportanceAnalysis::unit(const std::string& name) const {
  for (const auto& u : units)
    if (u.unit.name == name) return u;
  throw Error(fmt::format("the analysis has no unit '{}' ({} units)", name, units.size()));
}

// ---- ImportanceAnalyzer ----------------------------------------------------------------------------

ImportanceAnalyzer::ImportanceAnalyzer(QuantizableModel& model, Windows calibration, AnalyzerOptions options)
    : model_(model), calibration_(std::move(calibration)), options_(std::move(options)) {
  validate_options(options_);
  GRADQ_CHECK(calibration_.size() >= options_.subsets,
              "expected at least as many calibration windows as subsets ({}), got {} windows", options_.subsets,
              calibration_.size());
  units_ = importance_units(model_);
  GRADQ_CHECK(!units_.empty(), "the model has no quantizable weights to analyze");
}

int64_t ImportanceAnalyzer::planned_probes() const {
  return 1 + kProbesPerUnit * static_cast<int64_t>(units_.size());
}

int64_t ImportanceAnalyzer::planned_passes() const {
  // Local measurement adds a calibration (exact + local) and a block-at-base probe per block.
  int64_t calibration = 0;
  if (options_.measurement == Measurement::kLocal && model_.stages())
    for (const ImportanceUnit& u : units_) calibration += u.kind == UnitKind::kBlock && model_.block_position(u.block) >= 0 ? 2 : 0;
  return 1 + planned_probes() + calibration + (options_.static_signals ? 2 : 0);
}

ImportanceAnalysis ImportanceAnalyzer::run() {
  const auto start = Clock::now();
  const int64_t total = planned_passes();
  int64_t done = 0;
  auto progress = [&](const std::string& what) {
    ++done;
    if (options_.on_progress)
      options_.on_progress({done, total, seconds_since(start), what});
  };

  ImportanceAnalysis a;
  a.options = options_;
  a.options.on_progress = nullptr;
  a.windows = calibration_.size();
  a.ctx = calibration_.inputs.size(1);

  EvaluatorOptions eval_options;
  eval_options.batch = options_.batch;
  eval_options.reference_storage = options_.reference_storage;
  ProbeEvaluator evaluator(model_, calibration_, options_.subsets, eval_options);
  progress("reference");
  a.scored_tokens = evaluator.scored_tokens();
  a.reference_ppl = evaluator.reference_ppl();
  WeightCache cache(model_);
  const QuantSpec base = int_spec(options_.upgrade_from_bits, options_.group_size);
  const QuantSpec upgraded = int_spec(options_.upgrade_to_bits, options_.group_size);
  const auto K = static_cast<size_t>(options_.subsets);

  StaticSignals statics;
  if (options_.static_signals) {
    statics = static_signals(model_, evaluator, cache, base, options_.batch);
    progress("activation capture");
    progress("gradient");
    a.timing.capture_passes = 1;
    a.timing.gradient_passes = 1;
    a.timing.static_seconds = statics.seconds;
  }

  a.baseline = probe_baseline(model_, evaluator, cache, base);
  progress(fmt::format("baseline all int{}", options_.upgrade_from_bits));

  // How each probe is measured (the header comment): whole without stages or outside blocks.
  const bool staged = evaluator.cache() != nullptr;
  const Measurement mode = staged ? options_.measurement : Measurement::kWhole;
  a.measurement = staged ? measurement_name(mode) : "whole (" + model_.stages_unavailable_reason() + ")";
  auto where = [&](const ImportanceUnit& unit) {
    const int64_t block = model_.block_position(unit.block);
    return block >= 0 && mode != Measurement::kWhole ? MeasureAt{mode, block} : MeasureAt{};
  };
  const QuantSpec calibration_spec = int_spec(4, options_.group_size);
  std::map<int64_t, ProbeMeasure> calibration;  // by block position: the block unit's exact RTN-4 probe
  std::map<int64_t, ProbeMeasure> block_at_base;  // by block position: local prediction, block at `base`
  if (mode == Measurement::kLocal) {
    for (const ImportanceUnit& unit : units_) {
      if (unit.kind != UnitKind::kBlock || where(unit).block < 0) continue;
      const int64_t block = where(unit).block;
      calibration[block] = calibrate_local(model_, evaluator, cache, unit, block, calibration_spec);
      progress("calibrate " + unit.name);
      block_at_base[block] = probe_rtn(model_, evaluator, cache, unit, base, where(unit));
      progress(fmt::format("local int{} {}", options_.upgrade_from_bits, unit.name));
      a.local_factors.push_back(evaluator.local_factor(block));
    }
  }

  for (const ImportanceUnit& unit : units_) {
    UnitImportance ui;
    ui.unit = unit;
    const MeasureAt at = where(unit);
    ui.probes["noise"] = probe_noise(model_, evaluator, cache, unit, options_.noise_alpha, options_.seed, at);
    progress("noise " + unit.name);
    for (int bits : kRtnProbeBits) {
      const QuantSpec spec = int_spec(bits, options_.group_size);
      ui.probes[rtn_key(bits)] = unit.kind == UnitKind::kBlock && calibration.count(at.block) && spec == calibration_spec
                                     ? calibration.at(at.block)
                                     : probe_rtn(model_, evaluator, cache, unit, spec, at);
      progress(fmt::format("rtn int{} {}", bits, unit.name));
    }
    ui.probes["disable"] = probe_disable(model_, evaluator, unit, at);
    progress("disable " + unit.name);
    ProbeMeasure upgrade = probe_upgrade(model_, evaluator, cache, unit, base, upgraded, at);
    if (at.how == Measurement::kLocal) {
      // Locally measured: what upgrading recovers in the block, taken off the measured baseline.
      const ProbeMeasure& block_base = block_at_base.at(at.block);
      upgrade.kl = a.baseline.kl - (block_base.kl - upgrade.kl);
      for (size_t k = 0; k < K; ++k)
        upgrade.subset_kl[k] = a.baseline.subset_kl[k] - (block_base.subset_kl[k] - upgrade.subset_kl[k]);
    }
    ui.probes["upgrade"] = upgrade;
    progress("upgrade " + unit.name);

    // Signals: {overall, subset 0..K-1}.
    auto with_subsets = [](const ProbeMeasure& m) {
      std::vector<double> v{m.kl};
      v.insert(v.end(), m.subset_kl.begin(), m.subset_kl.end());
      return v;
    };
    ui.signals["rtn"] = with_subsets(ui.probes.at(rtn_key(options_.config.rtn_score_bits)));
    ui.signals["disable"] = with_subsets(ui.probes.at("disable"));
    ui.signals["noise"] = with_subsets(ui.probes.at("noise"));
    std::vector<double> recovered{a.baseline.kl - ui.probes.at("upgrade").kl};
    for (size_t k = 0; k < K; ++k) recovered.push_back(a.baseline.subset_kl[k] - ui.probes.at("upgrade").subset_kl[k]);
    ui.signals["upgrade"] = recovered;
    if (options_.static_signals) {
      for (auto& [key, values] : unit_static_signals(statics, model_, unit)) ui.signals[key] = values;
    } else {
      for (const char* key : {"weight_magnitude", "activation_sq_mean", "gradient_magnitude", "fisher"})
        ui.signals[key].assign(K + 1, 0.0);
    }
    a.units.push_back(std::move(ui));
  }

  // Every probe restores what it changed; check the weights the analysis touched.
  for (const WeightInfo& w : model_.weights())
    GRADQ_CHECK(at::equal(model_.weight(w.name), cache.original(w.name)),
                "internal: weight '{}' differs from its original after the analysis", w.name);

  score_analysis(a, options_.config);
  a.timing.forward_passes = evaluator.passes();
  a.timing.probe_seconds = evaluator.seconds();
  a.timing.forward_seconds = evaluator.forward_seconds();
  a.timing.seconds = seconds_since(start);
  return a;
}

// ---- Scoring -----------------------------------------------------------------------------------------

void score_analysis(ImportanceAnalysis& a, const ImportanceConfig& config) {
  config.validate();
  a.options.config = config;
  double weight_sum = 0;
  for (const auto& [signal, w] : config.weights) weight_sum += w;
  for (UnitKind kind : {UnitKind::kLayer, UnitKind::kBlock}) {
    std::vector<UnitImportance*> us;
    for (auto& u : a.units)
      if (u.unit.kind == kind) us.push_back(&u);
    if (us.empty()) continue;
    const size_t columns = us.front()->signals.at("rtn").size();  // overall + K subsets
    std::vector<std::vector<double>> score(columns, std::vector<double>(us.size(), 0.0));
    for (const std::string& signal : kScoreSignals) {
      auto wit = config.weights.find(signal);
      const double w = wit == config.weights.end() ? 0.0 : wit->second;
      for (size_t c = 0; c < columns; ++c) {
        std::vector<double> values;
        for (const auto* u : us) {
          const auto& v = u->signals.at(signal);
          GRADQ_CHECK(v.size() == columns, "unit '{}': signal '{}' has {} values, expected {}", u->unit.name, signal,
                      v.size(), columns);
          values.push_back(v[c]);
        }
        const std::vector<double> norm = normalize(values, config.normalization);
        for (size_t i = 0; i < us.size(); ++i) {
          if (c == 0) us[i]->normalized[signal] = norm[i];
          score[c][i] += w * norm[i] / weight_sum;
        }
      }
    }
    std::vector<size_t> order(us.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return score[0][x] > score[0][y]; });
    std::vector<std::string> names;
    for (size_t i = 0; i < us.size(); ++i) {
      us[i]->score = score[0][i];
      us[i]->subset_scores.clear();
      for (size_t c = 1; c < columns; ++c) us[i]->subset_scores.push_back(score[c][i]);
      names.push_back(us[i]->unit.name);
    }
    for (size_t r = 0; r < order.size(); ++r) us[order[r]]->rank = static_cast<int64_t>(r) + 1;
    std::vector<std::vector<double>> by_subset(score.begin() + 1, score.end());
    StabilityReport stability = rank_stability(by_subset, config.stable_above, config.moderate_above);
    Distribution dist = describe(score[0], names);
    if (kind == UnitKind::kLayer) {
      a.layer_stability = stability;
      a.layer_distribution = dist;
    } else {
      a.block_stability = stability;
      a.block_distribution = dist;
    }
  }
  a.verdict = a.layer_stability.units >= 2 ? a.layer_stability.verdict : a.block_stability.verdict;
  if (a.verdict.empty()) a.verdict = "n/a";
}

// ---- JSON ---------------------------------------------------------------------------------------------

std::string analysis_json(const ImportanceAnalysis& a) {
  const AnalyzerOptions& o = a.options;
  json settings{{"noise_alpha", o.noise_alpha},
                {"seed", o.seed},
                {"group_size", o.group_size},
                {"subsets", o.subsets},
                {"rtn_bits", kRtnProbeBits},
                {"upgrade_from_bits", o.upgrade_from_bits},
                {"upgrade_to_bits", o.upgrade_to_bits},
                {"static_signals", o.static_signals},
                {"batch", o.batch},
                {"measurement", measurement_name(o.measurement)},
                {"windows", a.windows},
                {"ctx", a.ctx},
                {"scored_tokens", a.scored_tokens},
                {"config", config_json(o.config)}};
  json units = json::array();
  json ranking{{"layers", json::array()}, {"blocks", json::array()}};
  for (const auto& u : a.units) {
    json probes = json::object();
    for (const auto& [key, m] : u.probes) probes[key] = measure_json(m);
    json signals = json::object(), subset_signals = json::object();
    for (const auto& [key, v] : u.signals) {
      signals[key] = v.front();
      subset_signals[key] = std::vector<double>(v.begin() + 1, v.end());
    }
    units.push_back({{"kind", unit_kind_name(u.unit.kind)},
                     {"name", u.unit.name},
                     {"block", u.unit.block},
                     {"block_index", u.unit.block_index},
                     {"weights", u.unit.weights},
                     {"numel", u.unit.numel},
                     {"rank", u.rank},
                     {"score", u.score},
                     {"subset_scores", u.subset_scores},
                     {"probes", probes},
                     {"signals", signals},
                     {"subset_signals", subset_signals},
                     {"normalized", u.normalized}});
  }
  for (UnitKind kind : {UnitKind::kLayer, UnitKind::kBlock})
    for (const UnitImportance* u : a.ranked(kind)) ranking[kind == UnitKind::kLayer ? "layers" : "blocks"].push_back(u->unit.name);
  json j{{"format", kFormat},
         {"version", kFormatVersion},
         {"inputs", a.inputs},
         {"settings", settings},
         {"reference_ppl", a.reference_ppl},
         {"measured", a.measurement},
         {"local_factors", a.local_factors},
         {"baseline", measure_json(a.baseline)},
         {"units", units},
         {"ranking", ranking},
         {"stability",
          {{"verdict", a.verdict},
           {"advice", stability_advice(a.verdict)},
           {"layers", stability_json(a.layer_stability)},
           {"blocks", stability_json(a.block_stability)}}},
         {"distribution",
          {{"layers", distribution_json(a.layer_distribution)}, {"blocks", distribution_json(a.block_distribution)}}},
         {"timing",
          {{"forward_passes", a.timing.forward_passes},
           {"gradient_passes", a.timing.gradient_passes},
           {"capture_passes", a.timing.capture_passes},
           {"seconds", a.timing.seconds},
           {"probe_seconds", a.timing.probe_seconds},
           {"forward_seconds", a.timing.forward_seconds},
           {"static_seconds", a.timing.static_seconds},
           {"seconds_per_pass", a.timing.seconds_per_pass()}}}};
  j["baseline"]["bits"] = o.upgrade_from_bits;
  return j.dump(2) + "\n";
}

void save_analysis(const std::string& path, const ImportanceAnalysis& analysis) {
  write_file_atomically(path, analysis_json(analysis));
}

ImportanceAnalysis analysis_from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(fmt::format("not valid JSON: {}", e.what()));
  }
  ImportanceAnalysis a;
  try {
    GRADQ_CHECK(j.is_object() && j.value("format", "") == kFormat,
                "not a gradq importance analysis (expected \"format\": \"{}\")", kFormat);
    const int version = json_integer_or<int>(j, "version", -1);
    GRADQ_CHECK(version == kFormatVersion, "unsupported analysis version {} (this gradq reads version {})", version,
                kFormatVersion);
    const json& s = j.at("settings");
    AnalyzerOptions& o = a.options;
    o.noise_alpha = s.at("noise_alpha").get<double>();
    o.seed = json_integer<uint64_t>(s.at("seed"), "seed");
    o.group_size = json_integer<int64_t>(s.at("group_size"), "group_size");
    o.subsets = json_integer<int64_t>(s.at("subsets"), "subsets");
    o.upgrade_from_bits = json_integer<int>(s.at("upgrade_from_bits"), "upgrade_from_bits");
    o.upgrade_to_bits = json_integer<int>(s.at("upgrade_to_bits"), "upgrade_to_bits");
    o.static_signals = s.at("static_signals").get<bool>();
    o.batch = json_integer<int64_t>(s.at("batch"), "batch");
    o.measurement = parse_measurement(s.value("measurement", "whole"));
    o.config = config_from(s.at("config"));
    a.windows = json_integer<int64_t>(s.at("windows"), "windows");
    a.ctx = json_integer<int64_t>(s.at("ctx"), "ctx");
    a.scored_tokens = json_integer<int64_t>(s.at("scored_tokens"), "scored_tokens");
    a.inputs = j.at("inputs").get<std::map<std::string, std::string>>();
    a.reference_ppl = j.at("reference_ppl").get<double>();
    a.measurement = j.value("measured", "whole");
    a.local_factors = j.value("local_factors", std::vector<double>{});
    a.baseline = measure_from(j.at("baseline"));
    for (const json& ju : j.at("units")) {
      UnitImportance u;
      const std::string kind = ju.at("kind").get<std::string>();
      GRADQ_CHECK(kind == "layer" || kind == "block", "unit kind must be layer or block, got '{}'", kind);
      u.unit.kind = kind == "layer" ? UnitKind::kLayer : UnitKind::kBlock;
      u.unit.name = ju.at("name").get<std::string>();
      u.unit.block = ju.at("block").get<std::string>();
      u.unit.block_index = json_integer<int64_t>(ju.at("block_index"), "block_index");
      u.unit.weights = ju.at("weights").get<std::vector<std::string>>();
      u.unit.numel = json_integer<int64_t>(ju.at("numel"), "numel");
      u.rank = json_integer<int64_t>(ju.at("rank"), "rank");
      u.score = ju.at("score").get<double>();
      u.subset_scores = ju.at("subset_scores").get<std::vector<double>>();
      for (const auto& [key, m] : ju.at("probes").items()) u.probes[key] = measure_from(m);
      for (const auto& [key, v] : ju.at("signals").items()) {
        std::vector<double> values{v.get<double>()};
        for (double x : ju.at("subset_signals").at(key)) values.push_back(x);
        u.signals[key] = values;
      }
      u.normalized = ju.at("normalized").get<std::map<std::string, double>>();
      a.units.push_back(std::move(u));
    }
    const json& st = j.at("stability");
    a.verdict = st.at("verdict").get<std::string>();
    a.layer_stability = stability_from(st.at("layers"));
    a.block_stability = stability_from(st.at("blocks"));
    a.layer_distribution = distribution_from(j.at("distribution").at("layers"));
    a.block_distribution = distribution_from(j.at("distribution").at("blocks"));
    const json& t = j.at("timing");
    a.timing.forward_passes = json_integer<int64_t>(t.at("forward_passes"), "forward_passes");
    a.timing.gradient_passes = json_integer<int64_t>(t.at("gradient_passes"), "gradient_passes");
    a.timing.capture_passes = json_integer<int64_t>(t.at("capture_passes"), "capture_passes");
    a.timing.seconds = t.at("seconds").get<double>();
    a.timing.probe_seconds = t.at("probe_seconds").get<double>();
    a.timing.forward_seconds = t.at("forward_seconds").get<double>();
    a.timing.static_seconds = t.at("static_seconds").get<double>();
  } catch (const json::exception& e) {
    throw Error(fmt::format("malformed gradq importance analysis: {}", e.what()));
  }
  return a;
}

ImportanceAnalysis load_analysis(const std::string& path) {
  const std::string text = read_file(path);
  try {
    return analysis_from_json(text);
  } catch (const Error& e) {
    throw Error(fmt::format("'{}': {}", path, e.what()));
  }
}

// ---- Table and chart -------------------------------------------------------------------------------

std::string format_analysis_table(const ImportanceAnalysis& a) {
  std::string out;
  const ImportanceConfig& c = a.options.config;
  std::string weights;
  for (const std::string& s : kScoreSignals)
    if (auto it = c.weights.find(s); it != c.weights.end() && it->second > 0)
      weights += fmt::format("{}{} {:.2f}", weights.empty() ? "" : ", ", s, it->second);
  out += fmt::format("combined score = weighted mean of {}-normalized signals ({}); rtn = KL at int{}, upgrade = KL "
                     "recovered int{} -> int{}\n",
                     score_normalization_name(c.normalization), weights, c.rtn_score_bits, a.options.upgrade_from_bits,
                     a.options.upgrade_to_bits);
  out += fmt::format("KL in nats per token on {} calibration windows of {} ({} scored tokens), reference PPL {:.4f}\n",
                     a.windows, a.ctx, a.scored_tokens, a.reference_ppl);
  for (UnitKind kind : {UnitKind::kLayer, UnitKind::kBlock}) {
    auto ranked = a.ranked(kind);
    if (ranked.empty()) continue;
    size_t name_w = 4;
    for (const auto* u : ranked) name_w = std::max(name_w, u->unit.name.size());
    out += fmt::format("\n{} ({}), most important first\n", kind == UnitKind::kLayer ? "layers" : "blocks", ranked.size());
    out += fmt::format("{:>4}  {:<{}}  {:>6}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}\n", "rank", "unit",
                       name_w, "score", "rtn int8", "rtn int4", "rtn int2", "upgrade", "disable", "noise", "|grad|",
                       "fisher");
    for (const auto* u : ranked) {
      auto kl = [&](const char* key) { return u->probes.count(key) ? u->probes.at(key).kl : 0.0; };
      out += fmt::format("{:>4}  {:<{}}  {:>6.3f}  {:>9.2e}  {:>9.2e}  {:>9.2e}  {:>9.2e}  {:>9.2e}  {:>9.2e}  {:>9.2e}  {:>9.2e}\n",
                         u->rank, u->unit.name, name_w, u->score, kl("rtn_int8"), kl("rtn_int4"), kl("rtn_int2"),
                         u->signals.at("upgrade").front(), kl("disable"), kl("noise"),
                         u->signals.at("gradient_magnitude").front(), u->signals.at("fisher").front());
    }
  }
  out += fmt::format("\nbaseline (every weight int{}): KL {:.3e}, delta PPL {:+.4f}\n", a.options.upgrade_from_bits,
                     a.baseline.kl, a.baseline.delta_ppl);
  auto stability_line = [&](const char* what, const StabilityReport& s) {
    if (s.verdict == "n/a" || s.verdict.empty()) return fmt::format("  {}: n/a ({} units, {} subsets)\n", what, s.units, s.subsets);
    return fmt::format("  {}: Spearman mean {:.3f}, min {:.3f} over {} subset pairs -> {}\n", what, s.spearman_mean,
                       s.spearman_min, s.pairs.size(), s.verdict);
  };
  out += fmt::format("\nstability across {} calibration subsets:\n", a.options.subsets);
  out += stability_line("layers", a.layer_stability);
  out += stability_line("blocks", a.block_stability);
  out += fmt::format("stability verdict: {} ({})\n", a.verdict, stability_advice(a.verdict));
  auto dist_line = [&](const char* what, const std::optional<Distribution>& d) {
    if (!d) return std::string();
    return fmt::format("  {} ({}): min {:.4f}, max {:.4f}, median {:.4f}, mean {:.4f}, std {:.4f}, max/min {}\n"
                       "    most important: {}\n    least important: {}\n",
                       what, d->count, d->min, d->max, d->median, d->mean, d->std,
                       d->max_min_ratio ? fmt::format("{:.2f}", *d->max_min_ratio) : std::string("n/a (min <= 0)"),
                       fmt::join(d->top, ", "), fmt::join(d->bottom, ", "));
  };
  out += "\ndistribution of combined scores:\n";
  out += dist_line("layers", a.layer_distribution);
  out += dist_line("blocks", a.block_distribution);
  out += fmt::format("\nmeasured: {}", a.measurement);
  if (!a.local_factors.empty()) out += fmt::format(" (KL per unit of block output error: {:.3g})", fmt::join(a.local_factors, ", "));
  out += fmt::format("\npasses: {} forward ({:.3f} s per pass, of which forward {:.3f} s), {} gradient, {} capture; "
                     "total {:.1f} s\n",
                     a.timing.forward_passes, a.timing.seconds_per_pass(),
                     a.timing.forward_passes ? a.timing.forward_seconds / static_cast<double>(a.timing.forward_passes) : 0.0,
                     a.timing.gradient_passes, a.timing.capture_passes, a.timing.seconds);
  return out;
}

}  // namespace gradq
