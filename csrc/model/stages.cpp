#include "model/stages.h"

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>

#include <algorithm>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include <fmt/ranges.h>

#include "common/error.h"
#include "model/graph_utils.h"

namespace gradq {
using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

at::Tensor ModelStages::logits_from(int64_t from, const StageState& in) const {
  GRADQ_CHECK(from >= 0 && from <= num_blocks(), "expected a block in [0, {}], got {}", num_blocks(), from);
  if (from == num_blocks()) return head(in);
  StageState state = block(from, in);
  for (int64_t i = from + 1; i < num_blocks(); ++i) state = block(i, state);
  return head(state);
}

void share_equal_tensors(StageState& state, const StageState& first) {
  if (state.size() != first.size()) return;
  for (size_t i = 0; i < state.size(); ++i) {
    if (!state[i].isTensor() || !first[i].isTensor()) continue;
    const at::Tensor& x = state[i].toTensor();
    const at::Tensor& y = first[i].toTensor();
    if (x.is_same(y) || x.scalar_type() != y.scalar_type() || x.sizes() != y.sizes() || x.device() != y.device())
      continue;
    if (at::equal(x, y)) state[i] = first[i];
  }
}

double state_mse(const StageState& a, const StageState& b) {
  GRADQ_CHECK(a.size() == b.size(), "states of one boundary must have as many values, got {} and {}", a.size(), b.size());
  double sum = 0;
  int64_t count = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!a[i].isTensor() || !a[i].toTensor().is_floating_point()) continue;
    const at::Tensor x = a[i].toTensor(), y = b[i].toTensor();
    GRADQ_CHECK(x.sizes() == y.sizes(), "state value {} has shape {} in one state and {} in the other", i,
                fmt::to_string(fmt::join(x.sizes(), "x")), fmt::to_string(fmt::join(y.sizes(), "x")));
    sum += (x.to(at::kDouble) - y.to(at::kDouble)).pow(2).sum().item<double>();
    count += x.numel();
  }
  return count ? sum / static_cast<double>(count) : 0.0;
}

struct GraphStages::Stage {
  std::string name;
  std::shared_ptr<Graph> graph;
  std::unique_ptr<torch::jit::GraphFunction> function;
  bool is_head = false;
  bool mutates = false;  ///< holds an op that may write into its inputs: they are copied first
};

namespace {

bool is_pure_read(const Node* node) {
  return node->kind() == c10::prim::GetAttr || node->kind() == c10::prim::Constant;
}

// The block an attribute path belongs to (-1 outside every block).
int64_t block_of(const std::string& path, const std::vector<std::string>& prefixes) {
  for (size_t i = 0; i < prefixes.size(); ++i)
    if (path == prefixes[i] || path.rfind(prefixes[i] + ".", 0) == 0) return static_cast<int64_t>(i);
  return -1;
}

// What a top-level node (with everything nested in it) reads: blocks, and whether it reads a tensor
// attribute outside every block.
struct Reads {
  std::set<int64_t> blocks;
  bool outside = false;
};

void collect_reads(const Node* node, const std::unordered_map<const Value*, std::string>& paths,
                   const std::vector<std::string>& prefixes, Reads& reads) {
  for (const Value* in : node->inputs()) {
    auto it = paths.find(in);
    if (it == paths.end()) continue;
    const int64_t b = block_of(it->second, prefixes);
    if (b >= 0) {
      reads.blocks.insert(b);
    } else if (in->type()->kind() == c10::TypeKind::TensorType) {
      reads.outside = true;
    }
  }
  for (const torch::jit::Block* sub : node->blocks())
    for (const Node* n : sub->nodes()) collect_reads(n, paths, prefixes, reads);
}

bool may_mutate(const Node* node) {
  if (node->kind().is_aten()) {
    if (const auto* schema = node->maybeSchema(); schema && schema->is_mutable()) return true;
  }
  for (const torch::jit::Block* sub : node->blocks())
    for (const Node* n : sub->nodes())
      if (may_mutate(n)) return true;
  return false;
}

// Top-level position of the node that (possibly through nesting) holds `node`.
const Node* top_level(const Node* node, const torch::jit::Block* top) {
  while (node->owningBlock() != top) node = node->owningBlock()->owningNode();
  return node;
}

}  // namespace

