#include "sweep/sweep.h"

#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join (in fmt/format.h before fmt 11)
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <set>

#include "common/error.h"
#include "common/files.h"
#include "common/json_integer.h"
#include "common/hash.h"
#include "common/runtime.h"
#include "common/timing.h"
#include "importance/analyzer.h"
#include "report/svg_chart.h"

namespace gradq {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

constexpr const char* kSharedFile = "shared.json";

// --- Fingerprints -------------------------------------------------------------------------------
// FNV-1a (common/hash.h) over texts and tensors: enough to tell a changed model, text or option
// from the one a directory was made with.
class Fingerprint {
 public:
  Fingerprint& bytes(const void* data, size_t n) {
    hash_.bytes(data, n);
    return *this;
  }
  Fingerprint& text(const std::string& s) { return bytes(s.data(), s.size()).bytes("\0", 1); }
  Fingerprint& tensor(const at::Tensor& t) {
    const at::Tensor c = t.contiguous().cpu();
    text(std::string(c.dtype().name()));
    for (int64_t d : c.sizes()) bytes(&d, sizeof d);
    return bytes(c.data_ptr(), c.nbytes());
  }
  std::string hex() const { return fmt::format("{:016x}", hash_.value()); }

 private:
  Fnv1a hash_;
};

std::string model_fingerprint(const CausalLM& model) {
  Fingerprint f;
  for (const auto& p : model.module().named_parameters(true)) f.text(p.name).tensor(p.value);
  for (const auto& b : model.module().named_buffers(true)) f.text(b.name).tensor(b.value);
  return f.hex();
}

json windows_json(const Windows& w) {
  return {{"windows", w.size()},
          {"ctx", w.size() ? w.inputs.size(1) : 0},
          {"fingerprint", Fingerprint().tensor(w.inputs).tensor(w.targets).tensor(w.score_from).hex()}};
}

std::string order_hash(const std::vector<std::string>& order) {
  Fingerprint f;
  for (const std::string& name : order) f.text(name);
  return f.hex();
}

// Everything a point's result depends on except its own budget or format: a directory made with
// one configuration refuses a run with another.
json sweep_config(const CausalLM& model, const Windows& calibration, const Windows& evaluation,
                  const QuantizerOptions& q, bool needs_order) {
  json policy = json::array();
  for (const PolicyRule& r : q.policy.rules())
    policy.push_back({{"pattern", r.pattern}, {"min", quant_level_name(r.min)}, {"max", quant_level_name(r.max)}});
  std::string order_source;
  if (!needs_order) {
    order_source = "the model's (no point searches progressively)";
  } else if (!q.order.empty()) {
    order_source = "given order " + order_hash(q.order);
  } else if (q.analysis_path) {
    order_source = "analysis file " + Fingerprint().text(read_file(*q.analysis_path)).hex();
  } else {
    const AnalyzerOptions& a = q.analyzer;
    order_source = fmt::format("analysis seed {} noise {} group {} subsets {} upgrade {}->{} static {}", a.seed,
                               a.noise_alpha, a.group_size, a.subsets, a.upgrade_from_bits, a.upgrade_to_bits,
                               a.static_signals);
  }
  const SearchOptions& s = q.search;
  json config = {{"model", model_fingerprint(model)},
          {"calibration", windows_json(calibration)},
          {"evaluation", windows_json(evaluation)},
          {"order_source", order_source},
          {"max_kl", q.budget.max_kl ? json(*q.budget.max_kl) : json(nullptr)},
          {"target_memory_reduction",
           q.budget.target_memory_reduction ? json(*q.budget.target_memory_reduction) : json(nullptr)},
          // Unset: each point's strategy uses its own.
          {"safety", q.budget.safety ? json(*q.budget.safety) : json("per strategy")},
          {"batch", q.batch},
          {"search",
           {{"bits", s.bits},
            {"group_sizes", s.group_sizes},
            // Also marks sweeps whose accounting has b-bit zero points (older ones had 8-bit).
            {"encodings", s.encodings},
            {"allow_prune", s.allow_prune},
            {"screen_candidates", s.screen_candidates},
            {"perplexity_prices", s.perplexity_prices},
            {"first_order_weight", s.first_order_weight},
            {"method", rounding_method_name(s.method)},
            // Unset: each point's strategy measures its own way.
            {"measurement", s.measurement ? json(candidate_measurement_name(*s.measurement)) : json("per strategy")},
            {"strategy", search_strategy_name(s.strategy)},
            {"allocation_passes", s.allocation_passes},
            {"repair_failures", s.repair_failures},
            {"repair_confidence", s.repair_confidence},
            {"trained_fallback", s.trained_fallback},
            {"trained_iterations", s.rounding.trained.iterations},
            {"trained_learning_rate", s.rounding.trained.learning_rate},
            {"trained_learn_clipping", s.rounding.trained.learn_clipping},
            {"trained_min_clip", s.rounding.trained.min_clip},
            {"gptq_damp", s.rounding.gptq.damp},
            {"gptq_act_order", s.rounding.gptq.act_order},
            {"gptq_clip_search", s.rounding.gptq.clip_search},
            {"clip_grid", s.rounding.clip.n_grid},
            {"clip_min_ratio", s.rounding.clip.min_ratio}}},
          {"policy", policy}};
  // Only when given: the configurations (and hashes) of sweeps fitted on their calibration windows
  // stay those of earlier versions.
  if (s.fit.size() > 0)
    config["fit"] = {{"windows", s.fit.inputs.size(0)},
                     {"ctx", s.fit.inputs.size(1)},
                     {"fingerprint", Fingerprint().tensor(s.fit.inputs).hex()}};
  // Only when on: the configurations (and hashes) of sweeps without the refit stay those of earlier versions.
  if (s.rounding.gptq.refit_scales) config["search"]["gptq_refit_scales"] = true;
  // Only when compact: the configurations (and hashes) of float32 sweeps stay those of earlier versions.
  if (q.reference_storage != ReferenceStorage::float32()) config["reference_storage"] = q.reference_storage.name();
  return config;
}

std::vector<std::string> differing_keys(const json& a, const json& b) {
  std::vector<std::string> keys;
  for (const auto& [key, value] : a.items())
    if (!b.contains(key) || b.at(key) != value) keys.push_back(key);
  for (const auto& [key, value] : b.items())
    if (!a.contains(key)) keys.push_back(key);
  return keys;
}

json parse_json_file(const std::string& path, const char* format) {
  json j;
  try {
    j = json::parse(read_file(path));
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: not valid JSON: {}", path, e.what()));
  }
  GRADQ_CHECK(j.is_object() && j.value("format", "") == format, "{}: expected a '{}' file, got format '{}'", path,
              format, j.is_object() ? j.value("format", "") : "");
  return j;
}

// --- Points and their files ---------------------------------------------------------------------
json point_spec_json(const SweepPointSpec& p) {
  json j = {{"id", p.id}};
  if (p.budget) j["budget"] = *p.budget;
  if (p.uniform) j["uniform"] = p.uniform->name();
  if (p.search) j["search"] = search_strategy_name(*p.search);
  return j;
}

SweepPointSpec point_spec_from_json(const json& j) {
  SweepPointSpec p;
  p.id = j.at("id").get<std::string>();
  if (j.contains("budget")) p.budget = j.at("budget").get<double>();
  if (j.contains("uniform")) p.uniform = parse_quant_spec(j.at("uniform").get<std::string>());
  if (j.contains("search")) p.search = parse_search_strategy(j.at("search").get<std::string>());
  return p;
}

json point_json(const SweepPointResult& p) {
  json j = {{"id", p.id}, {"kind", p.kind}};
  j["budget"] = p.budget ? json(*p.budget) : json(nullptr);
  j["spec"] = p.spec;
  j["search"] = p.search;
  j["met"] = p.met;
  j["messages"] = p.messages;
  j["bits_per_weight"] = p.bits_per_weight;
  j["quantized_bytes"] = p.quantized_bytes;
  j["fp16_bytes"] = p.fp16_bytes;
  j["ppl"] = p.ppl;
  j["reference_ppl"] = p.reference_ppl;
  j["ppl_increase"] = p.ppl_increase;
  j["kl_mean"] = p.kl_mean;
  j["kl_median"] = p.kl_median;
  j["kl_p99"] = p.kl_p99;
  j["kl_max"] = p.kl_max;
  j["same_top_rate"] = p.same_top_rate;
  j["passes"] = p.passes;
  j["seconds"] = p.seconds;
  j["tokens"] = p.tokens;
  return j;
}

SweepPointResult point_from_json(const json& j) {
  SweepPointResult p;
  p.id = j.at("id").get<std::string>();
  p.kind = j.at("kind").get<std::string>();
  if (!j.at("budget").is_null()) p.budget = j.at("budget").get<double>();
  p.spec = j.at("spec").get<std::string>();
  p.search = j.value("search", "");  // absent from sweeps before the strategies were compared
  p.met = j.at("met").get<bool>();
  p.messages = j.at("messages").get<std::vector<std::string>>();
  p.bits_per_weight = j.at("bits_per_weight").get<double>();
  p.quantized_bytes = json_integer<int64_t>(j.at("quantized_bytes"), "quantized_bytes");
  p.fp16_bytes = json_integer<int64_t>(j.at("fp16_bytes"), "fp16_bytes");
  p.ppl = j.at("ppl").get<double>();
  p.reference_ppl = j.at("reference_ppl").get<double>();
  p.ppl_increase = j.at("ppl_increase").get<double>();
  p.kl_mean = j.at("kl_mean").get<double>();
  p.kl_median = j.at("kl_median").get<double>();
  p.kl_p99 = j.at("kl_p99").get<double>();
  p.kl_max = j.at("kl_max").get<double>();
  p.same_top_rate = j.at("same_top_rate").get<double>();
  p.passes = json_integer<int64_t>(j.at("passes"), "passes");
  p.seconds = j.at("seconds").get<double>();
  p.tokens = json_integer_or<int64_t>(j, "tokens", 0);  // absent from points written before it was recorded
  return p;
}

std::string point_path(const std::string& dir, const std::string& id) { return dir + "/points/" + id + ".json"; }
std::string plan_path(const std::string& dir, const std::string& id) { return dir + "/points/" + id + ".plan.json"; }

struct SharedState {
  std::string model_name;
  json config;
  std::string config_hash;
  std::vector<std::string> order;
  std::string order_hash;
  std::vector<SweepPointSpec> points;
  double shared_seconds = 0;
};

json shared_json(const SharedState& s) {
  json points = json::array();
  for (const SweepPointSpec& p : s.points) points.push_back(point_spec_json(p));
  return {{"format", "gradq-sweep-shared"}, {"model_name", s.model_name}, {"config", s.config}, {"config_hash", s.config_hash},
          {"order", s.order},               {"order_hash", s.order_hash}, {"points", points},
          {"shared_seconds", s.shared_seconds}};
}

std::optional<SharedState> read_shared(const std::string& dir) {
  const std::string path = dir + "/" + kSharedFile;
  if (!fs::exists(path)) return std::nullopt;
  const json j = parse_json_file(path, "gradq-sweep-shared");
  SharedState s;
  try {
    s.model_name = j.value("model_name", "");
    s.config = j.at("config");
    s.config_hash = j.at("config_hash").get<std::string>();
    s.order = j.at("order").get<std::vector<std::string>>();
    s.order_hash = j.at("order_hash").get<std::string>();
    for (const json& p : j.at("points")) s.points.push_back(point_spec_from_json(p));
    s.shared_seconds = j.at("shared_seconds").get<double>();
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: malformed: {}", path, e.what()));
  }
  return s;
}

// A finished point's file, checked against the directory's configuration and order.
std::optional<SweepPointResult> read_point(const std::string& dir, const std::string& id, const SharedState& shared) {
  const std::string path = point_path(dir, id);
  if (!fs::exists(path)) return std::nullopt;
  const json j = parse_json_file(path, "gradq-sweep-point");
  GRADQ_CHECK(j.value("config_hash", "") == shared.config_hash && j.value("order_hash", "") == shared.order_hash,
              "{}: made with configuration {} and order {}, but the directory's are {} and {}", path,
              j.value("config_hash", ""), j.value("order_hash", ""), shared.config_hash, shared.order_hash);
  try {
    return point_from_json(j.at("point"));
  } catch (const json::exception& e) {
    throw Error(fmt::format("{}: malformed: {}", path, e.what()));
  }
}

SweepPointResult point_result(const SweepPointSpec& spec, const QuantizeOutcome& out) {
  SweepPointResult p;
  p.id = spec.id;
  p.kind = spec.budget ? "budget" : "uniform";
  p.budget = spec.budget;
  p.spec = spec.uniform ? spec.uniform->name() : "";
  p.search = spec.budget ? out.search_strategy : "";
  p.met = out.status == QuantizeStatus::kMet;
  p.messages = out.messages;
  p.bits_per_weight = out.size.bits_per_weight();
  p.quantized_bytes = out.size.quantized_bytes;
  p.fp16_bytes = out.size.fp16_bytes;
  const EvalResult& r = *out.heldout;
  p.ppl = r.ppl.value;
  p.reference_ppl = r.reference_ppl->value;
  p.ppl_increase = ppl_increase(r);
  p.kl_mean = r.kl->mean.value;
  p.kl_median = r.kl->median;
  p.kl_p99 = r.kl->percentiles.at(1);  // kKlPercentiles: 99.9, 99, ...
  p.kl_max = r.kl->max;
  p.same_top_rate = r.kl->same_top_rate;
  for (const PhaseTiming& phase : out.phases) p.passes += phase.passes;
  p.seconds = out.seconds;
  p.tokens = r.tokens;
  return p;
}

SweepResult result_of(const std::string& dir, const SharedState& shared, const std::vector<SweepPointSpec>& points) {
  SweepResult r;
  r.model_name = shared.model_name;
  r.config_json = shared.config.dump();
  r.order_hash = shared.order_hash;
  r.shared_seconds = shared.shared_seconds;
  for (const SweepPointSpec& p : points) {
    if (auto point = read_point(dir, p.id, shared))
      r.points.push_back(std::move(*point));
    else
      r.missing.push_back(p.id);
  }
  return r;
}

// Merging into one of the shard directories copies its own files onto themselves: skipped.
void copy_file_atomically(const std::string& from, const std::string& to) {
  if (fs::exists(to) && fs::equivalent(from, to)) return;
  write_file_atomically(to, read_file(from));
}

std::string percent(double v) { return fmt::format("{:+.2f}%", 100 * v); }

}  // namespace

