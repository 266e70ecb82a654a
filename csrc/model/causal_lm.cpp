#include "model/causal_lm.h"

#include <caffe2/serialize/inline_container.h>
#include <fmt/ranges.h>  // fmt::join (in fmt/format.h before fmt 11)
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/version.h>
#include <torch/library.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <mutex>
#include <regex>
#include <set>

#include "common/archive_check.h"
#include "common/error.h"
#include "common/runtime.h"
#include "model/graph_utils.h"

namespace gradq {
namespace {

// ---- The tap op: records the activation entering a weight's matmul ------------------------------
// A process-wide collector is active only while capture_input_stats runs (under g_tap_mutex), so
// the op is a pure identity at any other time.
struct TapCollector {
  std::vector<InputStats>* stats = nullptr;
  bool with_xtx = false;
};
std::mutex g_tap_mutex;
TapCollector g_collector;

// Runs `run` with the taps recording into `stats` (indexed by quantizable weight).
void collect_taps(std::vector<InputStats>& stats, bool with_xtx, const std::function<void()>& run) {
  std::lock_guard<std::mutex> lock(g_tap_mutex);
  g_collector = {&stats, with_xtx};
  try {
    c10::InferenceMode guard;
    run();
  } catch (...) {
    g_collector = {};
    throw;
  }
  g_collector = {};
}

// `slots`: the weights whose matmul reads x. Several when they share one input (q, k and v; gate and
// up) and read nothing else: their statistics are the same tensors, computed once, so a block's
// X^T X takes one [in, in] matrix per distinct input instead of one per weight.
at::Tensor tap(const at::Tensor& x, std::vector<int64_t> slots) {
  if (!g_collector.stats) return x;
  std::vector<InputStats>& stats = *g_collector.stats;
  for (int64_t slot : slots)
    if (slot < 0 || slot >= static_cast<int64_t>(stats.size())) return x;  // not one of this capture's weights
  InputStats& s = stats[static_cast<size_t>(slots.front())];
  at::Tensor rows = x.detach().reshape({-1, x.size(-1)}).to(at::kDouble);
  at::Tensor sq = rows.pow(2).sum(0);
  s.sq_sum = s.sq_sum.defined() ? s.sq_sum + sq : sq;
  if (g_collector.with_xtx) {
    at::Tensor xtx = rows.t().matmul(rows);
    s.xtx = s.xtx.defined() ? s.xtx + xtx : xtx;
  }
  s.rows += rows.size(0);
  for (size_t i = 1; i < slots.size(); ++i) stats[static_cast<size_t>(slots[i])] = s;
  return x;
}

TORCH_LIBRARY(gradq_observe, m) { m.def("tap(Tensor(a) x, int[] slots) -> Tensor(a)", tap); }

std::string near_names(const std::vector<WeightInfo>& weights) {
  std::string out;
  for (size_t i = 0; i < weights.size() && i < 6; ++i) out += (i ? ", " : "") + weights[i].name;
  if (weights.size() > 6) out += fmt::format(", ... ({} in all)", weights.size());
  return out;
}

bool matches_any(const std::string& name, const std::vector<std::regex>& patterns) {
  return std::any_of(patterns.begin(), patterns.end(), [&](const std::regex& r) { return std::regex_search(name, r); });
}

std::vector<std::regex> compile_patterns(const std::vector<std::string>& patterns, const char* what) {
  std::vector<std::regex> out;
  for (const auto& p : patterns) {
    try {
      out.emplace_back(p);
    } catch (const std::regex_error& e) {
      throw Error(fmt::format("invalid {} pattern '{}': {}", what, p, e.what()));
    }
  }
  return out;
}
}  // namespace

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

namespace {

// Whether a TorchScript archive was written by PyTorch 2.x: its torch.jit.save adds a "byteorder"
// record (and ".data/serialization_id"; seen with 2.11), which 1.13's does not write.
// `open_archive` returns a std::unique_ptr<caffe2::serialize::PyTorchStreamReader> of the archive.
template <typename OpenArchive>
bool torchscript_written_by_torch2(OpenArchive open_archive) {
  try {
    return open_archive()->hasRecord("byteorder");
  } catch (const std::exception&) {
    return false;  // not a zip archive at all: the caller reports the loader's own error
  }
}

// torch::jit::load's errors (`load` calls it on a file or on a stream of its bytes), as gradq::Error
// naming `path`; `open_archive` opens the same bytes as an archive, to check its pickles before the
// load and to tell a PyTorch 2.x file apart after a failed one.
template <typename Load, typename OpenArchive>
torch::jit::Module load_module(const std::string& path, Load load, OpenArchive open_archive) {
  // libtorch's unpickler trusts the lengths in the archive's pickles (archive_check.h); an input that
  // is no archive at all is left to the loader, which names the problem.
  try {
    check_archive_pickles(*open_archive(), path);
  } catch (const Error&) {
    throw;
  } catch (const std::exception&) {  // not a readable archive
  }
  std::string msg;
  try {
    return load();
  } catch (const c10::Error& e) {
    msg = e.what_without_backtrace();
  } catch (const std::exception& e) {  // the TorchScript compiler's ErrorReport (unknown ops, syntax) and the
    msg = e.what();                    // archive and pickle readers' std:: exceptions
  }
  // The first non-empty line: the TorchScript compiler's messages start with a line break.
  std::string first_line;
  for (size_t begin = 0; begin < msg.size() && first_line.empty();) {
    const size_t end = std::min(msg.find('\n', begin), msg.size());
    first_line = msg.substr(begin, end - begin);
    begin = end + 1;
  }
  if (msg.find("gradq::") != std::string::npos || msg.find("gradq.") != std::string::npos)
    throw Error(fmt::format("cannot load '{}': it calls gradq ops that are not registered; load libgradq_ops.so first "
                            "({})", path, first_line));
  // PyTorch 2.x writes records that 1.x never wrote; what it compiles may call ops a 1.x libtorch lacks.
  if (TORCH_VERSION_MAJOR < 2 && torchscript_written_by_torch2(open_archive))
    throw Error(fmt::format("cannot load '{}': it was written by PyTorch 2.x and this gradq is built against libtorch "
                            "{}.{}, which cannot read it ({}); build gradq against PyTorch 2.x (README: With PyTorch "
                            "2.x) or save the model with PyTorch {}.{}", path, TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
                            first_line, TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR));
  throw Error(fmt::format("'{}' is not a loadable TorchScript module: {}", path, first_line));
}

}  // namespace

CausalLM CausalLM::load(const std::string& path, const AdapterOptions& options) {
  GRADQ_CHECK(std::filesystem::exists(path), "model '{}' does not exist", path);
  GRADQ_CHECK(!std::filesystem::is_directory(path), "model '{}' is a directory, expected a TorchScript file (.pt) or a "
              "llama2.c checkpoint (.bin)", path);
  return CausalLM(load_module(
                      path, [&] { return torch::jit::load(path); },
                      [&] { return std::make_unique<caffe2::serialize::PyTorchStreamReader>(path); }),
                  options);
}

CausalLM CausalLM::load(std::istream& in, const std::string& path, const AdapterOptions& options) {
  return CausalLM(load_module(
                      path,
                      [&] {
                        in.clear();  // the archive check before may have read to the end
                        return torch::jit::load(in);
                      },
                      [&] {
                        in.clear();  // the readers seek to absolute offsets; a failed read sets failbit
                        return std::make_unique<caffe2::serialize::PyTorchStreamReader>(&in);
                      }),
                  options);
}

CausalLM::CausalLM(torch::jit::Module module, const AdapterOptions& options) : module_(std::move(module)) {
  configure_runtime();
  module_.eval();
  GRADQ_CHECK(module_.find_method("forward").has_value(), "the TorchScript module has no forward method");
  hold_in_compute_dtype();
  at::Tensor probe;
  try {
    probe = logits(at::zeros({1, 2}, at::kLong));
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    throw Error(fmt::format("the module's forward does not accept int64 tokens [B, T]: {}", msg.substr(0, msg.find('\n'))));
  }
  GRADQ_CHECK(probe.dim() == 3 && probe.size(0) == 1 && probe.size(1) == 2,
              "forward must return logits [B, T, vocab]; for tokens [1, 2] it returned shape {}", fmt::to_string(fmt::join(probe.sizes(), "x")));
  vocab_size_ = probe.size(2);
  analyze(options);
}

void CausalLM::analyze(const AdapterOptions& options) {
  split_stages_ = options.split_stages;
  const auto include = compile_patterns(options.include, "include");
  const auto exclude = compile_patterns(options.exclude, "exclude");
  const auto block_re = compile_patterns({options.block_pattern}, "block").front();

  std::map<std::string, at::Tensor> params;
  for (const auto& p : module_.named_parameters(/*recurse=*/true)) params.emplace(p.name, p.value);

  auto graph = inlined_forward_graph(module_);
  auto paths = attribute_paths(*graph);
  // Parameter reads in graph order, so weights come out in the order the forward uses them.
  std::vector<std::pair<std::string, torch::jit::Value*>> reads;
  for (torch::jit::Node* node : graph->nodes())
    if (node->kind() == c10::prim::GetAttr)
      if (auto it = paths.find(node->output()); it != paths.end() && params.count(it->second))
        reads.emplace_back(it->second, node->output());

  std::set<std::string> seen;
  for (const auto& read : reads) {
    const std::string& path = read.first;
    const at::Tensor& p = params.at(path);
    if (p.dim() != 2 || !p.is_floating_point() || seen.count(path)) continue;
    // A weight may be read more than once (a tied head is read by embedding and by linear).
    std::vector<MatmulUse> uses;
    bool embedding = false;
    for (const auto& [other_path, value] : reads) {
      if (other_path != path) continue;
      auto u = matmul_uses(value);
      uses.insert(uses.end(), u.begin(), u.end());
      embedding = embedding || used_as_embedding(value);
    }
    if (uses.empty() && !embedding) continue;
    seen.insert(path);
    const bool head = std::any_of(uses.begin(), uses.end(), [](const MatmulUse& u) { return is_final_projection(u.node); });

    WeightInfo info;
    info.name = path;
    info.transposed = !embedding && uses.front().weight_is_in_out;
    info.out_features = info.transposed ? p.size(1) : p.size(0);
    info.in_features = info.transposed ? p.size(0) : p.size(1);
    info.role = embedding ? WeightRole::kEmbedding : head ? WeightRole::kHead : WeightRole::kLinear;
    std::smatch m;
    if (std::regex_search(path, m, block_re) && m.size() >= 3) {
      info.block = m[1].str();
      info.block_index = std::stoll(m[2].str());
    }
    matrix_weights_.push_back(info);
    const bool selected = matches_any(path, include) ||
                          (info.role == WeightRole::kLinear && !matches_any(path, exclude));
    if (selected) weights_.push_back(info);
  }

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
    dtype_ = stored_dtype(matrix_weights_.front().name, params.at(matrix_weights_.front().name).scalar_type());
}

void CausalLM::hold_in_compute_dtype() {
  std::map<std::string, at::ScalarType> floating;
  bool cpu_half = false;
  auto note = [&](const std::string& name, const at::Tensor& t) {
    if (!t.defined() || !t.is_floating_point() || t.scalar_type() == at::kFloat) return;
    floating.emplace(name, t.scalar_type());
    cpu_half = cpu_half || (t.scalar_type() == at::kHalf && t.device().is_cpu());
  };
  for (const auto& p : module_.named_parameters(/*recurse=*/true)) note(p.name, p.value);
  for (const auto& b : module_.named_buffers(/*recurse=*/true)) note(b.name, b.value);
  if (!cpu_half) return;
  // Converted one by one: the C++ Module::to would convert integer buffers (a packed model's codes)
  // too. set_data keeps a tensor shared by two paths (a tied head) one tensor. The converted ones are
  // remembered so that writing the model restores each one's own dtype.
  torch::NoGradGuard no_grad;
  auto convert = [&](const std::string& name, at::Tensor t) {
    if (floating.count(name)) t.set_data(t.to(at::kFloat));
  };
  for (const auto& p : module_.named_parameters(/*recurse=*/true)) convert(p.name, p.value);
  for (const auto& b : module_.named_buffers(/*recurse=*/true)) convert(b.name, b.value);
  stored_dtypes_ = std::move(floating);
}

at::ScalarType CausalLM::stored_dtype(const std::string& path, at::ScalarType held) const {
  auto it = stored_dtypes_.find(path);
  return it == stored_dtypes_.end() ? held : it->second;
}

torch::jit::Module CausalLM::stored_module() const {
  if (stored_dtypes_.empty()) return module_;
  torch::jit::Module copy = module_.deepcopy();
  // set_data converts in place, as Module::to does, so a tensor shared by two paths (a tied head)
  // stays one tensor.
  torch::NoGradGuard no_grad;
  auto convert = [&](const std::string& path, at::Tensor t) {
    if (auto it = stored_dtypes_.find(path); it != stored_dtypes_.end()) t.set_data(t.to(it->second));
  };
  for (const auto& p : copy.named_parameters(/*recurse=*/true)) convert(p.name, p.value);
  for (const auto& b : copy.named_buffers(/*recurse=*/true)) convert(b.name, b.value);
  return copy;
}

at::Tensor CausalLM::logits(const at::Tensor& tokens) const {
  GRADQ_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong, "tokens must be int64 [B, T], got {} {}",
              c10::toString(tokens.scalar_type()), fmt::to_string(fmt::join(tokens.sizes(), "x")));
  c10::InferenceMode guard;
  const c10::IValue out = module_.forward({tokens});
  GRADQ_CHECK(out.isTensor(), "forward must return the logits as one tensor [B, T, vocab], it returns a {}",
              out.type()->str());
  const at::Tensor logits = out.toTensor();
  // float64 (and fp16/bf16) logits are converted to float32, which everything downstream uses.
  GRADQ_CHECK(at::isFloatingType(logits.scalar_type()), "forward must return floating-point logits, it returns {}",
              c10::toString(logits.scalar_type()));
  return logits.to(at::kFloat);
}

