#include "model/causal_lm.h"

#include <caffe2/serialize/file_adapter.h>
#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/istream_adapter.h>
#include <fmt/ranges.h>  // fmt::join (in fmt/format.h before fmt 11)
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/cuda.h>
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
#include "common/error_text.h"
#include "common/runtime.h"
#include "model/graph_utils.h"

namespace gradq {
namespace {

// ---- The tap op: records the activation entering a weight's matmul ------------------------------
// The graph op of observe_input's recorder (model/quantizable_model.h), with the positions in
// weights() of the weights whose matmul reads x as a constant: an identity except while statistics
// are collected. Several when they share one input (q, k and v; gate and up) and read nothing else.
at::Tensor tap(const at::Tensor& x, std::vector<int64_t> slots) {
  detail::observe_slots(slots, x);
  return x;
}

TORCH_LIBRARY(gradq_observe, m) { m.def("tap(Tensor(a) x, int[] slots) -> Tensor(a)", tap); }

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

namespace {

// Whether a TorchScript archive was written by PyTorch 2.x: its torch.jit.save adds a "byteorder"
// record (and ".data/serialization_id"; seen with 2.11), which 1.13's does not write.
// `open_input` returns the archive's bytes as a std::shared_ptr<caffe2::serialize::ReadAdapterInterface>.
template <typename OpenInput>
bool torchscript_written_by_torch2(OpenInput open_input) {
  try {
    return caffe2::serialize::PyTorchStreamReader(open_input()).hasRecord("byteorder");
  } catch (const std::exception&) {
    return false;  // not a zip archive at all: the caller reports the loader's own error
  }
}

// torch::jit::load's errors (`load` calls it on a file or on a stream of its bytes), as gradq::Error
// naming `path`; `open_input` gives the same bytes, to check the archive's pickles and source before
// the load and to tell a PyTorch 2.x file apart after a failed one.
template <typename Load, typename OpenInput>
torch::jit::Module load_module(const std::string& path, Load load, OpenInput open_input) {
  // libtorch's unpickler trusts the lengths in the archive's pickles, and its importer some fields of
  // the source (archive_check.h); an input that is no archive at all is left to the loader, which
  // names the problem.
  try {
    check_archive(open_input(), path);
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
  if (TORCH_VERSION_MAJOR < 2 && torchscript_written_by_torch2(open_input))
    throw Error(fmt::format("cannot load '{}': it was written by PyTorch 2.x and this gradq is built against libtorch "
                            "{}.{}, which cannot read it ({}); build gradq against PyTorch 2.x (README: With PyTorch "
                            "2.x) or save the model with PyTorch {}.{}", path, TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
                            first_line, TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR));
  throw Error(fmt::format("'{}' is not a loadable TorchScript module: {}", path, first_line));
}

}  // namespace

at::Device parse_device(const std::string& text) {
  const bool has_gpu = torch::cuda::is_available();
  if (text == "auto") return has_gpu ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
  std::optional<at::Device> device;
  try {
    device = at::Device(text);
  } catch (const c10::Error&) {
  }
  GRADQ_CHECK(device && (device->is_cpu() || device->is_cuda()),
              "unknown device '{}': expected cpu, cuda, cuda:N or auto", text);
  if (device->is_cpu()) return at::kCPU;
  GRADQ_CHECK(at::Context::hasCUDART(), "device '{}': this gradq is built against a libtorch without CUDA ({}.{}); build it "
              "against a CUDA PyTorch (README: With PyTorch 2.x) or use --device cpu", text, TORCH_VERSION_MAJOR,
              TORCH_VERSION_MINOR);
  GRADQ_CHECK(has_gpu, "device '{}': this libtorch has CUDA but sees no GPU (driver, CUDA_VISIBLE_DEVICES?)", text);
  const int64_t count = static_cast<int64_t>(torch::cuda::device_count());
  const int64_t index = device->has_index() ? device->index() : 0;
  GRADQ_CHECK(index < count, "device '{}': this machine has {} GPU{} (cuda:0 to cuda:{})", text, count,
              count == 1 ? "" : "s", count - 1);
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
}

namespace {
// torch::jit::load's device argument (c10::optional in libtorch 1.x, std::optional in 2.x).
c10::optional<c10::Device> map_location(const AdapterOptions& options) {
  if (options.device) return *options.device;
  return c10::nullopt;
}
}  // namespace

CausalLM CausalLM::load(const std::string& path, const AdapterOptions& options) {
  GRADQ_CHECK(std::filesystem::exists(path), "model '{}' does not exist", path);
  GRADQ_CHECK(!std::filesystem::is_directory(path), "model '{}' is a directory, expected a TorchScript file (.pt) or a "
              "llama2.c checkpoint (.bin)", path);
  return CausalLM(load_module(
                      path, [&] { return torch::jit::load(path, map_location(options)); },
                      [&] { return std::make_shared<caffe2::serialize::FileAdapter>(path); }),
                  options);
}

CausalLM CausalLM::load(std::istream& in, const std::string& path, const AdapterOptions& options) {
  return CausalLM(load_module(
                      path,
                      [&] {
                        in.clear();  // the archive check before may have read to the end
                        return torch::jit::load(in, map_location(options));
                      },
                      [&] {
                        in.clear();  // the readers seek to absolute offsets; a failed read sets failbit
                        return std::make_shared<caffe2::serialize::IStreamAdapter>(&in);
                      }),
                  options);
}

CausalLM::CausalLM(torch::jit::Module module, const AdapterOptions& options) : module_(std::move(module)) {
  configure_runtime();
  module_.eval();
  GRADQ_CHECK(module_.find_method("forward").has_value(), "the TorchScript module has no forward method");
  {
    // gradq calls forward(tokens) alone; a model traced with more inputs (Hugging Face's attention_mask)
    // would fail at the first call with the interpreter's message, which does not say what to do.
    const c10::FunctionSchema& schema = module_.get_method("forward").function().getSchema();
    std::vector<std::string> required;
    for (size_t i = 1; i < schema.arguments().size(); ++i)  // 0 is self
      if (!schema.arguments()[i].default_value()) required.push_back(schema.arguments()[i].name());
    GRADQ_CHECK(required.size() == 1,
                "forward must take the tokens alone, forward(tokens) -> logits; it takes {} input(s) without a default "
                "({}): trace or script the model with the tokens as its only input (Hugging Face models default "
                "attention_mask to all ones)",
                required.size(), fmt::join(required, ", "));
  }
  // Module::to moves each tensor in place (set_data), keeping its dtype: a tied head stays one tensor.
  if (options.device && device() != *options.device) module_.to(*options.device);
  hold_in_compute_dtype();
  at::Tensor probe;
  try {
    probe = logits(at::zeros({1, 2}, at::kLong));
  } catch (const Error&) {
    throw;  // gradq's checks of what forward returned say themselves what is wrong
  } catch (const std::exception& e) {  // c10::Error, or the interpreter's std::runtime_error made of one
    const std::string line = essential_error_line(e);
    // gradq runs an fp16 model in float32 on a CPU; a forward that makes fp16 tensors itself (a trace
    // records dtypes as constants: Hugging Face's attention masks) then mixes the two.
    const bool made_half_inside = !stored_dtypes_.empty() && line.find("Half") != std::string::npos;
    throw Error(fmt::format("the module's forward fails on int64 tokens [1, 2]: {}{}", line,
                            made_half_inside ? " (gradq computes fp16 models in float32 on a CPU, and this forward makes "
                                               "fp16 tensors itself: save the model in float32 or bf16, or run it on a GPU "
                                               "with --device cuda)"
                                             : ""));
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
  std::vector<WeightInfo> matrix_weights;
  std::vector<std::string> quantizable;

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
    matrix_weights.push_back(info);
    const bool selected = matches_any(path, include) ||
                          (info.role == WeightRole::kLinear && !matches_any(path, exclude));
    if (selected) quantizable.push_back(info.name);
  }

  register_weights(std::move(matrix_weights), quantizable);
}

void CausalLM::hold_in_compute_dtype() {
  // libtorch 1.13 has no fp16 CPU kernels for matmul, norms or softmax, so fp16 tensors on a CPU are
  // held in float32. Only those: bf16 has CPU kernels, and a forward that casts to bf16 itself (a
  // traced Hugging Face model's attention) must keep meeting bf16 tensors, also in a packed bf16
  // model. And not a packed model's storage (its fp16 scales, which only gradq's ops read): the ops
  // take it as stored, and a k format's fp16 super-scales cannot be float32.
  std::map<std::string, at::ScalarType> half;
  auto note = [&](const std::string& name, const at::Tensor& t) {
    if (t.defined() && t.scalar_type() == at::kHalf && t.device().is_cpu()) half.emplace(name, at::kHalf);
  };
  for (const auto& p : module_.named_parameters(/*recurse=*/true)) note(p.name, p.value);
  for (const auto& b : module_.named_buffers(/*recurse=*/true)) note(b.name, b.value);
  if (half.empty()) return;
  for (const std::string& name : packed_format_tensors(*inlined_forward_graph(module_))) half.erase(name);
  if (half.empty()) return;
  // Converted one by one: the C++ Module::to would convert integer buffers (a packed model's codes)
  // too. set_data keeps a tensor shared by two paths (a tied head) one tensor. The converted ones are
  // remembered so that writing the model restores each one's own dtype.
  torch::NoGradGuard no_grad;
  auto convert = [&](const std::string& name, at::Tensor t) {
    if (half.count(name)) t.set_data(t.to(at::kFloat));
  };
  for (const auto& p : module_.named_parameters(/*recurse=*/true)) convert(p.name, p.value);
  for (const auto& b : module_.named_buffers(/*recurse=*/true)) convert(b.name, b.value);
  stored_dtypes_ = std::move(half);
}

at::ScalarType CausalLM::stored_dtype(const std::string& path, at::ScalarType held) const {
  auto it = stored_dtypes_.find(path);
  return it == stored_dtypes_.end() ? held : it->second;
}

at::Device CausalLM::device() const {
  for (const auto& p : module_.parameters(/*recurse=*/true)) return p.device();
  return at::kCPU;
}

torch::jit::Module CausalLM::stored_module() const {
  const bool on_cpu = device().is_cpu();
  if (stored_dtypes_.empty() && on_cpu) return module_;
  torch::jit::Module copy = module_.deepcopy();
  // set_data converts in place, as Module::to does, so a tensor shared by two paths (a tied head)
  // stays one tensor.
  torch::NoGradGuard no_grad;
  auto convert = [&](const std::string& path, at::Tensor t) {
    const auto it = stored_dtypes_.find(path);
    const at::ScalarType dtype = it == stored_dtypes_.end() ? t.scalar_type() : it->second;
    if (dtype != t.scalar_type() || !t.device().is_cpu()) t.set_data(t.to(at::kCPU, dtype));
  };
  for (const auto& p : copy.named_parameters(/*recurse=*/true)) convert(p.name, p.value);
  for (const auto& b : copy.named_buffers(/*recurse=*/true)) convert(b.name, b.value);
  return copy;
}

std::vector<std::pair<std::string, at::Tensor>> CausalLM::parameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : module_.named_parameters(/*recurse=*/true)) out.emplace_back(p.name, p.value);
  return out;
}

at::Tensor CausalLM::forward(const at::Tensor& tokens) const {
  return logits_of(module_.forward({tokens}));
}

const ModelStages* CausalLM::stages() const {
  if (!stages_reason_ && !split_stages_) stages_reason_ = "splitting into stages is turned off";
  if (!stages_reason_) {
    std::vector<std::string> prefixes;
    for (const BlockInfo& b : blocks()) prefixes.push_back(b.name);
    // A probe long enough for attention over several positions; token ids spread over the vocabulary.
    at::Tensor probe = (at::arange(16, at::kLong) * 7919).remainder(vocab_size_).unsqueeze(0).to(device());
    std::string why;
    // Split with the taps in: they are identities except while statistics are collected, which lets
    // capture_block_input_stats() run one block alone.
    stages_ = GraphStages::split(module_, prefixes, probe, &why, [this](torch::jit::Graph& g) { insert_taps(g); });
    stages_reason_ = stages_ ? std::string() : why;
  }
  return stages_.get();
}

std::shared_ptr<const ModelStages> CausalLM::shared_stages() const {
  stages();
  return stages_;
}

const std::string& CausalLM::stages_unavailable_reason() const {
  stages();
  return *stages_reason_;
}

std::function<void(const at::Tensor& tokens)> CausalLM::observed_forward() const {
  auto graph = inlined_forward_graph(module_);
  insert_taps(*graph);
  auto instrumented = std::make_shared<torch::jit::GraphFunction>("gradq_instrumented_forward", graph, nullptr);
  return [instrumented, self = module_._ivalue()](const at::Tensor& tokens) { (*instrumented)({self, tokens}); };
}

void CausalLM::insert_taps(torch::jit::Graph& graph) const {
  auto paths = attribute_paths(graph);
  std::map<std::string, size_t> slot_of;
  for (size_t i = 0; i < weights().size(); ++i) slot_of[weights()[i].name] = i;

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
