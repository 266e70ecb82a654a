#include "export/export.h"

#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>

#include <functional>
#include <map>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "common/error.h"
#include "common/files.h"
#include "model/graph_utils.h"
#include "model/model_loader.h"

namespace gradq {
using torch::jit::Graph;
using torch::jit::Module;
using torch::jit::NamedValue;
using torch::jit::Node;
using torch::jit::Value;

namespace {

const WeightInfo& matrix_weight_info(const CausalLM& model, const std::string& name) {
  for (const WeightInfo& info : model.matrix_weights())
    if (info.name == name) return info;
  throw Error(fmt::format("cannot export '{}': it is not a matrix weight of the model", name));
}

void check_weights_fit(const CausalLM& model, const QuantizedWeights& weights) {
  for (const auto& [name, q] : weights) {
    const WeightInfo& info = matrix_weight_info(model, name);
    GRADQ_CHECK(q.out_features == info.out_features && q.in_features == info.in_features,
                "cannot export '{}': quantized as [{}, {}] but the model's weight is [{}, {}]", name, q.out_features,
                q.in_features, info.out_features, info.in_features);
  }
}

std::string type_name_for(const std::string& path) {
  std::string name = path.empty() ? "Model" : "m_" + path;
  for (char& c : name)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return "__torch__.gradq.packed." + name;
}

// Converted tensors by the tensor they were made from: a tensor read through two paths (a tied
// head) is converted once and stays one tensor in the file.
using Conversions = std::map<const c10::TensorImpl*, at::Tensor>;

// A non-quantized attribute as the model's file has it (see CausalLM::stored_dtype), on the CPU:
// the written file loads anywhere, whatever device the model ran on.
c10::IValue stored_form(const CausalLM& model, const std::string& path, const c10::IValue& value,
                        Conversions& converted) {
  if (!value.isTensor()) return value;
  const at::Tensor& t = value.toTensor();
  const at::ScalarType dtype = t.is_floating_point() ? model.stored_dtype(path, t.scalar_type()) : t.scalar_type();
  if (dtype == t.scalar_type() && t.device().is_cpu()) return value;
  auto [it, added] = converted.emplace(t.unsafeGetTensorImpl(), at::Tensor());
  if (added) it->second = t.to(at::kCPU, dtype);
  return it->second;
}

// The dtype a quantized weight is read back in: its parameter's in the model's file.
at::ScalarType weight_dtype(const CausalLM& model, const std::string& name) {
  return model.stored_dtype(name, model.parameter(name).scalar_type());
}

// Name of the empty buffer whose dtype a weight's reads convert to (see rewrite_packed_read). It
// follows Module::to like any buffer, so a consumer that converts the packed model (for example an
// fp16 model to float32 on a CPU) gets weights in the new dtype.
std::string dtype_buffer(const std::string& attr) { return attr + "_dtype"; }

// The stored form of one quantized weight: attributes that replace it in its owner module. `dtype`
// is the weight's dtype in the model's file.
void register_quantized(Module& dst, const std::string& attr, const QuantizedTensor& q, bool transposed,
                        at::ScalarType dtype) {
  if (dtype != at::kFloat && q.spec.level != QuantLevel::kPrune)
    dst.register_buffer(dtype_buffer(attr), at::empty({0}, dtype));
  if (q.spec.is_integer()) {
    dst.register_buffer(attr + "_codes", q.packed.codes);
    dst.register_buffer(attr + "_scales", q.packed.scales);
    if (q.spec.sub_scale_bits != 0) dst.register_buffer(attr + "_sub_scales", q.packed.sub_scales);
    if (!q.spec.symmetric) dst.register_buffer(attr + "_zeros", q.packed.zeros);
  } else if (q.spec.level == QuantLevel::kPrune) {
    // One stored element broadcast to the weight's shape: the file holds 4 bytes for it.
    const std::vector<int64_t> shape = transposed ? std::vector<int64_t>{q.in_features, q.out_features}
                                                  : std::vector<int64_t>{q.out_features, q.in_features};
    dst.register_buffer(attr, at::zeros({1}, dtype).expand(shape));
  } else {
    dst.register_buffer(attr, (transposed ? q.values.t().contiguous() : q.values).cpu());
  }
}

// Copies `src`'s attributes into a new module of its own class type, recursively; the weights in
// `weights` are replaced by their stored forms.
Module mirror(const Module& src, const std::string& path, const std::shared_ptr<torch::jit::CompilationUnit>& cu,
              const CausalLM& model, const QuantizedWeights& weights, Conversions& converted) {
  Module dst(c10::QualifiedName(type_name_for(path)), cu, /*shouldMangle=*/false);
  const c10::ClassTypePtr& type = src.type();
  for (size_t i = 0; i < type->numAttributes(); ++i) {
    const std::string& name = type->getAttributeName(i);
    const std::string full = path.empty() ? name : path + "." + name;
    const c10::IValue value = src._ivalue()->getSlot(i);
    const c10::TypePtr& attr_type = type->getAttribute(i);
    if (auto cls = attr_type->cast<c10::ClassType>(); cls && cls->is_module()) {
      dst.register_module(name, mirror(Module(value.toObject()), full, cu, model, weights, converted));
    } else if (auto it = weights.find(full); it != weights.end()) {
      register_quantized(dst, name, it->second, matrix_weight_info(model, full).transposed, weight_dtype(model, full));
    } else {
      // The declared type and flags are copied as they are: a parameter slot may hold None (a
      // scripted nn.Linear(bias=False) declares `bias: Optional[Tensor]` as a parameter).
      dst.register_attribute(name, attr_type, stored_form(model, full, value, converted), type->is_parameter(i),
                             type->is_buffer(i));
    }
  }
  return dst;
}

void collect_get_attrs(torch::jit::Block* block, std::vector<Node*>& out) {
  for (Node* node : block->nodes()) {
    if (node->kind() == c10::prim::GetAttr) out.push_back(node);
    for (torch::jit::Block* sub : node->blocks()) collect_get_attrs(sub, out);
  }
}

Value* insert_get_attr(Graph& graph, Value* owner, const std::string& name) {
  Node* n = graph.insertNode(graph.create(c10::prim::GetAttr, {owner}));
  n->s_(c10::attr::name, name);
  n->output()->setType(owner->type()->expectRef<c10::ClassType>().getAttribute(name));
  return n->output();
}

// Replaces the read of an integer-quantized weight (`read`, a prim::GetAttr) by reads of its
// packed buffers: aten::linear(x, W, b) becomes gradq::linear, every other use sees the dequantized
// weight in its stored layout.
// The dtype a weight's reads produce: float32, or the dtype of its `_dtype` buffer.
Value* read_dtype(Graph& graph, Value* owner, const std::string& attr, at::ScalarType dtype) {
  if (dtype == at::kFloat) return graph.insertConstant(c10::IValue(at::kFloat));
  return graph.insert(c10::prim::dtype, {insert_get_attr(graph, owner, dtype_buffer(attr))});
}

void rewrite_packed_read(Graph& graph, Node* read, const QuantizedTensor& q, bool transposed, at::ScalarType dtype) {
  static const c10::Symbol kLinear = c10::Symbol::fromQualString("gradq::linear");
  static const c10::Symbol kDequantize = c10::Symbol::fromQualString("gradq::dequantize");
  const std::string attr = read->s(c10::attr::name);
  Value* owner = read->input(0);
  torch::jit::WithInsertPoint at_read(read);
  Value* codes = insert_get_attr(graph, owner, attr + "_codes");
  Value* scales = insert_get_attr(graph, owner, attr + "_scales");
  Value* zeros = q.spec.symmetric ? graph.insertConstant(c10::IValue()) : insert_get_attr(graph, owner, attr + "_zeros");
  const NamedValue bits(c10::IValue(static_cast<int64_t>(q.spec.bits())));
  const NamedValue group(c10::IValue(q.spec.group_size));
  const NamedValue in(c10::IValue(q.in_features));
  // The schema's defaults (8-bit zero points, direct scales) read checkpoints written before these
  // arguments existed; a new export always names its format.
  const NamedValue zero_bits(c10::IValue(static_cast<int64_t>(q.spec.symmetric ? kZeroBits8 : q.spec.zero_bits())));
  Value* sub_scales = q.spec.sub_scale_bits == 0 ? graph.insertConstant(c10::IValue())
                                                 : insert_get_attr(graph, owner, attr + "_sub_scales");
  const NamedValue sub_bits(c10::IValue(static_cast<int64_t>(q.spec.sub_scale_bits)));
  Value* dequantized = nullptr;
  const std::vector<torch::jit::Use> uses = read->output()->uses();
  for (const torch::jit::Use& use : uses) {
    Node* user = use.user;
    if (!transposed && user->kind() == c10::aten::linear && use.offset == 1) {
      torch::jit::WithInsertPoint at_user(user);
      Value* y = graph.insert(kLinear, {user->input(0), codes, scales, zeros, user->input(2), bits, group, in, zero_bits, sub_scales, sub_bits});
      user->output()->replaceAllUsesWith(y);
      user->destroy();
      continue;
    }
    if (!dequantized) {
      dequantized = graph.insert(kDequantize, {codes, scales, zeros, bits, group, in, zero_bits, sub_scales, sub_bits});
      if (dtype != at::kFloat) dequantized = graph.insert(c10::aten::to, {dequantized, read_dtype(graph, owner, attr, dtype)});
      if (transposed) dequantized = graph.insert(c10::aten::t, {dequantized});
    }
    user->replaceInput(use.offset, dequantized);
  }
  read->destroy();
}

// Float-level weights (fp16, bf16, fp32) are converted to the weight's dtype where they are read.
void convert_float_read(Graph& graph, Node* read, at::ScalarType dtype) {
  const std::vector<torch::jit::Use> uses = read->output()->uses();
  torch::jit::WithInsertPoint after_read(read->next());
  Value* converted = graph.insert(c10::aten::to, {read->output(), read_dtype(graph, read->input(0), read->s(c10::attr::name), dtype)});
  for (const torch::jit::Use& use : uses) use.user->replaceInput(use.offset, converted);
}

}  // namespace

Module build_packed_module(const CausalLM& model, const QuantizedWeights& weights) {
  check_weights_fit(model, weights);
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  Conversions converted;
  Module packed = mirror(model.module(), "", cu, model, weights, converted);

  std::shared_ptr<Graph> graph = inlined_forward_graph(model.module());
  const auto paths = attribute_paths(*graph);
  std::vector<Node*> reads;
  collect_get_attrs(graph->block(), reads);
  // Retype the graph to the mirrored classes (reads come in program order, so owners first), then
  // rewrite the reads of quantized weights.
  graph->inputs()[0]->setType(packed.type());
  std::vector<std::pair<Node*, const QuantizedTensor*>> quantized_reads;
  for (Node* read : reads) {
    auto path = paths.find(read->output());
    if (path != paths.end()) {
      if (auto q = weights.find(path->second); q != weights.end()) {
        quantized_reads.emplace_back(read, &q->second);
        if (q->second.spec.is_integer()) continue;  // its attribute is gone; the read is replaced below
      }
    }
    const auto owner = read->input(0)->type()->cast<c10::ClassType>();
    GRADQ_CHECK(owner != nullptr, "cannot export: the forward graph reads attribute '{}' of a non-class value",
                read->s(c10::attr::name));
    read->output()->setType(owner->getAttribute(read->s(c10::attr::name)));
  }
  for (auto [read, q] : quantized_reads) {
    const std::string& name = paths.at(read->output());
    const bool transposed = matrix_weight_info(model, name).transposed;
    const at::ScalarType dtype = weight_dtype(model, name);
    if (q->spec.is_integer()) {
      rewrite_packed_read(*graph, read, *q, transposed, dtype);
    } else if (q->spec.level != QuantLevel::kPrune && q->values.scalar_type() != dtype) {
      convert_float_read(*graph, read, dtype);
    }
  }
  torch::jit::EliminateDeadCode(graph);
  graph->lint();
  auto* forward = cu->create_function(c10::QualifiedName(*packed.type()->name(), "forward"), graph);
  // The schema made from the graph has no defaults: keep the model's own argument names and defaults
  // (a scripted forward's `attention_mask: Optional[Tensor] = None`), with the graph's types.
  const c10::FunctionSchema& original = model.module().get_method("forward").function().getSchema();
  std::vector<c10::Argument> arguments;
  for (size_t i = 0; i < graph->inputs().size(); ++i)
    arguments.push_back(original.arguments().at(i).cloneWithType(graph->inputs()[i]->type()));
  torch::jit::toGraphFunction(*forward).setSchema(forward->getSchema().cloneWithArguments(std::move(arguments)));
  packed.type()->addMethod(forward);
  return packed;
}

void export_packed(const CausalLM& model, const QuantizedWeights& weights, const std::string& path) {
  save_module(build_packed_module(model, weights), path);
}

void export_fake_quant(CausalLM& model, const QuantizedWeights& weights, const std::string& path) {
  check_weights_fit(model, weights);
  // Put back exactly what the model held: its original (restored, nothing copied) or, for a weight
  // that held something else (a candidate's weights), a copy of that.
  std::map<std::string, at::Tensor> held;
  for (const auto& [name, q] : weights)
    if (!model.holds_original(name)) held[name] = model.weight(name);
  auto put_back = [&] {
    for (const auto& [name, q] : weights) {
      const auto it = held.find(name);
      if (it == held.end()) {
        model.restore(name);
      } else {
        model.set_weight(name, it->second);
      }
    }
  };
  try {
    for (const auto& [name, q] : weights) model.set_weight(name, q.dequantize());
    save_module(model.stored_module(), path);
  } catch (...) {
    put_back();
    throw;
  }
  put_back();
}

}  // namespace gradq
