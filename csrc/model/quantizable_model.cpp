#include "model/quantizable_model.h"

#include <c10/core/InferenceMode.h>
#include <fmt/format.h>
#include <fmt/ranges.h>  // fmt::join (in fmt/format.h before fmt 11)
#include <torch/csrc/autograd/grad_mode.h>

#include <mutex>
#include <set>
#include <unordered_map>

#include "common/error.h"

namespace gradq {
namespace {

// ---- The collector behind observe_input ---------------------------------------------------------
// Process-wide and active only while a capture runs (under g_collect_mutex), so observing is a pure
// identity at any other time. Slots are positions in the captured model's weights(); a C++ model's
// observe_input finds its slot by the weight's tensor, CausalLM's graph op carries it as a constant.
struct InputCollector {
  std::vector<InputStats>* stats = nullptr;
  const std::unordered_map<const c10::TensorImpl*, int64_t>* slot_of = nullptr;
  bool with_xtx = false;
};
std::mutex g_collect_mutex;
InputCollector g_collector;

// Runs `run` with the inputs of `model`'s quantizable weights recorded into `stats` (by position in
// weights()).
void collect_inputs(const QuantizableModel& model, std::vector<InputStats>& stats, bool with_xtx,
                    const std::function<void()>& run) {
  std::unordered_map<const c10::TensorImpl*, int64_t> slot_of;
  for (size_t i = 0; i < model.weights().size(); ++i)
    slot_of.emplace(model.parameter(model.weights()[i].name).unsafeGetTensorImpl(), static_cast<int64_t>(i));
  std::lock_guard<std::mutex> lock(g_collect_mutex);
  g_collector = {&stats, &slot_of, with_xtx};
  try {
    c10::InferenceMode guard;
    run();
  } catch (...) {
    g_collector = {};
    throw;
  }
  g_collector = {};
}

std::string near_names(const std::vector<WeightInfo>& weights) {
  std::string out;
  for (size_t i = 0; i < weights.size() && i < 6; ++i) out += (i ? ", " : "") + weights[i].name;
  if (weights.size() > 6) out += fmt::format(", ... ({} in all)", weights.size());
  return out;
}

}  // namespace

namespace detail {
void observe_slots(const std::vector<int64_t>& slots, const at::Tensor& x) {
  if (!g_collector.stats || slots.empty()) return;
  std::vector<InputStats>& stats = *g_collector.stats;
  for (int64_t slot : slots)
    if (slot < 0 || slot >= static_cast<int64_t>(stats.size())) return;  // not one of this capture's weights
  InputStats& s = stats[static_cast<size_t>(slots.front())];
  // Sums are added in place: a new sum beside the old one and the product was a third [in, in]
  // float64 matrix (254 MB for 5632 inputs), and in place gives the same bits. The weights of one
  // observation share their sums (below), and are always observed together: a weight shares a tap
  // only when it has one matmul (CausalLM::insert_taps), and observe_input observes one weight.
  auto accumulate = [](at::Tensor& sum, const at::Tensor& add) { sum = sum.defined() ? sum.add_(add) : add; };
  at::Tensor rows = x.detach().reshape({-1, x.size(-1)}).to(at::kDouble);
  accumulate(s.sq_sum, rows.pow(2).sum(0));
  if (g_collector.with_xtx) accumulate(s.xtx, rows.t().matmul(rows));
  s.rows += rows.size(0);
  for (size_t i = 1; i < slots.size(); ++i) stats[static_cast<size_t>(slots[i])] = s;
}
}  // namespace detail

const at::Tensor& observe_input(const at::Tensor& weight, const at::Tensor& x) {
  if (g_collector.slot_of && weight.defined()) {
    const auto it = g_collector.slot_of->find(weight.unsafeGetTensorImpl());
    if (it != g_collector.slot_of->end()) detail::observe_slots({static_cast<int64_t>(it->second)}, x);
  }
  return x;
}

const char* weight_role_name(WeightRole role) {
  switch (role) {
    case WeightRole::kLinear: return "linear";
    case WeightRole::kEmbedding: return "embedding";
    case WeightRole::kHead: return "head";
  }
  return "?";
}

at::Tensor InputStats::sq_mean() const {
  return rows == 0 ? sq_sum.to(at::kFloat) : (sq_sum / static_cast<double>(rows)).to(at::kFloat);
}

const std::string& QuantizableModel::stages_unavailable_reason() const {
  static const std::string reason = "the model implements no stages (QuantizableModel::stages)";
  return reason;
}

at::ScalarType QuantizableModel::stored_dtype(const std::string&, at::ScalarType held) const { return held; }

at::Tensor QuantizableModel::logits(const at::Tensor& tokens) const {
  GRADQ_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong, "tokens must be int64 [B, T], got {} {}",
              c10::toString(tokens.scalar_type()), fmt::to_string(fmt::join(tokens.sizes(), "x")));
  c10::InferenceMode guard;
  const at::Tensor logits = forward(tokens.to(device()));
  // float64 (and fp16/bf16) logits are converted to float32, which everything downstream uses.
  GRADQ_CHECK(at::isFloatingType(logits.scalar_type()), "forward must return floating-point logits, it returns {}",
              c10::toString(logits.scalar_type()));
  return logits.to(at::kFloat);
}