const ModelStages* CausalLM::stages() const {
  if (!stages_reason_ && !split_stages_) stages_reason_ = "splitting into stages is turned off";
  if (!stages_reason_) {
    std::vector<std::string> prefixes;
    for (const BlockInfo& b : blocks_) prefixes.push_back(b.name);
    // A probe long enough for attention over several positions; token ids spread over the vocabulary.
    at::Tensor probe = (at::arange(16, at::kLong) * 7919).remainder(vocab_size_).unsqueeze(0);
    std::string why;
    // Split with the taps in: they are identities except while statistics are collected, which lets
    // capture_block_input_stats() run one block alone.
    stages_ = GraphStages::split(module_, prefixes, probe, &why, [this](torch::jit::Graph& g) { insert_taps(g); });
    stages_reason_ = stages_ ? std::string() : why;
  }
  return stages_.get();
}

const std::string& CausalLM::stages_unavailable_reason() const {
  stages();
  return *stages_reason_;
}

int64_t CausalLM::block_position(const std::string& block) const {
  for (size_t i = 0; i < blocks_.size(); ++i)
    if (blocks_[i].name == block) return static_cast<int64_t>(i);
  return -1;
}

size_t CausalLM::weight_index(const std::string& name) const {
  for (size_t i = 0; i < weights_.size(); ++i)
    if (weights_[i].name == name) return i;
  throw Error(fmt::format("'{}' is not a quantizable weight of this model; they are: {}", name, near_names(weights_)));
}

