#include "importance/probes.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>


#include "common/error.h"
#include "common/hash.h"
#include "common/timing.h"
#include "quant/quantize.h"

namespace gradq {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

const WeightInfo& matrix_info(const QuantizableModel& model, const std::string& name) {
  for (const auto& w : model.matrix_weights())
    if (w.name == name) return w;
  throw Error(fmt::format("'{}' is not a matrix weight of this model", name));
}

}  // namespace

const char* unit_kind_name(UnitKind kind) { return kind == UnitKind::kLayer ? "layer" : "block"; }

std::vector<ImportanceUnit> importance_units(const QuantizableModel& model) {
  std::vector<ImportanceUnit> units;
  for (const WeightInfo& w : model.weights()) {
    ImportanceUnit u;
    u.kind = UnitKind::kLayer;
    u.name = w.name;
    u.block = w.block;
    u.block_index = w.block_index;
    u.weights = {w.name};
    u.numel = w.numel();
    units.push_back(std::move(u));
  }
  for (const BlockInfo& b : model.blocks()) {
    ImportanceUnit u;
    u.kind = UnitKind::kBlock;
    u.name = b.name;
    u.block = b.name;
    u.block_index = b.index;
    for (size_t i : b.weights) {
      u.weights.push_back(model.weights()[i].name);
      u.numel += model.weights()[i].numel();
    }
    units.push_back(std::move(u));
  }
  return units;
}

uint64_t noise_seed(uint64_t seed, const std::string& name) { return splitmix64(seed ^ Fnv1a().bytes(name.data(), name.size()).value()); }

// ---- WeightCache ---------------------------------------------------------------------------------

WeightCache::WeightCache(const QuantizableModel& model, int64_t max_bytes) : model_(model), quantized_(max_bytes) {}

at::Tensor WeightCache::original(const std::string& name) const {
  model_.weight_index(name);  // throws naming the quantizable weights
  return model_.original_weight(name);
}

at::Tensor WeightCache::fake_quant(const std::string& name, const QuantSpec& spec) {
  const std::pair<std::string, std::string> key(name, spec.name());
  if (const at::Tensor* q = quantized_.find(key)) return *q;
  at::Tensor q = fake_quantize(original(name), spec);
  quantized_.insert(key, q, static_cast<int64_t>(q.nbytes()));
  return q;
}

// ---- WeightScope ---------------------------------------------------------------------------------

WeightScope::~WeightScope() {
  try {
    restore();
  } catch (...) {
    // A destructor must not throw; restore() only copies tensors of the shapes it saved.
  }
}

void WeightScope::set_weight(const std::string& name, const at::Tensor& value) {
  // A weight at its original is put back from the model's own original (QuantizableModel::restore);
  // only a weight that already held another value needs a copy of it.
  if (!saved_weights_.count(name))
    saved_weights_.emplace(name, model_.holds_original(name) ? at::Tensor() : model_.weight(name));
  model_.set_weight(name, value);
}

void WeightScope::zero_parameter(const std::string& name) {
  at::Tensor p = model_.parameter(name);
  torch::NoGradGuard no_grad;
  if (!saved_parameters_.count(name)) saved_parameters_.emplace(name, p.detach().clone());
  p.zero_();
}

void WeightScope::restore() {
  for (const auto& [name, value] : saved_weights_) {
    if (value.defined()) {
      model_.set_weight(name, value);
    } else {
      model_.restore(name);
    }
  }
  torch::NoGradGuard no_grad;
  for (const auto& [name, value] : saved_parameters_) model_.parameter(name).copy_(value);
  saved_weights_.clear();
  saved_parameters_.clear();
}

// ---- Probes --------------------------------------------------------------------------------------

ProbeMeasure probe_noise(QuantizableModel& model, const ProbeEvaluator& evaluator, const WeightCache& cache,
                         const ImportanceUnit& unit, double alpha, uint64_t seed, MeasureAt where) {
  GRADQ_CHECK(std::isfinite(alpha) && alpha >= 0, "noise alpha must be a finite number >= 0, got {}", alpha);
  WeightScope scope(model);
  for (const std::string& name : unit.weights) {
    const at::Tensor w = cache.original(name);
    at::Generator gen = at::detail::createCPUGenerator(noise_seed(seed, name));
    const double sigma = alpha * w.to(at::kDouble).std().item<double>();
    // Drawn on the CPU whatever the model's device: the same seed gives the same noise everywhere.
    const at::Tensor noise = at::randn(w.sizes(), gen, w.options().device(at::kCPU)).to(w.device());
    scope.set_weight(name, w + noise * sigma);
  }
  return evaluator.measure(model, where.how, where.block);
}