void QuantizableModel::register_weights(std::vector<WeightInfo> matrix_weights,
                                        const std::vector<std::string>& quantizable) {
  GRADQ_CHECK(matrix_weights_.empty(),
              "register_weights is called once per model, this model has {} matrix weights registered already",
              matrix_weights_.size());
  std::set<std::string> matrix_names;
  for (const WeightInfo& w : matrix_weights) {
    const at::Tensor p = parameter(w.name);
    GRADQ_CHECK(p.dim() == 2 && p.is_floating_point(), "matrix weight '{}' must be a 2-D floating tensor, it is {} {}",
                w.name, c10::toString(p.scalar_type()), fmt::to_string(fmt::join(p.sizes(), "x")));
    const int64_t rows = w.transposed ? w.in_features : w.out_features;
    const int64_t cols = w.transposed ? w.out_features : w.in_features;
    GRADQ_CHECK(p.size(0) == rows && p.size(1) == cols,
                "matrix weight '{}' is declared [out {}, in {}]{}, so its parameter should be {}x{}, it is {}", w.name,
                w.out_features, w.in_features, w.transposed ? " stored transposed" : "", rows, cols,
                fmt::to_string(fmt::join(p.sizes(), "x")));
    GRADQ_CHECK(w.block_index < 0 || !w.block.empty(), "matrix weight '{}' has block number {} but no block name",
                w.name, w.block_index);
    GRADQ_CHECK(matrix_names.insert(w.name).second, "matrix weight '{}' is registered twice", w.name);
  }
  for (const std::string& name : quantizable)
    GRADQ_CHECK(matrix_names.count(name), "quantizable weight '{}' is not one of the {} registered matrix weights", name,
                matrix_weights.size());
  matrix_weights_ = std::move(matrix_weights);
  const std::set<std::string> selected(quantizable.begin(), quantizable.end());
  for (const WeightInfo& w : matrix_weights_)
    if (selected.count(w.name)) weights_.push_back(w);

  std::map<int64_t, BlockInfo> blocks;
  for (size_t i = 0; i < weights_.size(); ++i) {
    const WeightInfo& w = weights_[i];
    if (w.block_index < 0) continue;
    BlockInfo& b = blocks[w.block_index];
    GRADQ_CHECK(b.name.empty() || b.name == w.block,
                "block pattern maps both '{}' and '{}' to block number {}: make the pattern's first group unique",
                b.name, w.block, w.block_index);
    b.name = w.block;
    b.index = w.block_index;
    b.weights.push_back(i);
  }
  for (auto& [index, block] : blocks) blocks_.push_back(std::move(block));
  if (!matrix_weights_.empty())
    dtype_ = stored_dtype(matrix_weights_.front().name, parameter(matrix_weights_.front().name).scalar_type());
}

int64_t QuantizableModel::block_position(const std::string& block) const {
  for (size_t i = 0; i < blocks_.size(); ++i)
    if (blocks_[i].name == block) return static_cast<int64_t>(i);
  return -1;
}

size_t QuantizableModel::weight_index(const std::string& name) const {
  for (size_t i = 0; i < weights_.size(); ++i)
    if (weights_[i].name == name) return i;
  throw Error(fmt::format("'{}' is not a quantizable weight of this model; they are: {}", name, near_names(weights_)));
}

GradientScope::GradientScope(const QuantizableModel& model, Which which) {
  for (const auto& [name, p] : model.parameters()) {
    params_.push_back(p);
    flags_.push_back(p.requires_grad());
    grads_.push_back(p.grad());
    p.set_requires_grad(false);
  }
  if (which == Which::kQuantizableWeights)
    for (const WeightInfo& w : model.weights()) model.parameter(w.name).set_requires_grad(true);
}

GradientScope::~GradientScope() {
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].mutable_grad() = grads_[i];
    params_[i].set_requires_grad(flags_[i]);
  }
}

at::Tensor QuantizableModel::parameter(const std::string& name) const {
  for (const auto& [path, tensor] : parameters())
    if (path == name) return tensor;
  throw Error(fmt::format("the model has no parameter '{}'", name));
}

at::Tensor QuantizableModel::weight(const std::string& name) const {
  const WeightInfo& info = matrix_info(name);
  at::Tensor p = parameter(name).detach();
  return info.transposed ? p.t().contiguous() : p.clone();
}

const WeightInfo& QuantizableModel::matrix_info(const std::string& name) const {
  for (const auto& w : matrix_weights_)
    if (w.name == name) return w;
  throw Error(fmt::format("'{}' is not a matrix weight of this model; quantizable ones are: {}", name,
                          near_names(weights_)));
}

