#include "report/quantize_report.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <map>
#include <set>

#include "report/svg_chart.h"

namespace gradq {
namespace {

std::string human_bytes(double bytes) {
  if (bytes >= 1e9) return fmt::format("{:.2f} GB", bytes / 1e9);
  if (bytes >= 1e6) return fmt::format("{:.2f} MB", bytes / 1e6);
  if (bytes >= 1e3) return fmt::format("{:.1f} kB", bytes / 1e3);
  return fmt::format("{:.0f} B", bytes);
}

double reduction(const PlanSize& size) { return 1.0 - double(size.quantized_bytes) / double(size.fp16_bytes); }

nlohmann::ordered_json eval_json(const std::optional<EvalResult>& r) {
  if (!r) return nullptr;
  return nlohmann::ordered_json::parse(eval_result_json(*r));
}

std::string level_color(QuantLevel level) {
  switch (level) {
    case QuantLevel::kPrune: return "#9e9e9e";
    case QuantLevel::kInt2: return "#d62728";
    case QuantLevel::kInt3: return "#ff7f0e";
    case QuantLevel::kInt4: return "#2ca02c";
    case QuantLevel::kInt5: return "#17becf";
    case QuantLevel::kInt6: return "#bcbd22";
    case QuantLevel::kInt8: return "#1f77b4";
    case QuantLevel::kFp16: return "#9467bd";
    case QuantLevel::kBf16: return "#8c564b";
    default: return "#e377c2";
  }
}

// What every chart of the run states under its title: the model, the budget and what was achieved.
std::vector<std::string> run_notes(const QuantizeOutcome& outcome, const ReportFiles& files) {
  std::vector<std::string> notes{fmt::format("model {}; budget {}", files.model.empty() ? "(unnamed)" : files.model,
                                             files.budget.empty() ? "(none)" : files.budget)};
  std::string achieved = fmt::format("{:.3f} bits per weight, {:.1f}% smaller than fp16", outcome.size.bits_per_weight(),
                                     100 * reduction(outcome.size));
  if (outcome.heldout && outcome.heldout->reference_ppl && outcome.heldout->kl) {
    const EvalResult& r = *outcome.heldout;
    achieved += fmt::format("; held-out ({} tokens): perplexity {:+.2f}%, KL mean {:.4f}", r.tokens,
                            100 * ppl_increase(r), r.kl->mean.value);
  } else {
    achieved += "; not evaluated on held-out text";
  }
  notes.push_back("achieved: " + achieved);
  return notes;
}

}  // namespace

std::vector<LevelShare> level_distribution(const QuantizableModel& model, const QuantizeOutcome& outcome) {
  std::map<QuantLevel, LevelShare> by_level;
  // matrix_weights(): an embedding a --plan quantizes counts although it is not quantizable by default.
  for (const WeightInfo& w : model.matrix_weights()) {
    auto it = outcome.weights.find(w.name);
    if (it == outcome.weights.end()) continue;
    LevelShare& s = by_level[it->second.spec.level];
    s.level = it->second.spec.level;
    ++s.units;
    s.parameters += w.numel();
    s.bytes += it->second.storage_bytes();
  }
  std::vector<LevelShare> out;
  for (QuantLevel level : kQuantLevels)
    if (by_level.count(level)) out.push_back(by_level[level]);
  return out;
}

std::string quantize_report_json(const QuantizableModel& model, const QuantizeOutcome& outcome,
                                 const ReportFiles& files) {
  nlohmann::ordered_json j;
  j["format"] = "gradq-quantize-report";
  j["status"] = outcome.status == QuantizeStatus::kMet ? "met" : "budget_unmet";
  j["messages"] = outcome.messages;
  j["budget"] = files.budget;
  j["model"] = files.model;
  j["output"] = files.output;
  const PlanSize& size = outcome.size;
  j["memory"] = {{"quantizable_parameters", size.weights},
                 {"fp32_bytes", size.fp32_bytes},
                 {"fp16_bytes", size.fp16_bytes},
                 {"quantized_bytes", size.quantized_bytes},
                 {"bits_per_weight", size.bits_per_weight()},
                 {"reduction_vs_fp16", reduction(size)},
                 {"compression_ratio_vs_fp16", double(size.fp16_bytes) / double(size.quantized_bytes)},
                 {"target_met", outcome.memory_target_met},
                 {"input_file_bytes", files.model_bytes},
                 {"output_file_bytes", files.output_bytes},
                 {"reduction_vs_input_file",
                  files.output_bytes ? 1.0 - double(files.output_bytes) / double(files.model_bytes) : 0.0}};
  nlohmann::ordered_json levels = nlohmann::ordered_json::array();
  int64_t total_units = 0;
  for (const LevelShare& s : level_distribution(model, outcome)) total_units += s.units;
  for (const LevelShare& s : level_distribution(model, outcome))
    levels.push_back({{"level", quant_level_name(s.level)},
                      {"units", s.units},
                      {"units_share", double(s.units) / double(total_units)},
                      {"parameters", s.parameters},
                      {"parameters_share", double(s.parameters) / double(size.weights)},
                      {"bytes", s.bytes}});
  j["levels"] = levels;
  j["heldout"] = eval_json(outcome.heldout);
  j["all8_heldout"] = eval_json(outcome.all8_heldout);
  j["calibration"] = eval_json(outcome.calibration);
  nlohmann::ordered_json units = nlohmann::ordered_json::array();
  for (const PlanEntry& e : outcome.plan.entries) {
    nlohmann::ordered_json u = {{"name", e.name}, {"spec", e.spec.name()}, {"method", rounding_method_name(e.method)}};
    if (std::isfinite(e.measured_kl)) u["measured_kl"] = e.measured_kl;
    units.push_back(u);
  }
  j["units"] = units;
  j["order"] = outcome.order;
  nlohmann::ordered_json steps = nlohmann::ordered_json::array();
  for (const SearchStep& s : outcome.search_steps)
    steps.push_back({{"weight", s.weight}, {"from", s.from}, {"to", s.to}, {"method", rounding_method_name(s.method)},
                     {"accepted", s.accepted}, {"kl_before", s.kl_before}, {"kl", s.kl},
                     {"ppl_increase", s.ppl_increase}, {"bits_per_weight", s.bits_per_weight}, {"seconds", s.seconds},
                     {"predicted", s.predicted}, {"taken_back", s.taken_back}});
  j["search_steps"] = steps;
  nlohmann::ordered_json confirmations = nlohmann::ordered_json::array();
  for (const Confirmation& c : outcome.search_confirmations)
    confirmations.push_back({{"changes", c.changes}, {"kl_before", c.kl_before}, {"predicted_kl", c.predicted_kl},
                             {"measured_kl", c.measured_kl}, {"kept", c.kept}});
  // Allocation: per weight, the KL each candidate adds alone (the allocator's input).
  nlohmann::ordered_json curves = nlohmann::ordered_json::object();
  for (const auto& [name, points] : outcome.search_curves) {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const CurvePoint& p : points)
      list.push_back({{"spec", p.spec.name()}, {"method", rounding_method_name(p.method)}, {"bytes", p.bytes}, {"kl", p.kl}});
    curves[name] = list;
  }
  j["search"] = {{"strategy", outcome.search_strategy},
                 {"measurement", outcome.search_measurement},
                 {"blocks_run", outcome.search_blocks_run},
                 {"blocks_whole", outcome.search_blocks_whole},
                 {"local_measurements", outcome.search_local_measurements},
                 {"candidates_quantized", outcome.search_candidates_quantized},
                 {"candidates_read_back", outcome.search_candidates_read_back},
                 {"candidates_screened", outcome.search_candidates_screened},
                 {"ppl_per_kl", outcome.search_ppl_per_kl},
                 {"confirmations", confirmations},
                 {"curves", curves}};
  nlohmann::ordered_json validation = nlohmann::ordered_json::array();
  for (const ValidationStep& s : outcome.validation_steps)
    validation.push_back({{"weight", s.weight}, {"from", s.from}, {"to", s.to}, {"heldout_kl_before", s.kl_before},
                          {"heldout_kl_after", s.kl_after}, {"extra_bits", s.extra_bits}, {"candidates", s.candidates},
                          {"kept", s.kept}, {"pass", s.pass}});
  j["validation_steps"] = validation;
  nlohmann::ordered_json phases = nlohmann::ordered_json::array();
  for (const PhaseTiming& p : outcome.phases)
    phases.push_back({{"phase", p.name}, {"passes", p.passes}, {"seconds", p.seconds},
                      {"cpu_seconds", p.cpu_seconds}, {"seconds_per_pass", p.passes ? p.seconds / double(p.passes) : 0.0}});
  j["phases"] = phases;
  j["seconds"] = outcome.seconds;
  return j.dump(2) + "\n";
}