// --- Point lists and shards ---------------------------------------------------------------------
std::vector<SweepPointSpec> sweep_points(std::vector<double> budgets, const std::vector<QuantSpec>& baselines,
                                         const std::vector<SearchStrategy>& compare_searches) {
  std::sort(budgets.begin(), budgets.end());
  std::vector<SweepPointSpec> points;
  std::set<std::string> ids;
  for (double b : budgets) {
    GRADQ_CHECK(std::isfinite(b) && b > 0 && b <= 10, "a budget is a relative perplexity increase in (0, 10], got {}", b);
    points.push_back({fmt::format("budget-{}", b), b, std::nullopt, std::nullopt});
  }
  for (SearchStrategy search : compare_searches)
    for (double b : budgets)
      points.push_back({fmt::format("budget-{}-{}", b, search_strategy_name(search)), b, std::nullopt, search});
  for (const QuantSpec& spec : baselines) points.push_back({"uniform-" + spec.name(), std::nullopt, spec, std::nullopt});
  for (const SweepPointSpec& p : points) GRADQ_CHECK(ids.insert(p.id).second, "the sweep lists point '{}' twice", p.id);
  GRADQ_CHECK(!points.empty(), "a sweep needs at least one budget or baseline");
  return points;
}

Shard Shard::parse(const std::string& text) {
  Shard s;
  const size_t slash = text.find('/');
  try {
    size_t used_i = 0, used_n = 0;
    GRADQ_CHECK(slash != std::string::npos, "");
    const std::string i = text.substr(0, slash), n = text.substr(slash + 1);
    s.index = std::stoll(i, &used_i) - 1;
    s.count = std::stoll(n, &used_n);
    GRADQ_CHECK(used_i == i.size() && used_n == n.size(), "");
  } catch (const std::exception&) {
    throw Error(fmt::format("a shard is written i/n (e.g. 2/4), got '{}'", text));
  }
  GRADQ_CHECK(s.count >= 1 && s.index >= 0 && s.index < s.count, "a shard i/n needs 1 <= i <= n, got '{}'", text);
  return s;
}