at::Tensor CausalLM::parameter(const std::string& name) const {
  for (const auto& p : module_.named_parameters(true))
    if (p.name == name) return p.value;
  throw Error(fmt::format("the model has no parameter '{}'", name));
}

at::Tensor CausalLM::weight(const std::string& name) const {
  const WeightInfo& info = matrix_info(name);
  at::Tensor p = parameter(name).detach();
  return info.transposed ? p.t().contiguous() : p.clone();
}

const WeightInfo& CausalLM::matrix_info(const std::string& name) const {
  for (const auto& w : matrix_weights_)
    if (w.name == name) return w;
  throw Error(fmt::format("'{}' is not a matrix weight of this model; quantizable ones are: {}", name,
                          near_names(weights_)));
}

void CausalLM::set_weight(const std::string& name, const at::Tensor& value) {
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
    // The loaded storage itself becomes the original: set_data below gives the parameter new storage
    // (every path to a shared tensor, a tied head, sees it) and leaves the old one to this alias.
    // fp16 weights held in float32 are kept in fp16 (exact, half the bytes).
    at::Tensor original = p.detach();
    const at::ScalarType stored = stored_dtype(name, p.scalar_type());
    if (stored != p.scalar_type()) original = original.to(stored);
    originals_.emplace(name, std::move(original));
  }
  p.set_data(fresh);
}