std::string format_quantize_summary(const QuantizableModel& model, const QuantizeOutcome& outcome,
                                    const ReportFiles& files) {
  std::string s;
  const PlanSize& size = outcome.size;
  s += fmt::format("budget: {}\n", files.budget.empty() ? "none" : files.budget);
  s += fmt::format("\n{:<8} {:>6} {:>8} {:>12} {:>8} {:>12}\n", "level", "units", "units%", "parameters", "params%", "bytes");
  int64_t total_units = 0;
  const auto levels = level_distribution(model, outcome);
  for (const LevelShare& l : levels) total_units += l.units;
  for (const LevelShare& l : levels)
    s += fmt::format("{:<8} {:>6} {:>7.1f}% {:>12} {:>7.1f}% {:>12}\n", quant_level_name(l.level), l.units,
                     100.0 * l.units / total_units, l.parameters, 100.0 * l.parameters / size.weights, l.bytes);
  s += fmt::format("\nbits per weight: {:.3f} (quantizable weights, scales and zero points included)\n",
                   size.bits_per_weight());
  s += fmt::format("memory: {} as fp16 -> {} ({:.1f}% smaller, {:.2f}x){}\n", human_bytes(size.fp16_bytes),
                   human_bytes(size.quantized_bytes), 100 * reduction(size),
                   double(size.fp16_bytes) / size.quantized_bytes,
                   outcome.memory_target_met ? ", memory target met" : "");
  if (files.output_bytes)
    s += fmt::format("checkpoint file: {} -> {} ({:.1f}% smaller)\n", human_bytes(files.model_bytes),
                     human_bytes(files.output_bytes), 100.0 * (1.0 - double(files.output_bytes) / files.model_bytes));
  if (outcome.heldout) {
    const EvalResult& r = *outcome.heldout;
    s += fmt::format("held-out ({} tokens): perplexity {:.4f} -> {:.4f} ({:+.2f}%), KL mean {:.5f} (p99 {:.4f}), same top {:.2f}%\n",
                     r.tokens, r.reference_ppl->value, r.ppl.value, 100 * ppl_increase(r), r.kl->mean.value,
                     r.kl->percentiles.size() > 1 ? r.kl->percentiles[1] : 0.0, 100 * r.kl->same_top_rate);
  }
  std::vector<std::string> unquantized;
  for (const WeightInfo& w : model.weights())
    if (!outcome.weights.count(w.name)) unquantized.push_back(w.name);
  if (!unquantized.empty())
    s += fmt::format("kept in floating point: {} of {} quantizable weights ({})\n", unquantized.size(),
                     model.weights().size(), fmt::join(unquantized, ", "));
  int64_t upgrades = 0, downgrades = 0, undone = 0;
  for (const ValidationStep& v : outcome.validation_steps) {
    upgrades += v.kept && v.extra_bits > 0;
    downgrades += v.kept && v.extra_bits < 0;
    undone += !v.kept;
  }
  if (upgrades) s += fmt::format("validation upgraded {} unit(s) to meet the budget on held-out text\n", upgrades);
  if (downgrades || undone)
    s += fmt::format("validation downgraded {} unit(s) within the budget on held-out text ({} downgrade(s) undone)\n",
                     downgrades, undone);
  if (!outcome.search_measurement.empty()) {
    s += fmt::format("search ({}) measured {}: {} of {} blocks a whole-pass search computes", outcome.search_strategy,
                     outcome.search_measurement, outcome.search_blocks_run, outcome.search_blocks_whole);
    int64_t kept = 0;
    for (const Confirmation& c : outcome.search_confirmations) kept += c.kept;
    if (!outcome.search_confirmations.empty())
      s += fmt::format("; {} {}, {} within budget", outcome.search_confirmations.size(),
                       outcome.search_curves.empty() ? "confirmations" : "whole-plan measurements", kept);
    s += fmt::format("; {} candidates quantized", outcome.search_candidates_quantized);
    if (outcome.search_candidates_read_back)
      s += fmt::format(", {} read back from the spill file", outcome.search_candidates_read_back);
    if (outcome.search_candidates_screened)
      s += fmt::format(", {} not measured (off the hull of GPTQ's own error)", outcome.search_candidates_screened);
    s += "\n";
  }
  s += "\nphase          passes   seconds   CPU s  s/pass\n";
  for (const PhaseTiming& p : outcome.phases)
    s += fmt::format("{:<12} {:>8} {:>9.2f} {:>7.2f} {:>7.3f}\n", p.name, p.passes, p.seconds, p.cpu_seconds,
                     p.passes ? p.seconds / p.passes : 0.0);
  s += fmt::format("total {:.1f} s\n", outcome.seconds);
  for (const std::string& m : outcome.messages) s += "note: " + m + "\n";
  return s;
}