ProbeMeasure probe_rtn(QuantizableModel& model, const ProbeEvaluator& evaluator, WeightCache& cache,
                       const ImportanceUnit& unit, const QuantSpec& spec, MeasureAt where) {
  spec.validate();
  WeightScope scope(model);
  for (const std::string& name : unit.weights) scope.set_weight(name, cache.fake_quant(name, spec));
  return evaluator.measure(model, where.how, where.block);
}

ProbeMeasure probe_disable(QuantizableModel& model, const ProbeEvaluator& evaluator, const ImportanceUnit& unit,
                           MeasureAt where) {
  WeightScope scope(model);
  auto zero_weight = [&](const WeightInfo& w) { scope.set_weight(w.name, at::zeros({w.out_features, w.in_features})); };
  if (unit.kind == UnitKind::kLayer) {
    for (const std::string& name : unit.weights) zero_weight(matrix_info(model, name));
  } else {
    for (const WeightInfo& w : model.matrix_weights())
      if (w.block == unit.name) zero_weight(w);
    const std::string prefix = unit.name + ".";
    for (const auto& [n, p] : model.parameters()) {
      const bool bias = n.size() >= 5 && n.compare(n.size() - 5, 5, ".bias") == 0;
      if (bias && n.compare(0, prefix.size(), prefix) == 0) scope.zero_parameter(n);
    }
  }
  return evaluator.measure(model, where.how, where.block);
}

ProbeMeasure probe_baseline(QuantizableModel& model, const ProbeEvaluator& evaluator, WeightCache& cache,
                            const QuantSpec& base) {
  base.validate();
  WeightScope scope(model);
  for (const WeightInfo& w : model.weights()) scope.set_weight(w.name, cache.fake_quant(w.name, base));
  return evaluator.measure(model);
}

ProbeMeasure probe_upgrade(QuantizableModel& model, const ProbeEvaluator& evaluator, WeightCache& cache,
                           const ImportanceUnit& unit, const QuantSpec& base, const QuantSpec& upgraded,
                           MeasureAt where) {
  base.validate();
  upgraded.validate();
  WeightScope scope(model);
  const bool local = where.how == Measurement::kLocal;
  for (const WeightInfo& w : model.weights()) {
    // Locally only the block runs, so only its weights need to change (which keeps the probe's cost
    // independent of the model's depth).
    if (local && model.block_position(w.block) != where.block) continue;
    const bool in_unit = std::find(unit.weights.begin(), unit.weights.end(), w.name) != unit.weights.end();
    scope.set_weight(w.name, cache.fake_quant(w.name, in_unit ? upgraded : base));
  }
  // The other blocks are at `base` too, so exact measurement from the unit's block would start from
  // full-precision inputs: anything but local is measured whole.
  return local ? evaluator.measure_local(where.block) : evaluator.measure(model);
}

ProbeMeasure calibrate_local(QuantizableModel& model, ProbeEvaluator& evaluator, WeightCache& cache,
                             const ImportanceUnit& block_unit, int64_t block, const QuantSpec& spec) {
  spec.validate();
  WeightScope scope(model);
  for (const std::string& name : block_unit.weights) scope.set_weight(name, cache.fake_quant(name, spec));
  ProbeMeasure exact = evaluator.measure_exact(block);
  exact.local_error = evaluator.local_error(block);
  evaluator.set_local_factor(block, exact.local_error > 0 ? exact.kl / exact.local_error : 0.0);
  return exact;
}

// ---- Static signals -------------------------------------------------------------------------------

