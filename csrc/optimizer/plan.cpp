#include "optimizer/plan.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include <set>

#include "common/error.h"
#include "common/files.h"
#include "common/json_integer.h"
#include "eval/block_cache.h"
#include "quant/quantize.h"

namespace gradq {

std::string Plan::to_json() const {
  nlohmann::ordered_json j;
  j["format"] = "gradq-plan";
  j["version"] = 1;
  j["weights"] = nlohmann::ordered_json::array();
  for (const PlanEntry& e : entries) {
    nlohmann::ordered_json w;
    w["name"] = e.name;
    w["spec"] = e.spec.name();
    w["method"] = rounding_method_name(e.method);
    if (std::isfinite(e.measured_kl)) w["kl"] = e.measured_kl;
    j["weights"].push_back(w);
  }
  return j.dump(2) + "\n";
}

Plan Plan::from_json(const std::string& text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("plan is not valid JSON: {}", e.what()));
  }
  try {
    GRADQ_CHECK(j.is_object() && j.value("format", "") == "gradq-plan",
                "not a gradq plan: expected \"format\": \"gradq-plan\"");
    const int version = json_integer_or<int>(j, "version", 0);
    GRADQ_CHECK(version == 1, "unsupported plan version {}, expected 1", version);
    GRADQ_CHECK(j.contains("weights") && j["weights"].is_array(), "plan has no \"weights\" array");
    Plan plan;
    std::map<std::string, std::string> seen;  // name -> spec of its first entry
    for (const auto& w : j["weights"]) {
      GRADQ_CHECK(w.is_object() && w.contains("name") && w["name"].is_string() && w.contains("spec") &&
                      w["spec"].is_string(),
                  "each plan entry needs string fields \"name\" and \"spec\", got {}", w.dump());
      PlanEntry e;
      e.name = w["name"].get<std::string>();
      e.spec = parse_quant_spec(w["spec"].get<std::string>());
      // Two entries for one weight are a broken plan whichever wins, even when they agree.
      const auto [first, fresh] = seen.emplace(e.name, w["spec"].get<std::string>());
      GRADQ_CHECK(fresh, "plan lists weight '{}' twice (as {} and as {}): expected one entry per weight", e.name,
                  first->second, w["spec"].get<std::string>());
      try {
        e.method = parse_rounding_method(w.value("method", "rtn"));
      } catch (const Error& err) {
        throw Error(fmt::format("plan entry '{}': {}", e.name, err.what()));
      }
      if (w.contains("kl") && w["kl"].is_number()) e.measured_kl = w["kl"].get<double>();
      plan.entries.push_back(e);
    }
    return plan;
  } catch (const nlohmann::json::exception& e) {
    // A field of the wrong JSON type (a number for "method", a string for "version", ...).
    throw Error(fmt::format("malformed gradq plan: {}", e.what()));
  }
}

void Plan::save(const std::string& path) const { write_file_atomically(path, to_json()); }

Plan Plan::load(const std::string& path) {
  try {
    return from_json(read_file(path));
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", path, e.what()));
  }
}

Plan uniform_plan(const QuantizableModel& model, const QuantSpec& spec, RoundingMethod method) {
  spec.validate();
  Plan plan;
  for (const WeightInfo& w : model.weights()) plan.entries.push_back({w.name, spec, method});
  return plan;
}

QuantizedTensor quantize_weight(const at::Tensor& w, const std::string& name, const QuantSpec& spec,
                                RoundingMethod method, InputStats stats, const RoundingOptions& rounding) {
  GRADQ_CHECK(!spec.is_integer() || !rounding_needs_xtx(method) || stats.xtx.defined(),
              "{} rounding of '{}' needs the calibration X^T X of its input", rounding_method_name(method), name);
  const at::Tensor sq_mean = stats.sq_sum.defined() ? stats.sq_mean() : at::Tensor();
  return quantize_tensor(w, spec, method, sq_mean, std::move(stats.xtx), rounding);
}