std::string bits_per_block_svg(const QuantizableModel& model, const QuantizeOutcome& outcome,
                               const ReportFiles& files) {
  BarChart chart;
  chart.title = "Quantizable parameters per block by precision level";
  chart.notes = run_notes(outcome, files);
  chart.value_label = "parameters";
  chart.horizontal = false;
  chart.stacked = true;
  chart.value_labels = false;
  std::map<std::string, size_t> column;
  for (const WeightInfo& w : model.weights()) {
    const std::string block = w.block.empty() ? "other" : w.block;
    if (column.emplace(block, chart.categories.size()).second) chart.categories.push_back(block);
  }
  for (const LevelShare& l : level_distribution(model, outcome)) {
    BarSeries series{quant_level_name(l.level), std::vector<double>(chart.categories.size(), 0.0), level_color(l.level)};
    for (const WeightInfo& w : model.weights()) {
      auto it = outcome.weights.find(w.name);
      if (it != outcome.weights.end() && it->second.spec.level == l.level)
        series.values[column.at(w.block.empty() ? "other" : w.block)] += double(w.numel());
    }
    chart.series.push_back(series);
  }
  return render_bar_chart(chart);
}

std::string level_distribution_svg(const QuantizableModel& model, const QuantizeOutcome& outcome,
                                   const ReportFiles& files) {
  BarChart chart;
  chart.title = fmt::format("Precision levels ({:.3f} bits per weight)", outcome.size.bits_per_weight());
  chart.notes = run_notes(outcome, files);
  chart.value_label = "% of quantizable parameters";
  BarSeries series{"parameters", {}, ""};
  for (const LevelShare& l : level_distribution(model, outcome)) {
    chart.categories.push_back(quant_level_name(l.level));
    series.values.push_back(100.0 * double(l.parameters) / double(outcome.size.weights));
    chart.category_colors.push_back(level_color(l.level));
  }
  chart.series.push_back(series);
  return render_bar_chart(chart);
}