void QuantizableModel::set_weight(const std::string& name, const at::Tensor& value) {
  const WeightInfo& info = matrix_info(name);
  GRADQ_CHECK(value.dim() == 2 && value.size(0) == info.out_features && value.size(1) == info.in_features,
              "new value for '{}' must be [{}, {}], got {}", name, info.out_features, info.in_features,
              fmt::to_string(fmt::join(value.sizes(), "x")));
  // Outside inference mode: the parameter's new storage must be usable by autograd (trained rounding).
  c10::InferenceMode not_inference(false);
  torch::NoGradGuard no_grad;
  at::Tensor p = parameter(name);
  at::Tensor fresh = at::empty(p.sizes(), p.options());
  fresh.copy_(info.transposed ? value.t() : value);
  if (!originals_.count(name)) {
    // The current storage itself becomes the original: set_data below gives the parameter new storage
    // (every path to a shared tensor, a tied head, sees it) and leaves the old one to this alias.
    // fp16 weights held in float32 are kept in fp16 (exact, half the bytes).
    at::Tensor original = p.detach();
    const at::ScalarType stored = stored_dtype(name, p.scalar_type());
    if (stored != p.scalar_type()) original = original.to(stored);
    originals_.emplace(name, std::move(original));
  }
  p.set_data(fresh);
}

at::Tensor QuantizableModel::original_weight(const std::string& name) const {
  const WeightInfo& info = matrix_info(name);
  const at::Tensor p = parameter(name).detach();
  auto it = originals_.find(name);
  // An unchanged weight is its own original (no copy); set_weight() never writes into its storage.
  const at::Tensor stored = it == originals_.end() ? p : it->second.to(p.scalar_type());
  return info.transposed ? stored.t().contiguous() : stored;
}

int64_t QuantizableModel::original_bytes() const {
  int64_t total = 0;
  for (const auto& [name, t] : originals_) total += static_cast<int64_t>(t.nbytes());
  return total;
}

void QuantizableModel::restore(const std::string& name) {
  auto it = originals_.find(name);
  if (it == originals_.end()) return;
  c10::InferenceMode not_inference(false);
  torch::NoGradGuard no_grad;
  at::Tensor p = parameter(name);
  p.set_data(it->second.scalar_type() == p.scalar_type() ? it->second : it->second.to(p.scalar_type()));
  originals_.erase(it);
}

void QuantizableModel::restore_all() {
  while (!originals_.empty()) restore(originals_.begin()->first);
}

std::function<void(const at::Tensor& tokens)> QuantizableModel::observed_forward() const {
  return [this](const at::Tensor& tokens) { forward(tokens); };
}

std::map<std::string, InputStats> QuantizableModel::capture_input_stats(const at::Tensor& tokens, int64_t batch,
                                                                         bool with_xtx) const {
  GRADQ_CHECK(batch > 0, "batch must be positive, got {}", batch);
  const auto run = observed_forward();
  std::vector<InputStats> stats(weights_.size());
  collect_inputs(*this, stats, with_xtx, [&] {
    for (int64_t b = 0; b < tokens.size(0); b += batch)
      run(tokens.slice(0, b, std::min(tokens.size(0), b + batch)).to(device()));
  });
  std::map<std::string, InputStats> out;
  for (size_t i = 0; i < weights_.size(); ++i) out.emplace(weights_[i].name, std::move(stats[i]));
  return out;
}

std::map<std::string, InputStats> QuantizableModel::capture_block_input_stats(int64_t block,
                                                                               const std::vector<StageState>& inputs,
                                                                               bool with_xtx) const {
  const ModelStages* staged = stages();
  GRADQ_CHECK(staged, "block input statistics need the model split into blocks, which failed: {}",
              stages_unavailable_reason());
  GRADQ_CHECK(block >= 0 && block < staged->num_blocks(), "expected a block in [0, {}), got {}", staged->num_blocks(),
              block);
  GRADQ_CHECK(block < static_cast<int64_t>(blocks_.size()), "the stages have {} blocks and the model's weights {}",
              staged->num_blocks(), blocks_.size());
  // Only block `block`'s stage runs, so only its weights record.
  std::vector<InputStats> stats(weights_.size());
  collect_inputs(*this, stats, with_xtx, [&] {
    for (const StageState& in : inputs) staged->block(block, in);
  });
  std::map<std::string, InputStats> out;
  for (size_t i : blocks_.at(static_cast<size_t>(block)).weights) {
    GRADQ_CHECK(stats[i].rows > 0 || inputs.empty(),
                "block {} ran without recording the input of its weight '{}': the block's forward must pass that "
                "input through gradq::observe_input", block, weights_[i].name);
    out.emplace(weights_[i].name, std::move(stats[i]));
  }
  return out;
}

}  // namespace gradq