at::Tensor CausalLM::original_weight(const std::string& name) const {
  const WeightInfo& info = matrix_info(name);
  const at::Tensor p = parameter(name).detach();
  auto it = originals_.find(name);
  // An unchanged weight is its own original (no copy); set_weight() never writes into its storage.
  const at::Tensor stored = it == originals_.end() ? p : it->second.to(p.scalar_type());
  return info.transposed ? stored.t().contiguous() : stored;
}

int64_t CausalLM::original_bytes() const {
  int64_t total = 0;
  for (const auto& [name, t] : originals_) total += static_cast<int64_t>(t.nbytes());
  return total;
}

void CausalLM::restore(const std::string& name) {
  auto it = originals_.find(name);
  if (it == originals_.end()) return;
  c10::InferenceMode not_inference(false);
  torch::NoGradGuard no_grad;
  at::Tensor p = parameter(name);
  p.set_data(it->second.scalar_type() == p.scalar_type() ? it->second : it->second.to(p.scalar_type()));
  originals_.erase(it);
}

void CausalLM::restore_all() {
  while (!originals_.empty()) restore(originals_.begin()->first);
}

std::map<std::string, InputStats> CausalLM::capture_input_stats(const at::Tensor& tokens, int64_t batch,
                                                                 bool with_xtx) const {
  GRADQ_CHECK(batch > 0, "batch must be positive, got {}", batch);
  auto graph = inlined_forward_graph(module_);
  insert_taps(*graph);
  torch::jit::GraphFunction instrumented("gradq_instrumented_forward", graph, nullptr);
  std::vector<InputStats> stats(weights_.size());
  collect_taps(stats, with_xtx, [&] {
    for (int64_t b = 0; b < tokens.size(0); b += batch) {
      at::Tensor chunk = tokens.slice(0, b, std::min(tokens.size(0), b + batch));
      instrumented({module_._ivalue(), chunk});
    }
  });
  std::map<std::string, InputStats> out;
  for (size_t i = 0; i < weights_.size(); ++i) out.emplace(weights_[i].name, std::move(stats[i]));
  return out;
}

