#include "model/graph_utils.h"

#include <torch/csrc/jit/passes/inliner.h>

#include <map>
#include <unordered_set>

#include "common/error.h"

namespace gradq {
using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

namespace {
bool has_calls(const torch::jit::Block* block) {
  for (const Node* node : block->nodes()) {
    if (node->kind() == c10::prim::CallMethod || node->kind() == c10::prim::CallFunction) return true;
    for (const torch::jit::Block* sub : node->blocks())
      if (has_calls(sub)) return true;
  }
  return false;
}
}  // namespace

std::shared_ptr<Graph> inlined_forward_graph(const torch::jit::Module& module) {
  auto graph = module.get_method("forward").graph()->copy();
  // Inline() pastes each callee's graph as it is; with the graph executor's optimization off (see
  // configure_runtime) those are not pre-inlined, so repeat until no call is left.
  constexpr int kMaxDepth = 256;
  for (int depth = 0; depth < kMaxDepth && has_calls(graph->block()); ++depth) torch::jit::Inline(*graph);
  return graph;
}

namespace {
constexpr const char* kLogitsKey = "logits";
constexpr const char* kExpectedOutput =
    "the logits as one tensor [B, T, vocab], a tuple that starts with them or a dict with \"logits\"";
}  // namespace

at::Tensor logits_of(const c10::IValue& output) {
  if (output.isTensor()) return output.toTensor();
  if (output.isTuple()) {
    const auto& elements = output.toTupleRef().elements();
    if (!elements.empty() && elements[0].isTensor()) return elements[0].toTensor();
  } else if (output.isGenericDict()) {
    const c10::Dict<c10::IValue, c10::IValue> dict = output.toGenericDict();
    if (auto it = dict.find(c10::IValue(std::string(kLogitsKey))); it != dict.end() && it->value().isTensor())
      return it->value().toTensor();
  }
  throw Error(fmt::format("forward must return {}; it returns a {}", kExpectedOutput, output.type()->str()));
}

torch::jit::Value* logits_value(torch::jit::Graph& graph) {
  if (graph.outputs().size() != 1) return nullptr;
  Value* out = graph.outputs()[0];
  auto is_tensor = [](const Value* v) { return v->type()->cast<c10::TensorType>() != nullptr; };
  if (is_tensor(out)) return out;
  Node* node = out->node();
  if (node->kind() == c10::prim::TupleConstruct && node->inputs().size() > 0 && is_tensor(node->input(0)))
    return node->input(0);
  if (node->kind() == c10::prim::DictConstruct) {
    for (size_t k = 0; k + 1 < node->inputs().size(); k += 2) {
      const auto key = torch::jit::toIValue(node->input(k));
      if (key && key->isString() && key->toStringRef() == kLogitsKey && is_tensor(node->input(k + 1)))
        return node->input(k + 1);
    }
  }
  return nullptr;
}

namespace {
void collect_paths(const torch::jit::Block* block, const Value* self,
                   std::unordered_map<const Value*, std::string>& paths) {
  for (const Node* node : block->nodes()) {
    if (node->kind() == c10::prim::GetAttr) {
      const Value* owner = node->input(0);
      const std::string name = node->s(c10::attr::name);
      if (owner == self) {
        paths[node->output()] = name;
      } else if (auto it = paths.find(owner); it != paths.end()) {
        paths[node->output()] = it->second + "." + name;
      }
    }
    for (const torch::jit::Block* sub : node->blocks()) collect_paths(sub, self, paths);
  }
}

bool is_matmul(const Node* node) {
  const auto k = node->kind();
  return k == c10::aten::linear || k == c10::aten::matmul || k == c10::aten::mm || k == c10::aten::addmm;
}

// Ops that hand a weight on unchanged or transposed before it meets the matmul.
bool transposes(const Node* node) {
  if (node->kind() == c10::aten::t || node->kind() == c10::aten::numpy_T) return true;
  if (node->kind() != c10::aten::transpose) return false;
  auto d0 = torch::jit::toIValue(node->input(1));
  auto d1 = torch::jit::toIValue(node->input(2));
  if (!d0 || !d1) return false;
  const int64_t a = d0->toInt(), b = d1->toInt();
  return (a == 0 && b == 1) || (a == 1 && b == 0) || (a == -1 && b == -2) || (a == -2 && b == -1);
}
bool passes_through(const Node* node) {
  return node->kind() == c10::aten::contiguous || node->kind() == c10::aten::detach;
}

void find_matmuls(Value* v, bool flipped, std::vector<MatmulUse>& out) {
  for (const torch::jit::Use& use : v->uses()) {
    Node* n = use.user;
    if (transposes(n) && use.offset == 0) {
      find_matmuls(n->output(), !flipped, out);
    } else if (passes_through(n) && use.offset == 0) {
      find_matmuls(n->output(), flipped, out);
    } else if (n->kind() == c10::aten::linear && use.offset == 1) {
      out.push_back({n, 0, flipped});
    } else if ((n->kind() == c10::aten::matmul || n->kind() == c10::aten::mm) && use.offset == 1) {
      out.push_back({n, 0, !flipped});
    } else if (n->kind() == c10::aten::addmm && use.offset == 2) {
      out.push_back({n, 1, !flipped});
    }
  }
}
}  // namespace

std::unordered_map<const Value*, std::string> attribute_paths(const Graph& graph) {
  std::unordered_map<const Value*, std::string> paths;
  collect_paths(graph.block(), graph.inputs().at(0), paths);
  return paths;
}

std::set<std::string> packed_format_tensors(const torch::jit::Graph& graph) {
  static const c10::Symbol kGradqNamespace = c10::Symbol::fromQualString("namespaces::gradq");
  // The arguments of gradq::linear and gradq::dequantize (csrc/ops/ops.cpp) that hold the format;
  // x and bias are the model's own, in its compute dtype.
  static const std::set<std::string> kFormatArguments = {"codes", "scales", "zeros", "sub_scales"};
  auto is_format_argument = [](const torch::jit::Use& use) {
    if (use.user->kind().ns() != kGradqNamespace || !use.user->maybeSchema()) return false;
    const auto& arguments = use.user->schema().arguments();
    return use.offset < arguments.size() && kFormatArguments.count(arguments[use.offset].name()) > 0;
  };
  std::map<std::string, bool> only_format;  // by path: every read so far is a format argument
  for (const auto& [value, path] : attribute_paths(graph)) {
    bool only = !value->uses().empty();
    for (const torch::jit::Use& use : value->uses()) only = only && is_format_argument(use);
    auto [it, inserted] = only_format.emplace(path, only);
    if (!inserted) it->second = it->second && only;
  }
  std::set<std::string> out;
  for (const auto& [path, only] : only_format)
    if (only) out.insert(path);
  return out;
}

std::vector<MatmulUse> matmul_uses(Value* weight) {
  std::vector<MatmulUse> out;
  find_matmuls(weight, false, out);
  return out;
}

bool used_as_embedding(Value* weight) {
  for (const torch::jit::Use& use : weight->uses())
    if (use.user->kind() == c10::aten::embedding && use.offset == 0) return true;
  return false;
}

bool is_final_projection(Node* node) {
  std::vector<const Value*> stack(node->outputs().begin(), node->outputs().end());
  std::unordered_set<const Value*> seen;
  while (!stack.empty()) {
    const Value* v = stack.back();
    stack.pop_back();
    if (!seen.insert(v).second) continue;
    for (const torch::jit::Use& use : v->uses()) {
      if (is_matmul(use.user)) return false;
      for (const Value* o : use.user->outputs()) stack.push_back(o);
      // A use inside a sub-block flows out through the owning node's outputs.
      for (Node* owner = use.user->owningBlock()->owningNode(); owner; owner = owner->owningBlock()->owningNode())
        for (const Value* o : owner->outputs()) stack.push_back(o);
    }
  }
  return true;
}

}  // namespace gradq