std::vector<bool> SweepResult::pareto() const {
  std::vector<bool> on(points.size(), true);
  for (size_t i = 0; i < points.size(); ++i)
    for (size_t j = 0; j < points.size() && on[i]; ++j) {
      const SweepPointResult &a = points[i], &b = points[j];
      const bool no_worse = b.bits_per_weight <= a.bits_per_weight && b.ppl_increase <= a.ppl_increase;
      const bool better = b.bits_per_weight < a.bits_per_weight || b.ppl_increase < a.ppl_increase;
      if (i != j && no_worse && better) on[i] = false;
    }
  return on;
}

// --- Running ------------------------------------------------------------------------------------
SweepRunner::SweepRunner(CausalLM& model, Windows calibration, Windows evaluation, SweepOptions options)
    : model_(model), calibration_(std::move(calibration)), evaluation_(std::move(evaluation)),
      options_(std::move(options)) {
  const QuantizerOptions& q = options_.quantizer;
  GRADQ_CHECK(!q.plan && !q.dynamic, "a sweep's points bring their own plans: give no plan or dynamic policy");
  GRADQ_CHECK(!q.calibration_reference && !q.heldout_reference, "a sweep computes its references itself");
  GRADQ_CHECK(!options_.points.empty(), "a sweep needs at least one point");
  GRADQ_CHECK(options_.shard.count >= 1 && options_.shard.index >= 0 && options_.shard.index < options_.shard.count,
              "shard index {} of {} is out of range", options_.shard.index, options_.shard.count);
  GRADQ_CHECK(q.batch > 0, "batch must be positive, got {}", q.batch);
}