QuantizedWeights apply_plan(const QuantizableModel& model, const Plan& plan,
                            const std::map<std::string, InputStats>& stats, const RoundingOptions& rounding) {
  QuantizedWeights out;
  for (const PlanEntry& e : plan.entries) {
    const auto it = stats.find(e.name);
    out[e.name] = quantize_weight(model.weight(e.name), e.name, e.spec, e.method, it == stats.end() ? InputStats() : it->second,
                                  rounding);
  }
  return out;
}

namespace {

// Position in model.blocks() of every quantizable weight that belongs to a block.
std::map<std::string, int64_t> block_of_weights(const QuantizableModel& model) {
  std::map<std::string, int64_t> out;
  const auto& blocks = model.blocks();
  for (size_t b = 0; b < blocks.size(); ++b)
    for (size_t i : blocks[b].weights) out[model.weights()[i].name] = static_cast<int64_t>(b);
  return out;
}

}  // namespace

bool plan_in_blocks(const QuantizableModel& model, const Plan& plan) {
  if (!model.stages()) return false;
  const auto block_of = block_of_weights(model);
  return std::all_of(plan.entries.begin(), plan.entries.end(),
                     [&](const PlanEntry& e) { return block_of.count(e.name) > 0; });
}

QuantizedWeights apply_plan_by_block(QuantizableModel& model, const Plan& plan, const at::Tensor& inputs, int64_t batch,
                                     const RoundingOptions& rounding, bool sequential, const BlockProgress& on_block) {
  GRADQ_CHECK(model.stages(), "statistics per block need a model split into stages: {}",
              model.stages_unavailable_reason());
  const auto block_of = block_of_weights(model);
  std::vector<std::vector<const PlanEntry*>> entries(model.blocks().size());
  for (const PlanEntry& e : plan.entries) {
    const auto it = block_of.find(e.name);
    GRADQ_CHECK(it != block_of.end(), "statistics per block: '{}' is not a quantizable weight of a block", e.name);
    GRADQ_CHECK(model.holds_original(e.name), "statistics per block are the full-precision model's, but '{}' was changed",
                e.name);
    entries[static_cast<size_t>(it->second)].push_back(&e);
  }
  BlockInputStream stream(*model.stages(), inputs, batch);  // the model's weights are the originals
  QuantizedWeights out;
  for (size_t b = 0; b < entries.size(); ++b) {
    if (entries[b].empty()) continue;
    while (stream.block() < static_cast<int64_t>(b)) stream.advance();
    auto stats = model.capture_block_input_stats(static_cast<int64_t>(b), stream.states(), /*with_xtx=*/true);
    // Each weight's statistics go with it into quantize_weight, so that X^T X ([in, in] float64,
    // 242 MiB for TinyLlama's down projection) is freed once used: at the block's largest GPTQ only
    // that weight's is left, not the whole block's (434 MiB at those shapes).
    for (const PlanEntry* e : entries[b]) {
      auto node = stats.extract(e->name);
      GRADQ_CHECK(!node.empty(), "internal: block {} captured no statistics for '{}'", b, e->name);
      out[e->name] = quantize_weight(model.weight(e->name), e->name, e->spec, e->method, std::move(node.mapped()), rounding);
    }
    if (sequential && b + 1 < entries.size()) {
      for (const PlanEntry* e : entries[b]) model.set_weight(e->name, out.at(e->name).dequantize());
      try {
        stream.advance();
      } catch (...) {
        for (const PlanEntry* e : entries[b]) model.restore(e->name);
        throw;
      }
      for (const PlanEntry* e : entries[b]) model.restore(e->name);
    }
    if (on_block) on_block(static_cast<int64_t>(b) + 1, static_cast<int64_t>(entries.size()));
  }
  return out;
}