std::map<std::string, InputStats> CausalLM::capture_block_input_stats(int64_t block, const std::vector<StageState>& inputs,
                                                                       bool with_xtx) const {
  const ModelStages* staged = stages();
  GRADQ_CHECK(staged, "block input statistics need the model split into blocks, which failed: {}",
              stages_unavailable_reason());
  GRADQ_CHECK(block >= 0 && block < staged->num_blocks(), "expected a block in [0, {}), got {}", staged->num_blocks(),
              block);
  // Only block `block`'s stage runs, so only its weights' taps record.
  std::vector<InputStats> stats(weights_.size());
  collect_taps(stats, with_xtx, [&] {
    for (const StageState& in : inputs) staged->block(block, in);
  });
  std::map<std::string, InputStats> out;
  for (size_t i : blocks_.at(static_cast<size_t>(block)).weights) {
    GRADQ_CHECK(stats[i].rows > 0 || inputs.empty(), "internal: block {} ran without reading its weight '{}'", block,
                weights_[i].name);
    out.emplace(weights_[i].name, std::move(stats[i]));
  }
  return out;
}

void CausalLM::insert_taps(torch::jit::Graph& graph) const {
  auto paths = attribute_paths(graph);
  std::map<std::string, size_t> slot_of;
  for (size_t i = 0; i < weights_.size(); ++i) slot_of[weights_[i].name] = i;

  // A tap in front of every matmul that a quantizable weight feeds. Weights whose one matmul reads
  // the same value x in the same graph block share one tap (their statistics are the same); a
  // weight with several matmuls (tied, reused) gets a tap of its own at each.
  struct Tap {
    torch::jit::Value* x = nullptr;  ///< the activation the matmuls read
    std::vector<int64_t> slots;
    std::vector<MatmulUse> uses;
  };
  std::vector<Tap> taps;
  std::map<std::pair<torch::jit::Value*, torch::jit::Block*>, size_t> shared_tap;  // (x, block) -> taps index
  std::vector<std::pair<torch::jit::Value*, size_t>> weight_values;
  for (const auto& [value, path] : paths)
    if (auto it = slot_of.find(path); it != slot_of.end())
      weight_values.emplace_back(const_cast<torch::jit::Value*>(value), it->second);
  std::sort(weight_values.begin(), weight_values.end(),
            [](const auto& a, const auto& b) { return a.second < b.second; });  // slots in weights_ order
  for (const auto& [value, slot] : weight_values) {
    const std::vector<MatmulUse> uses = matmul_uses(value);
    if (uses.size() == 1) {
      const auto key = std::make_pair(uses[0].node->input(uses[0].activation_input), uses[0].node->owningBlock());
      const auto [it, added] = shared_tap.emplace(key, taps.size());
      if (added) taps.push_back({key.first, {}, {}});
      taps[it->second].slots.push_back(static_cast<int64_t>(slot));
      taps[it->second].uses.push_back(uses[0]);
      continue;
    }
    for (const MatmulUse& use : uses)
      taps.push_back({use.node->input(use.activation_input), {static_cast<int64_t>(slot)}, {use}});
  }
  const auto tap_symbol = c10::Symbol::fromQualString("gradq_observe::tap");
  for (const Tap& tap : taps) {
    torch::jit::Node* first = tap.uses.front().node;  // all in one graph block: the earliest of them
    for (const MatmulUse& use : tap.uses)
      if (use.node->isBefore(first)) first = use.node;
    torch::jit::WithInsertPoint guard(first);
    torch::jit::Value* slots = graph.insertConstant(c10::IValue(tap.slots));
    torch::jit::Node* tap_node = graph.insertNode(graph.create(tap_symbol, {tap.x, slots}, 1));
    tap_node->output()->setType(tap.x->type());
    for (const MatmulUse& use : tap.uses) use.node->replaceInput(use.activation_input, tap_node->output());
  }
}

}  // namespace gradq