SweepResult SweepRunner::run(const std::string& dir) {
  auto progress = [&](const std::string& phase, int64_t done, int64_t total, const std::string& detail) {
    if (options_.on_progress) options_.on_progress(phase, done, total, detail);
  };
  fs::create_directories(dir);  // points/ only once a point is written: a failed run leaves no empty one
  // Only the progressive search reads the order of importance; without such a point the model's
  // own order stands in and no analysis runs.
  const QuantizerOptions& base = options_.quantizer;
  const bool needs_order = std::any_of(options_.points.begin(), options_.points.end(), [&](const SweepPointSpec& p) {
    return p.budget && p.search.value_or(base.search.strategy) == SearchStrategy::kProgressive;
  });
  SharedState shared;
  shared.config = sweep_config(model_, calibration_, evaluation_, base, needs_order);
  shared.config_hash = Fingerprint().text(shared.config.dump()).hex();
  shared.points = options_.points;
  shared.model_name = options_.model_name;
  if (std::optional<SharedState> earlier = read_shared(dir)) {
    if (!earlier->model_name.empty()) shared.model_name = earlier->model_name;
    const std::vector<std::string> keys = differing_keys(earlier->config, shared.config);
    GRADQ_CHECK(keys.empty(), "{} holds a sweep of another configuration (it differs in: {}); use another directory",
                dir, fmt::join(keys, ", "));
    shared.order = earlier->order;
    shared.order_hash = earlier->order_hash;
    shared.shared_seconds = earlier->shared_seconds;
  }

  std::vector<SweepPointSpec> todo;
  int64_t owned = 0;
  for (size_t i = 0; i < options_.points.size(); ++i) {
    if (!options_.shard.owns(i)) continue;
    ++owned;
    if (shared.order.empty() || !read_point(dir, options_.points[i].id, shared)) todo.push_back(options_.points[i]);
  }
  progress("sweep", 0, static_cast<int64_t>(todo.size()),
           fmt::format("{} points in this shard, {} finished earlier", owned, owned - static_cast<int64_t>(todo.size())));
  if (todo.empty()) {
    if (!shared.order.empty()) write_file_atomically(dir + "/" + kSharedFile, shared_json(shared).dump(2) + "\n");
    return result_of(dir, shared, options_.points);
  }

  // The shared work: the references (every run: cheap, and too large to keep for real models) and
  // the search order (once per directory).
  const auto shared_start = Clock::now();
  EvaluatorOptions eval_options;
  eval_options.check_finite = false;  // a candidate with non-finite logits fails the budget (budget.cpp)
  eval_options.batch = base.batch;
  eval_options.reference_storage = base.reference_storage;
  GradualEvaluator calibration(calibration_, eval_options), heldout(evaluation_, eval_options);
  progress("reference", 0, 2, "full-precision log-probabilities, once for every point");
  calibration.set_reference(model_);
  heldout.set_reference(model_);
  if (shared.order.empty()) {
    if (!needs_order) {
      for (const WeightInfo& w : model_.weights()) shared.order.push_back(w.name);
    } else if (!base.order.empty()) {
      shared.order = base.order;
    } else {
      QuantizerOptions analysis_options = base;
      analysis_options.on_progress = progress;
      const ImportanceAnalysis analysis = importance_analysis(model_, calibration_, analysis_options);
      shared.order = search_order(model_, analysis);
      save_analysis(dir + "/analysis.json", analysis);
    }
    shared.order_hash = order_hash(shared.order);
    shared.shared_seconds = seconds_since(shared_start);
  }
  write_file_atomically(dir + "/" + kSharedFile, shared_json(shared).dump(2) + "\n");

  // Candidates depend on the weight, its format and the calibration statistics, never on the
  // budget: computed once for all points (the tight budgets' trained rounding and GPTQ, mostly).
  const auto candidates = std::make_shared<CandidateCache>(base.search.candidate_cache_bytes, base.search.candidate_spill);
  // Likewise the allocator's error curves (the candidates measured one at a time).
  const auto curves = std::make_shared<MeasuredCurves>();
  for (size_t k = 0; k < todo.size(); ++k) {
    const SweepPointSpec& spec = todo[k];
    QuantizerOptions q = base;
    q.order = shared.order;
    q.analysis_path.reset();
    q.calibration_reference = *calibration.reference();
    q.heldout_reference = *heldout.reference();
    q.search.shared_candidates = candidates;
    q.search.shared_curves = curves;
    if (spec.budget) q.budget.max_ppl_increase = *spec.budget;
    if (spec.search) q.search.strategy = *spec.search;
    if (spec.uniform) q.plan = uniform_plan(model_, *spec.uniform, q.search.method);
    const std::string prefix = fmt::format("{} ({}/{})", spec.id, k + 1, todo.size());
    q.on_progress = [&](const std::string& phase, int64_t done, int64_t total, const std::string& detail) {
      progress(prefix + " " + phase, done, total, detail);
    };
    const QuantizeOutcome outcome = GradualQuantizer(model_, calibration_, evaluation_, q).run();
    const SweepPointResult result = point_result(spec, outcome);
    // The plan first: a point counts as finished once its result file exists.
    fs::create_directories(dir + "/points");
    outcome.plan.save(plan_path(dir, spec.id));
    const json file = {{"format", "gradq-sweep-point"},
                       {"config_hash", shared.config_hash},
                       {"order_hash", shared.order_hash},
                       {"point", point_json(result)}};
    write_file_atomically(point_path(dir, spec.id), file.dump(2) + "\n");
    progress("sweep", static_cast<int64_t>(k + 1), static_cast<int64_t>(todo.size()),
             fmt::format("{}: {:.3f} bits/weight, perplexity {}{}", spec.id, result.bits_per_weight,
                         percent(result.ppl_increase), result.met ? "" : " (budget not met)"));
    if (options_.on_point) options_.on_point(result);
  }
  return result_of(dir, shared, options_.points);
}