EvalResult evaluate_by_block(QuantizableModel& model, const QuantizedWeights& weights,
                             const GradualEvaluator& evaluator, const BlockProgress& on_block) {
  const ModelStages* stages = model.stages();
  const auto block_of = block_of_weights(model);
  std::vector<std::vector<std::string>> in_block(stages ? static_cast<size_t>(stages->num_blocks()) : 0);
  std::vector<std::string> whole_pass;
  for (const auto& [name, q] : weights) {
    GRADQ_CHECK(model.holds_original(name), "evaluating new weights block by block: '{}' was changed already", name);
    const auto it = block_of.find(name);
    if (stages && it != block_of.end()) {
      in_block[static_cast<size_t>(it->second)].push_back(name);
    } else {
      whole_pass.push_back(name);
    }
  }
  auto set = [&](const std::vector<std::string>& names) {
    for (const std::string& name : names) model.set_weight(name, weights.at(name).dequantize());
  };
  auto restore = [&](const std::vector<std::string>& names) {
    for (const std::string& name : names) model.restore(name);
  };
  try {
    set(whole_pass);
    EvalResult result;
    if (!stages) {
      result = evaluator.evaluate(model);
    } else {
      BlockInputStream stream(*stages, evaluator.windows().inputs, evaluator.batch());
      for (size_t b = 0; b < in_block.size(); ++b) {
        set(in_block[b]);
        stream.advance();
        restore(in_block[b]);
        if (on_block) on_block(static_cast<int64_t>(b) + 1, static_cast<int64_t>(in_block.size()));
      }
      result = evaluator.evaluate([&](int64_t begin, int64_t end) {
        GRADQ_CHECK(begin % evaluator.batch() == 0 && end - begin <= evaluator.batch(),
                    "the evaluator asked for windows [{}, {}), not one batch of {}", begin, end, evaluator.batch());
        c10::InferenceMode guard;
        return stages->head(stream.states().at(static_cast<size_t>(begin / evaluator.batch())));
      });
    }
    restore(whole_pass);
    return result;
  } catch (...) {
    for (const auto& [name, q] : weights) model.restore(name);
    throw;
  }
}

bool plan_needs_stats(const Plan& plan, bool* with_xtx) {
  bool needs = false, xtx = false;
  for (const PlanEntry& e : plan.entries) {
    if (!e.spec.is_integer()) continue;
    needs |= e.method != RoundingMethod::kRtn;
    xtx |= rounding_needs_xtx(e.method);
  }
  if (with_xtx) *with_xtx = xtx;
  return needs;
}

PlanSize plan_size(const QuantizableModel& model, const Plan& plan) {
  std::map<std::string, const PlanEntry*> by_name;
  for (const PlanEntry& e : plan.entries) by_name[e.name] = &e;
  PlanSize size;
  // Every quantizable weight, and every other matrix weight the plan quantizes (an embedding
  // named in a --plan without --include is still stored quantized).
  std::set<std::string> quantizable;
  for (const WeightInfo& w : model.weights()) quantizable.insert(w.name);
  for (const WeightInfo& w : model.matrix_weights()) {
    if (!quantizable.count(w.name) && !by_name.count(w.name)) continue;
    size.weights += w.numel();
    size.fp32_bytes += 4 * w.numel();
    size.fp16_bytes += 2 * w.numel();
    auto it = by_name.find(w.name);
    size.quantized_bytes += it == by_name.end() ? 2 * w.numel() : it->second->spec.storage_bytes(w.out_features, w.in_features);
  }
  return size;
}

std::vector<std::string> weights_outside_plan(const QuantizableModel& model, const Plan& plan) {
  std::set<std::string> planned;
  for (const PlanEntry& e : plan.entries) planned.insert(e.name);
  std::vector<std::string> out;
  for (const WeightInfo& w : model.weights())
    if (!planned.count(w.name)) out.push_back(w.name);
  return out;
}

}  // namespace gradq