std::string weight_formats_svg(const QuantizableModel& model, const QuantizeOutcome& outcome,
                               const ReportFiles& files) {
  BarChart chart;
  chart.title = "Chosen format per weight (bits per weight with scales and zero points), by block";
  chart.notes = run_notes(outcome, files);
  chart.value_label = "bits per weight";
  BarSeries bits{"bits per weight", {}, ""};
  std::vector<std::string> kept;
  std::set<QuantLevel> levels;
  // Block by block, then the weights outside every block ("other").
  std::vector<const WeightInfo*> order;
  std::set<const WeightInfo*> placed;
  for (const BlockInfo& b : model.blocks())
    for (size_t i : b.weights) order.push_back(&model.weights()[i]), placed.insert(order.back());
  for (const WeightInfo& w : model.weights())
    if (!placed.count(&w)) order.push_back(&w);
  for (const WeightInfo* wp : order) {
    const WeightInfo& w = *wp;
    auto it = outcome.weights.find(w.name);
    if (it == outcome.weights.end()) {
      kept.push_back(w.name);
      continue;
    }
    const QuantSpec& spec = it->second.spec;
    const std::string block = w.block.empty() ? "other" : w.block;
    const std::string local = w.block.empty() ? w.name : w.name.substr(w.block.size() + 1);
    chart.categories.push_back(fmt::format("{} | {}: {}", block, local, spec.name()));
    bits.values.push_back(spec.bits_per_weight(w.out_features, w.in_features));
    chart.category_colors.push_back(level_color(spec.level));
    levels.insert(spec.level);
  }
  if (chart.categories.empty()) {  // e.g. a budget not met: the report still has its charts
    chart.categories.push_back("(no weight quantized)");
    bits.values.push_back(0);
    chart.category_colors.push_back(level_color(QuantLevel::kFp32));
  }
  if (!kept.empty())
    chart.notes.push_back(fmt::format("kept in floating point (not drawn): {}", fmt::join(kept, ", ")));
  chart.series.push_back(bits);
  for (QuantLevel level : kQuantLevels)
    if (levels.count(level)) chart.legend.emplace_back(quant_level_name(level), level_color(level));
  return render_bar_chart(chart);
}

}  // namespace gradq