// --- Directories --------------------------------------------------------------------------------
SweepResult load_sweep_dir(const std::string& dir, const std::vector<SweepPointSpec>& points) {
  std::optional<SharedState> shared = read_shared(dir);
  GRADQ_CHECK(shared, "{} is not a sweep directory: it has no {}", dir, kSharedFile);
  return result_of(dir, *shared, points);
}

SweepResult merge_sweeps(const std::vector<std::string>& shard_dirs, const std::string& out_dir) {
  GRADQ_CHECK(!shard_dirs.empty(), "merge needs at least one shard directory");
  std::vector<SharedState> shards;
  for (const std::string& dir : shard_dirs) {
    std::optional<SharedState> s = read_shared(dir);
    GRADQ_CHECK(s, "{} is not a sweep directory: it has no {} (did its shard run?)", dir, kSharedFile);
    shards.push_back(std::move(*s));
  }
  const SharedState& first = shards.front();
  for (size_t i = 1; i < shards.size(); ++i) {
    const std::vector<std::string> keys = differing_keys(first.config, shards[i].config);
    GRADQ_CHECK(keys.empty(), "{} and {} are sweeps of different configurations (they differ in: {})",
                shard_dirs.front(), shard_dirs[i], fmt::join(keys, ", "));
    GRADQ_CHECK(shards[i].order_hash == first.order_hash,
                "{} and {} searched in different orders (their analyses differ): run `gradq analyze` once and give "
                "every shard --analysis",
                shard_dirs.front(), shard_dirs[i]);
    std::set<std::string> a, b;
    for (const auto& p : first.points) a.insert(p.id);
    for (const auto& p : shards[i].points) b.insert(p.id);
    GRADQ_CHECK(a == b, "{} and {} were given different point lists ({} and {} points)", shard_dirs.front(),
                shard_dirs[i], a.size(), b.size());
  }
  fs::create_directories(out_dir + "/points");
  std::vector<std::string> missing;
  for (const SweepPointSpec& p : first.points) {
    bool found = false;
    for (size_t i = 0; i < shards.size() && !found; ++i) {
      if (!read_point(shard_dirs[i], p.id, shards[i])) continue;
      found = true;
      copy_file_atomically(point_path(shard_dirs[i], p.id), point_path(out_dir, p.id));
      copy_file_atomically(plan_path(shard_dirs[i], p.id), plan_path(out_dir, p.id));
    }
    if (!found) missing.push_back(p.id);
  }
  GRADQ_CHECK(missing.empty(), "no shard has finished {} of the {} points: {}", missing.size(), first.points.size(),
              fmt::join(missing, ", "));
  if (fs::exists(shard_dirs.front() + "/analysis.json"))
    copy_file_atomically(shard_dirs.front() + "/analysis.json", out_dir + "/analysis.json");
  write_file_atomically(out_dir + "/" + kSharedFile, shared_json(first).dump(2) + "\n");
  return result_of(out_dir, first, first.points);
}