StaticSignals static_signals(QuantizableModel& model, const ProbeEvaluator& evaluator, WeightCache& cache,
                             const QuantSpec& fisher_spec, int64_t batch) {
  GRADQ_CHECK(!c10::InferenceMode::is_enabled(), "static_signals needs autograd: call it outside c10::InferenceMode");
  GRADQ_CHECK(batch > 0, "batch must be positive, got {}", batch);
  fisher_spec.validate();
  const auto start = Clock::now();
  const Windows& windows = evaluator.windows();
  const int64_t K = evaluator.subsets();
  StaticSignals out;
  std::map<std::string, at::Tensor> sq_sum;
  std::map<std::string, int64_t> rows;
  for (const WeightInfo& w : model.weights()) {
    WeightSignals& s = out.weights[w.name];
    s.weight_magnitude = cache.original(w.name).abs().mean().item<double>();
  }

  // Activations: one capture pass, subset by subset.
  for (int64_t k = 0; k < K; ++k) {
    auto [b, e] = evaluator.subset_windows(k);
    auto stats = model.capture_input_stats(windows.inputs.slice(0, b, e), batch, /*with_xtx=*/false);
    for (const WeightInfo& w : model.weights()) {
      const InputStats& st = stats.at(w.name);
      WeightSignals& s = out.weights[w.name];
      s.activation_sq_mean_subsets.push_back(st.sq_mean().to(at::kDouble).mean().item<double>());
      sq_sum[w.name] = sq_sum[w.name].defined() ? sq_sum[w.name] + st.sq_sum : st.sq_sum;
      rows[w.name] += st.rows;
    }
  }
  for (const WeightInfo& w : model.weights())
    out.weights[w.name].activation_sq_mean = (sq_sum[w.name] / static_cast<double>(rows[w.name])).mean().item<double>();

  // Gradients of the mean NLL: one forward+backward pass, subset by subset.
  // W - fake_quant(W), logical layout: made when needed rather than kept for every weight (a float64
  // copy of the model).
  auto error = [&](const std::string& name) {
    return (cache.original(name) - cache.fake_quant(name, fisher_spec)).to(at::kDouble);
  };
  std::map<std::string, at::Tensor> overall;
  for (const WeightInfo& w : model.weights()) overall[w.name] = at::zeros_like(cache.original(w.name), at::kDouble);
  {
    GradientScope grad_scope(model, GradientScope::Which::kQuantizableWeights);
    c10::AutoGradMode grad_mode(true);
    const at::Tensor& mask = evaluator.scored_mask();
    const double total_tokens = static_cast<double>(evaluator.scored_tokens());
    for (int64_t k = 0; k < K; ++k) {
      auto [b, e] = evaluator.subset_windows(k);
      const double n_k = static_cast<double>(evaluator.subset_tokens(k));
      for (const WeightInfo& w : model.weights()) model.parameter(w.name).mutable_grad() = at::Tensor();
      for (int64_t i = b; i < e; i += batch) {
        const int64_t j = std::min(e, i + batch);
        at::Tensor logits = model.forward(windows.inputs.slice(0, i, j).to(model.device())).to(at::kFloat);
        at::Tensor m = mask.slice(0, i, j).to(logits.device());
        at::Tensor lp = at::log_softmax(logits.index({m}), -1);
        at::Tensor targets = windows.targets.slice(0, i, j).to(logits.device()).index({m}).unsqueeze(1);
        at::Tensor loss = -lp.gather(1, targets).sum() / n_k;
        loss.backward();
      }
      for (const WeightInfo& w : model.weights()) {
        at::Tensor g = model.parameter(w.name).grad();
        GRADQ_CHECK(g.defined(), "no gradient reached '{}': the loss does not depend on it", w.name);
        g = (w.transposed ? g.t() : g).to(at::kDouble);
        WeightSignals& s = out.weights[w.name];
        s.gradient_magnitude_subsets.push_back(g.abs().mean().item<double>());
        s.fisher_subsets.push_back((g * error(w.name)).abs().sum().item<double>());
        overall[w.name] += g * (n_k / total_tokens);
      }
    }
  }
  for (const WeightInfo& w : model.weights()) {
    WeightSignals& s = out.weights[w.name];
    const at::Tensor& g = overall[w.name];
    s.gradient_magnitude = g.abs().mean().item<double>();
    s.fisher = (g * error(w.name)).abs().sum().item<double>();
  }
  out.seconds = seconds_since(start);
  return out;
}

std::map<std::string, std::vector<double>> unit_static_signals(const StaticSignals& signals,
                                                               const QuantizableModel& model,
                                                               const ImportanceUnit& unit) {
  std::map<std::string, std::vector<double>> out;
  GRADQ_CHECK(!unit.weights.empty(), "unit '{}' has no weights", unit.name);
  const size_t K = signals.weights.at(unit.weights.front()).fisher_subsets.size();
  for (const char* key : {"weight_magnitude", "activation_sq_mean", "gradient_magnitude", "fisher"})
    out[key].assign(K + 1, 0.0);
  double total = 0;
  for (const std::string& name : unit.weights) {
    auto it = signals.weights.find(name);
    GRADQ_CHECK(it != signals.weights.end(), "no static signals for '{}'", name);
    const WeightSignals& s = it->second;
    const double n = static_cast<double>(model.weights()[model.weight_index(name)].numel());
    total += n;
    for (size_t k = 0; k <= K; ++k) {
      out["weight_magnitude"][k] += n * s.weight_magnitude;
      out["activation_sq_mean"][k] += n * (k == 0 ? s.activation_sq_mean : s.activation_sq_mean_subsets[k - 1]);
      out["gradient_magnitude"][k] += n * (k == 0 ? s.gradient_magnitude : s.gradient_magnitude_subsets[k - 1]);
      out["fisher"][k] += k == 0 ? s.fisher : s.fisher_subsets[k - 1];
    }
  }
  for (const char* key : {"weight_magnitude", "activation_sq_mean", "gradient_magnitude"})
    for (double& v : out[key]) v /= total;
  return out;
}

}  // namespace gradq