GraphStages::GraphStages(torch::jit::Module module, std::vector<std::shared_ptr<Stage>> stages, at::Device device)
    : module_(std::move(module)), stages_(std::move(stages)), device_(device) {}

std::unique_ptr<GraphStages> GraphStages::split(const torch::jit::Module& module,
                                                const std::vector<std::string>& block_prefixes,
                                                const at::Tensor& probe_tokens, std::string* why,
                                                const std::function<void(Graph&)>& instrument) {
  auto fail = [&](std::string reason) {
    if (why) *why = std::move(reason);
    return std::unique_ptr<GraphStages>();
  };
  if (block_prefixes.empty()) return fail("the model has no numbered blocks");
  std::shared_ptr<Graph> graph;
  try {
    graph = inlined_forward_graph(module);
    if (instrument) instrument(*graph);
  } catch (const c10::Error& e) {
    return fail(fmt::format("its forward cannot be inlined: {}", std::string(e.what_without_backtrace()).substr(0, 200)));
  }
  // Inputs after the tokens have defaults (CausalLM checks it), which is what the whole forward gets:
  // they become constants of the staged graph.
  const c10::FunctionSchema& schema = module.get_method("forward").function().getSchema();
  for (size_t i = graph->inputs().size(); i-- > 2;) {
    if (i >= schema.arguments().size() || !schema.arguments()[i].default_value()) break;
    try {
      torch::jit::WithInsertPoint at_start(graph->block()->nodes().front());
      graph->inputs()[i]->replaceAllUsesWith(graph->insertConstant(*schema.arguments()[i].default_value()));
      graph->eraseInput(i);
    } catch (const c10::Error& e) {
      return fail(fmt::format("the default of forward's input '{}' cannot be a graph constant: {}",
                              schema.arguments()[i].name(), std::string(e.what_without_backtrace()).substr(0, 200)));
    }
  }
  if (graph->inputs().size() != 2 || graph->outputs().size() != 1)
    return fail(fmt::format("forward takes {} inputs and returns {} values; expected (self, tokens) -> logits",
                            graph->inputs().size(), graph->outputs().size()));
  // The head stage ends at the logits: a tuple or dict around them (Hugging Face's outputs) is the
  // whole forward's business, and what the packed export keeps.
  Value* logits = logits_value(*graph);
  if (!logits) return fail(fmt::format("forward returns a {}, not logits", graph->outputs()[0]->type()->str()));
  if (logits != graph->outputs()[0]) {
    graph->eraseOutput(0);
    graph->registerOutput(logits);
    torch::jit::EliminateDeadCode(graph);
  }
  const auto paths = attribute_paths(*graph);
  const torch::jit::Block* top = graph->block();
  std::vector<Node*> nodes(graph->nodes().begin(), graph->nodes().end());
  const int64_t n = static_cast<int64_t>(nodes.size());
  const int64_t blocks = static_cast<int64_t>(block_prefixes.size());
  std::unordered_map<const Node*, int64_t> position;
  for (int64_t i = 0; i < n; ++i) position[nodes[i]] = i;

  // Where each block's reads begin and end, in top-level node positions.
  std::vector<int64_t> first(blocks, n), last(blocks, -1);
  std::vector<Reads> reads(n);
  for (int64_t i = 0; i < n; ++i) {
    if (is_pure_read(nodes[i])) continue;
    if (nodes[i]->kind() == c10::prim::SetAttr) return fail("the forward writes module attributes (prim::SetAttr)");
    collect_reads(nodes[i], paths, block_prefixes, reads[i]);
    for (int64_t b : reads[i].blocks) {
      first[b] = std::min(first[b], i);
      last[b] = std::max(last[b], i);
    }
  }
  for (int64_t b = 0; b < blocks; ++b) {
    if (last[b] < 0) return fail(fmt::format("no operation of the forward reads block '{}'", block_prefixes[b]));
    if (b > 0 && first[b] <= last[b - 1])
      return fail(fmt::format("blocks '{}' and '{}' are computed interleaved (or out of order) in the forward",
                              block_prefixes[b - 1], block_prefixes[b]));
  }
  for (int64_t i = 0; i < n; ++i)
    if (reads[i].blocks.size() > 1)
      return fail(fmt::format("one operation ({}) reads blocks '{}' and '{}' together", nodes[i]->kind().toQualString(),
                              block_prefixes[*reads[i].blocks.begin()], block_prefixes[*reads[i].blocks.rbegin()]));
  int64_t head_start = last[blocks - 1] + 1;
  for (int64_t i = head_start; i < n; ++i)
    if (reads[i].outside) {
      head_start = i;
      break;
    }
  // Values defined before a boundary and used at or after it: the state handed across. Attribute
  // reads and constants are re-created where they are used, and self is every stage's own input.
  Value* self = graph->inputs()[0];
  auto defined_at = [&](const Value* v) -> int64_t {
    if (v->node()->kind() == c10::prim::Param) return -1;
    return position.at(top_level(v->node(), top));
  };
  std::map<std::pair<int64_t, size_t>, Value*> ordered;  // by (definition, output offset)
  std::unordered_map<Value*, int64_t> last_use;
  {
    auto note_uses = [&](auto&& self_ref, Node* node, int64_t at) -> void {
      for (Value* in : node->inputs()) last_use[in] = std::max(last_use.count(in) ? last_use[in] : -1, at);
      for (torch::jit::Block* sub : node->blocks()) {
        for (Node* inner : sub->nodes()) self_ref(self_ref, inner, at);
        for (Value* out : sub->outputs()) last_use[out] = std::max(last_use.count(out) ? last_use[out] : -1, at);
      }
    };
    for (int64_t i = 0; i < n; ++i) note_uses(note_uses, nodes[i], i);
    last_use[graph->outputs()[0]] = n;
    for (const auto& [v, use] : last_use) {
      if (v == self || (v->node()->kind() != c10::prim::Param && is_pure_read(v->node()))) continue;
      if (v->node()->owningBlock() != top && v->node()->kind() != c10::prim::Param) continue;  // nested: stays inside
      ordered[{defined_at(v), v->offset()}] = v;
    }
  }
  auto live_across = [&](int64_t cut) {  // the state handed from nodes [.., cut) to [cut, ..)
    std::vector<Value*> live;
    for (const auto& [key, v] : ordered)
      if (key.first < cut && last_use.at(v) >= cut) live.push_back(v);
    return live;
  };

  // Stage s covers top-level nodes [begin[s], begin[s + 1]): embed, blocks, head. Each boundary is
  // cut among the nodes that read no attribute between the earlier stage's last read and the later
  // one's first, where the fewest tensors cross (ties: the latest cut). Cutting at the later
  // stage's first read would hand an RMSNorm's normalized input across beside the residual stream
  // (`x * rsqrt(mean(x^2))` comes before the multiplication by the norm's weight): a second
  // residual-sized tensor in every cached state, in fp32 where the norm computes in fp32.
  std::vector<int64_t> begin{0};
  for (int64_t b = 0; b < blocks; ++b) begin.push_back(first[b]);
  begin.push_back(head_start);
  begin.push_back(n);
  const int64_t stage_count = blocks + 2;
  // Tensors, and containers that may hold them; scalars (sizes, dtypes) cost nothing to hand on.
  auto tensors_in = [](const std::vector<Value*>& values) {
    return std::count_if(values.begin(), values.end(), [](const Value* v) {
      const c10::TypeKind k = v->type()->kind();
      return k == c10::TypeKind::TensorType || k == c10::TypeKind::ListType || k == c10::TypeKind::TupleType ||
             k == c10::TypeKind::OptionalType;
    });
  };
  for (int64_t s = 1; s < stage_count; ++s) {
    int64_t lo = begin[s];
    while (lo - 1 > begin[s - 1] && reads[lo - 1].blocks.empty() && !reads[lo - 1].outside) --lo;
    int64_t best = begin[s];
    auto fewest = tensors_in(live_across(best));
    for (int64_t cut = begin[s] - 1; cut >= lo; --cut)
      if (const auto count = tensors_in(live_across(cut)); count < fewest) {
        fewest = count;
        best = cut;
      }
    begin[s] = best;
  }
  std::vector<std::vector<Value*>> live(stage_count + 1);  // live[s]: state entering stage s
  for (int64_t s = 1; s <= stage_count; ++s) live[s] = live_across(s < stage_count ? begin[s] : n);
  live[0].push_back(graph->inputs()[1]);

  // Build one graph per stage.
  std::vector<std::shared_ptr<Stage>> stages;
  for (int64_t s = 0; s < stage_count; ++s) {
    auto stage = std::make_shared<Stage>();
    stage->name = s == 0 ? "embed" : s == stage_count - 1 ? "head" : block_prefixes[s - 1];
    stage->is_head = s == stage_count - 1;
    auto g = std::make_shared<Graph>();
    std::unordered_map<Value*, Value*> env;
    env[self] = g->addInput("self")->setType(self->type());
    for (Value* v : live[s]) env[v] = g->addInput()->copyMetadata(v);
    std::function<Value*(Value*)> lookup = [&](Value* v) -> Value* {
      if (auto it = env.find(v); it != env.end()) return it->second;
      GRADQ_CHECK(v->node()->kind() != c10::prim::Param && is_pure_read(v->node()),
                  "internal: stage '{}' uses value %{} that is neither state nor an attribute read", stage->name,
                  v->debugName());
      Node* copy = g->insertNode(g->createClone(v->node(), lookup));
      for (size_t k = 0; k < copy->outputs().size(); ++k) env[v->node()->output(k)] = copy->output(k);
      return env.at(v);
    };
    for (int64_t i = begin[s]; i < begin[s + 1]; ++i) {
      Node* node = nodes[i];
      if (is_pure_read(node)) continue;  // re-created on first use
      Node* copy = g->insertNode(g->createClone(node, lookup));
      for (size_t k = 0; k < copy->outputs().size(); ++k) env[node->output(k)] = copy->output(k);
      stage->mutates = stage->mutates || may_mutate(node);
    }
    if (stage->is_head) {
      g->registerOutput(lookup(graph->outputs()[0]));
    } else {
      std::vector<Value*> outs;
      for (Value* v : live[s + 1]) outs.push_back(lookup(v));
      g->registerOutput(g->insertNode(g->createTuple(outs))->output());
    }
    stage->graph = g;
    stage->function = std::make_unique<torch::jit::GraphFunction>("gradq_stage_" + std::to_string(s), g, nullptr);
    stages.push_back(std::move(stage));
  }

  std::unique_ptr<GraphStages> result(new GraphStages(module, std::move(stages), probe_tokens.device()));
  try {
    c10::InferenceMode guard;
    at::Tensor whole = logits_of(const_cast<torch::jit::Module&>(module).forward({probe_tokens}));
    at::Tensor staged = result->logits(probe_tokens);
    if (!at::equal(whole, staged))
      return fail(fmt::format("the staged forward differs from the whole forward by up to {} on a probe input",
                              (whole.to(at::kDouble) - staged.to(at::kDouble)).abs().max().item<double>()));
  } catch (const std::exception& e) {
    std::string msg = e.what();
    return fail("the staged forward fails on a probe input: " + msg.substr(0, msg.find('\n')));
  }
  return result;
}