// --- Reports ------------------------------------------------------------------------------------
std::string sweep_json(const SweepResult& result) {
  json points = json::array();
  for (const SweepPointResult& p : result.points) points.push_back(point_json(p));
  double point_seconds = 0;
  for (const SweepPointResult& p : result.points) point_seconds += p.seconds;
  json j = {{"format", "gradq-sweep"},
            {"gradq_version", version()},
            {"model_name", result.model_name},
            {"config", json::parse(result.config_json)},
            {"order_hash", result.order_hash},
            {"shared_seconds", result.shared_seconds},
            {"points_seconds", point_seconds},
            {"points", points},
            {"missing", result.missing}};
  return j.dump(2) + "\n";
}

namespace {

// The report's line about the configuration. It reads every configuration field that the report
// and the regression gate use, so sweep_from_json calls it to refuse a report lacking one.
std::string config_line(const json& config) {
  // Sweeps before the allocator have no strategy: they searched progressively.
  return fmt::format("Model {} · {} calibration and {} held-out windows of {} tokens · {} search, bits {} groups {} "
                     "({}) · safety {}\n\n",
                     config.at("model").get<std::string>(),
                     json_integer<int64_t>(config.at("calibration").at("windows"), "calibration.windows"),
                     json_integer<int64_t>(config.at("evaluation").at("windows"), "evaluation.windows"),
                     json_integer<int64_t>(config.at("evaluation").at("ctx"), "evaluation.ctx"),
                     config.at("search").value("strategy", "progressive"), config.at("search").at("bits").dump(),
                     config.at("search").at("group_sizes").dump(), config.at("search").at("method").get<std::string>(),
                     // A number, or "per strategy".
                     config.at("safety").is_number() ? fmt::format("{}", config.at("safety").get<double>())
                                                     : config.at("safety").get<std::string>());
}

}  // namespace

SweepResult sweep_from_json(const std::string& text) {
  SweepResult r;
  try {
    const json j = json::parse(text);
    GRADQ_CHECK(j.value("format", "") == "gradq-sweep", "expected a 'gradq-sweep' report, got format '{}'",
                j.value("format", ""));
    r.model_name = j.value("model_name", "");
    config_line(j.at("config"));
    r.config_json = j.at("config").dump();
    r.order_hash = j.at("order_hash").get<std::string>();
    r.shared_seconds = j.at("shared_seconds").get<double>();
    for (const json& p : j.at("points")) r.points.push_back(point_from_json(p));
    r.missing = j.at("missing").get<std::vector<std::string>>();
  } catch (const json::exception& e) {
    throw Error(fmt::format("malformed sweep report: {}", e.what()));
  }
  return r;
}

std::string sweep_csv(const SweepResult& result) {
  std::string out =
      "id,kind,budget,spec,search,met,bits_per_weight,quantized_bytes,fp16_bytes,reduction_vs_fp16,ppl,reference_ppl,"
      "ppl_increase,kl_mean,kl_median,kl_p99,kl_max,same_top_rate,passes,seconds,pareto\n";
  const std::vector<bool> pareto = result.pareto();
  for (size_t i = 0; i < result.points.size(); ++i) {
    const SweepPointResult& p = result.points[i];
    out += fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n", p.id, p.kind,
                       p.budget ? fmt::format("{}", *p.budget) : "", p.spec, p.search, p.met ? 1 : 0, p.bits_per_weight,
                       p.quantized_bytes, p.fp16_bytes, 1.0 - double(p.quantized_bytes) / double(p.fp16_bytes), p.ppl,
                       p.reference_ppl, p.ppl_increase, p.kl_mean, p.kl_median, p.kl_p99, p.kl_max, p.same_top_rate,
                       p.passes, p.seconds, pareto[i] ? 1 : 0);
  }
  return out;
}

std::string sweep_markdown(const SweepResult& result) {
  std::string md = "# gradq sweep\n\n";
  md += config_line(json::parse(result.config_json));
  md += "| point | budget | status | bits/weight | bytes | vs fp16 | held-out ppl | ppl change | KL mean | KL p99 | "
        "same top | seconds |\n";
  md += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  const std::vector<bool> pareto = result.pareto();
  double point_seconds = 0;
  int64_t budget_points = 0;
  for (size_t i = 0; i < result.points.size(); ++i) {
    const SweepPointResult& p = result.points[i];
    point_seconds += p.seconds;
    budget_points += p.budget.has_value();
    md += fmt::format("| {}{} | {} | {} | {:.3f} | {} | {:.1f}% smaller | {:.4f} | {} | {:.4f} | {:.4f} | {:.1f}% | {:.1f} |\n",
                      p.id, pareto[i] ? " *" : "", p.budget ? percent(*p.budget) : "uniform",
                      p.kind == "uniform" ? "baseline" : p.met ? "met" : "**not met**", p.bits_per_weight,
                      p.quantized_bytes, 100 * (1.0 - double(p.quantized_bytes) / double(p.fp16_bytes)), p.ppl,
                      percent(p.ppl_increase), p.kl_mean, p.kl_p99, 100 * p.same_top_rate, p.seconds);
  }
  md += "\n`*`: on the quality/size frontier (no other point has fewer bits and a lower perplexity increase).\n";
  if (!result.missing.empty())
    md += fmt::format("\nNot finished: {}.\n", fmt::join(result.missing, ", "));
  if (budget_points > 0) {
    // Separate runs would each repeat the reference and the analysis (the shared work).
    const double separate = point_seconds + double(budget_points) * result.shared_seconds;
    const double swept = point_seconds + result.shared_seconds;
    md += fmt::format(
        "\nTime: shared work (references and importance analysis) {:.1f} s, once; points {:.1f} s. Running the {} "
        "budget points as separate `gradq quantize` runs would repeat the shared work: {:.1f} s, so the sweep takes "
        "{:.2f}x the time of separate runs (estimated from these measurements).\n",
        result.shared_seconds, point_seconds, budget_points, separate, swept / separate);
  }
  return md;
}