size_t GraphStages::state_size(int64_t i) const {
  GRADQ_CHECK(i >= 0 && i <= num_blocks(), "expected a boundary in [0, {}], got {}", num_blocks(), i);
  return stages_[i + 1]->graph->inputs().size() - 1;
}

std::vector<c10::IValue> GraphStages::run(const Stage& stage, std::vector<c10::IValue> inputs) const {
  GRADQ_CHECK(inputs.size() + 1 == stage.graph->inputs().size(), "stage '{}' takes {} state values, got {}", stage.name,
              stage.graph->inputs().size() - 1, inputs.size());
  if (stage.mutates)
    for (c10::IValue& v : inputs)
      if (v.isTensor()) v = v.toTensor().clone();
  std::vector<c10::IValue> stack{module_._ivalue()};
  stack.insert(stack.end(), std::make_move_iterator(inputs.begin()), std::make_move_iterator(inputs.end()));
  c10::IValue out = (*stage.function)(std::move(stack));
  if (stage.is_head) return {out};
  const auto& elements = out.toTupleRef().elements();
  return std::vector<c10::IValue>(elements.begin(), elements.end());
}

StageState GraphStages::embed(const at::Tensor& tokens) const { return run(*stages_.front(), {tokens.to(device_)}); }

StageState GraphStages::block(int64_t i, const StageState& in) const {
  GRADQ_CHECK(i >= 0 && i < num_blocks(), "expected a block in [0, {}), got {}", num_blocks(), i);
  return run(*stages_[i + 1], in);
}

at::Tensor GraphStages::head(const StageState& in) const { return run(*stages_.back(), in).front().toTensor(); }

}  // namespace gradq