std::string pareto_svg(const SweepResult& result) {
  ScatterChart chart;
  chart.title = "Held-out perplexity change vs size";
  chart.x_label = "bits per weight (scales and zero points included)";
  chart.y_label = "perplexity change (%)";
  // One frontier line per search strategy, in the order the points list them (the sweep's own first).
  std::vector<ScatterSeries> searched;
  ScatterSeries unmet{"gradq, budget not met", {}, "#9e9e9e", false, true};
  ScatterSeries uniform{"uniform baselines", {}, kChartPalette[1], false, false};
  ScatterSeries frontier{"Pareto frontier (all points)", {}, "#222222", true, false, false};
  const std::vector<bool> on_frontier = result.pareto();
  double largest_budget = 0;
  std::set<int64_t> tokens;
  std::vector<std::string> budgets;
  for (size_t i = 0; i < result.points.size(); ++i) {
    const SweepPointResult& p = result.points[i];
    const ScatterPoint point{p.bits_per_weight, 100 * p.ppl_increase,
                             p.budget ? fmt::format("{:+g}%", 100 * *p.budget) : p.spec};
    if (on_frontier[i]) frontier.points.push_back({point.x, point.y, ""});
    if (p.budget) {
      largest_budget = std::max({largest_budget, 100 * *p.budget, 100 * p.ppl_increase});
      const std::string label = fmt::format("{:+g}%", 100 * *p.budget);
      if (std::find(budgets.begin(), budgets.end(), label) == budgets.end()) budgets.push_back(label);
    }
    tokens.insert(p.tokens);
    if (p.kind == "uniform" || !p.met) {
      (p.kind == "uniform" ? uniform : unmet).points.push_back(point);
      continue;
    }
    const std::string name = p.search.empty() ? "gradq (budget search)" : "gradq (" + p.search + " search)";
    auto series = std::find_if(searched.begin(), searched.end(), [&](const ScatterSeries& s) { return s.name == name; });
    if (series == searched.end()) {
      // Palette colour 1 is the baselines'.
      const size_t color = std::min(searched.empty() ? size_t{0} : searched.size() + 1, kChartPalette.size() - 1);
      series = searched.insert(searched.end(), ScatterSeries{name, {}, kChartPalette[color], true, true});
    }
    series->points.push_back(point);
  }
  // Baselines far beyond every budget (2-bit ones reach +1000%) would flatten the frontier.
  if (largest_budget > 0) chart.y_max = 2 * largest_budget;
  auto by_x = [](const ScatterPoint& a, const ScatterPoint& b) { return a.x < b.x; };
  std::sort(frontier.points.begin(), frontier.points.end(), by_x);
  if (!frontier.points.empty()) chart.series.push_back(frontier);
  for (ScatterSeries& s : searched) {
    std::sort(s.points.begin(), s.points.end(), by_x);
    chart.series.push_back(s);
  }
  for (ScatterSeries* s : {&unmet, &uniform})
    if (!s->points.empty()) chart.series.push_back(*s);
  // Every point is evaluated on the same held-out windows; several counts mean mixed sweeps.
  tokens.erase(0);
  chart.notes.push_back(fmt::format("model {}; perplexity budgets {} (labels: budget or format)",
                                    result.model_name.empty() ? "(unnamed)" : result.model_name,
                                    budgets.empty() ? "none" : fmt::to_string(fmt::join(budgets, ", "))));
  chart.notes.push_back(fmt::format("evaluated on {} held-out tokens per point; y: achieved change against the "
                                    "full-precision model",
                                    tokens.empty() ? "an unrecorded number of" : fmt::to_string(fmt::join(tokens, " / "))));
  return render_scatter_chart(chart);
}

void write_sweep_report(const std::string& dir, const SweepResult& result) {
  write_file_atomically(dir + "/sweep.json", sweep_json(result));
  write_file_atomically(dir + "/sweep.csv", sweep_csv(result));
  write_file_atomically(dir + "/sweep.md", sweep_markdown(result));
  write_svg(dir + "/pareto.svg", pareto_svg(result));
}

// --- Regression gate ----------------------------------------------------------------------------
std::vector<std::string> find_regressions(const SweepResult& current, const SweepResult& previous,
                                          const RegressionTolerance& tolerance) {
  const json a = json::parse(current.config_json), b = json::parse(previous.config_json);
  for (const char* key : {"model", "calibration", "evaluation"})
    GRADQ_CHECK(a.at(key) == b.at(key),
                "the previous sweep measured another {} ({} here, {} there): nothing to compare", key,
                a.at(key).dump(), b.at(key).dump());
  std::map<std::string, const SweepPointResult*> now;
  for (const SweepPointResult& p : current.points) now[p.id] = &p;
  std::vector<std::string> out;
  for (const SweepPointResult& before : previous.points) {
    auto it = now.find(before.id);
    if (it == now.end()) {
      out.push_back(fmt::format("{}: missing from this sweep", before.id));
      continue;
    }
    const SweepPointResult& p = *it->second;
    if (before.met && !p.met)
      out.push_back(fmt::format("{}: met its budget before, not now (perplexity {})", p.id, percent(p.ppl_increase)));
    if (p.ppl > before.ppl * (1 + tolerance.ppl))
      out.push_back(fmt::format("{}: held-out perplexity {:.4f} -> {:.4f} ({} relative; tolerance {})", p.id,
                                before.ppl, p.ppl, percent(p.ppl / before.ppl - 1), percent(tolerance.ppl)));
    if (p.bits_per_weight > before.bits_per_weight + tolerance.bits)
      out.push_back(fmt::format("{}: bits per weight {:.4f} -> {:.4f} (+{:.4f}; tolerance {})", p.id,
                                before.bits_per_weight, p.bits_per_weight, p.bits_per_weight - before.bits_per_weight,
                                tolerance.bits));
  }
  return out;
}

}  // namespace gradq
