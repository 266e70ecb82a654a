// gradq quantize: the budgeted search (default), a uniform format (--uniform), a saved plan
// (--plan) or the dynamic policy (--dynamic-policy). All of it is GradualQuantizer; this file
// parses options, shows progress and writes the outputs.

#include <fmt/ranges.h>

#include <filesystem>
#include <iostream>

#include "cli.h"
#include "common/error.h"
#include "common/files.h"
#include "orchestrator/gradual_quantizer.h"
#include "report/quantize_report.h"
#include "report/svg_chart.h"

namespace gradq::cli {
namespace {

std::string sibling(const std::string& json_path, const std::string& suffix) {
  std::string base = json_path;
  if (base.size() > 5 && base.compare(base.size() - 5, 5, ".json") == 0) base.resize(base.size() - 5);
  return base + suffix;
}

// A --plan must name every quantizable weight unless the user accepts leaving some in floating
// point: a plan cut short by an editor or written for another model should not pass quietly.
void check_plan_covers_model(const CausalLM& model, const Plan& plan, bool allow_partial) {
  const std::vector<std::string> missing = weights_outside_plan(model, plan);
  if (missing.empty()) return;
  const std::string listed = missing.size() <= 5 ? fmt::format("{}", fmt::join(missing, ", "))
                                                 : fmt::format("{}, ... ({} more)", fmt::join(missing.begin(), missing.begin() + 5, ", "), missing.size() - 5);
  GRADQ_CHECK(allow_partial,
              "the plan names {} of the model's {} quantizable weights; {} would stay in floating point ({}): give "
              "--allow-partial-plan to accept that",
              model.weights().size() - missing.size(), model.weights().size(), missing.size(), listed);
}

}  // namespace

int cmd_quantize(int argc, char** argv) {
  // The defaults the description names, from the one place that sets them.
  const SearchOptions defaults;
  const std::string widths = fmt::format("{}", fmt::join(defaults.bits, ", "));
  const std::string passes = fmt::format("{}", fmt::join(defaults.bits, " -> "));
  const std::string group_sizes = fmt::format("{}", fmt::join(defaults.group_sizes, ", "));
  cxxopts::Options options(
      "gradq quantize",
      std::string("Find the smallest mixed-precision plan within a quality budget and write the model as packed TorchScript "
      "(quantized linears call gradq::linear; load libgradq_ops to run it).\n\n"
      "Default (search, --search allocate): measure what each layer alone adds to the KL divergence at every "
      "candidate format (") + widths + " bits; group sizes " + group_sizes + "; GPTQ rounding), let an allocator pick the "
      "cheapest mix whose measured KL on the calibration windows meets the budget divided by --safety, then on "
      "held-out text upgrade layers while over the full budget and try downgrades while within it. "
      "--search progressive is the seed design: measure layer importance, then lower each layer through the --bits widths (" + passes + "), "
      "least important first, with group-size search and rollback; its held-out repair moves layers back and forth "
      "along the states the search took them through. Without a quality limit the budget is "
      "--max-ppl-increase 0.05.\n"
      "Other modes: --uniform SPEC (every weight in one format), --plan FILE (re-apply a saved plan), "
      "--dynamic-policy FILE (levels by importance share, no search).\n"
      "Exit codes: 0 done, 1 error, 2 the quality budget cannot be met (a report is still written).\n\n"
      "SPEC names: b<bits>g<group>[s][-f32]: bits 2, 3, 4, 5, 6 or 8; group 16, 32, 64, 128 or 'row'; 's' symmetric; "
      "'-f32' fp32 scales. Also fp16, bf16, fp32, prune.\n"
      "Text: the first --calib-fraction of its tokens is calibration (search), the rest held-out (validation).");
  options.add_options("budget")
      ("max-ppl-increase", "relative perplexity increase allowed on held-out text (0.05 = +5%)", cxxopts::value<double>())
      ("max-kl", "mean KL divergence allowed, nats per token", cxxopts::value<double>())
      ("target-memory-reduction", "stop once the quantizable weights are this much smaller than in fp16 (0.6 = 60%)", cxxopts::value<double>());
  options.add_options("mode")
      ("uniform", "every quantizable weight in this SPEC (no search)", cxxopts::value<std::string>())
      ("plan", "re-apply a plan JSON written by --save-plan (no search)", cxxopts::value<std::string>())
      ("dynamic-policy", "levels by importance share from this policy JSON (no search); see configs/policies/dynamic.json", cxxopts::value<std::string>())
      ("fit-on", "with a mode above: the block inputs each block's rounding is fitted on: quantized (what the earlier blocks, already quantized, pass on; GPTQ's sequential order) or original (the full-precision model's, as the search fits)", cxxopts::value<std::string>()->default_value(QuantizerOptions{}.sequential_fit ? "quantized" : "original"));
  add_search_options(options);
  add_input_options(options);
  options.add_options("files")
      ("o,output", "packed TorchScript output (written atomically; never an input)", cxxopts::value<std::string>())
      ("fake-quant", "also write a fake-quant TorchScript (dequantized weights in the original graph; runs without gradq)", cxxopts::value<std::string>())
      ("save-plan", "write the plan JSON here", cxxopts::value<std::string>())
      ("report", "write the JSON report here, and beside it the charts <name>-blocks.svg, <name>-levels.svg and <name>-formats.svg", cxxopts::value<std::string>())
      ("allow-partial-plan", "with --plan: accept a plan that leaves some quantizable weights in floating point (the summary names them)");
  add_common_options(options);
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;
  GRADQ_CHECK(args.count("uniform") + args.count("plan") + args.count("dynamic-policy") <= 1,
              "give at most one of --uniform, --plan and --dynamic-policy");
  const std::string model_path = args["model"].as<std::string>();
  std::vector<std::string> inputs = input_paths(args);
  for (const char* in : {"plan", "dynamic-policy"})
    if (args.count(in)) inputs.push_back(args[in].as<std::string>());
  GRADQ_CHECK(args.count("output"), "-o/--output is required");

  // Everything that can be checked without the model is checked here, before the slow loading.
  QuantizerOptions q;
  if (args.count("max-ppl-increase")) q.budget.max_ppl_increase = args["max-ppl-increase"].as<double>();
  if (args.count("max-kl")) q.budget.max_kl = args["max-kl"].as<double>();
  if (args.count("target-memory-reduction")) q.budget.target_memory_reduction = args["target-memory-reduction"].as<double>();
  const bool searching = !args.count("uniform") && !args.count("plan") && !args.count("dynamic-policy");
  if (searching && !q.budget.max_ppl_increase && !q.budget.max_kl) q.budget.max_ppl_increase = 0.05;
  check_input_options(args);
  read_search_options(args, q);
  if (searching || q.budget.max_ppl_increase || q.budget.max_kl) q.budget.validate();
  if (searching) q.search.validate();
  GRADQ_CHECK(!args.count("allow-partial-plan") || args.count("plan"), "--allow-partial-plan applies only to --plan");
  const std::string fit_on = args["fit-on"].as<std::string>();
  GRADQ_CHECK(fit_on == "quantized" || fit_on == "original", "--fit-on: expected quantized or original, got '{}'", fit_on);
  GRADQ_CHECK(!searching || args.count("fit-on") == 0,
              "--fit-on applies to --uniform, --plan and --dynamic-policy (the search fits on the original inputs)");
  q.sequential_fit = fit_on == "quantized";
  if (args.count("plan")) q.plan = Plan::load(args["plan"].as<std::string>());
  if (args.count("dynamic-policy")) q.dynamic = DynamicPolicy::load(args["dynamic-policy"].as<std::string>());
  // Only the progressive search and the dynamic policy rank layers by importance.
  const bool analyzing = (searching && q.search.strategy == SearchStrategy::kProgressive) || q.dynamic;
  if (searching && !analyzing && q.analysis_path)
    std::cerr << "gradq quantize: note: --search allocate reads no importance analysis, so --analysis "
              << *q.analysis_path << " is not used (--search progressive uses it)\n";
  const int64_t calib_windows = args["calib-windows"].as<int64_t>();
  if (analyzing && !q.analysis_path)
    GRADQ_CHECK(calib_windows == 0 || calib_windows >= q.analyzer.subsets,
                "--calib-windows must be at least {} (the importance analysis compares {} subsets of them) or 0 for "
                "all, got {}; or give a saved analysis with --analysis",
                q.analyzer.subsets, q.analyzer.subsets, calib_windows);

  std::optional<QuantSpec> uniform;  // parsed before the slow loading, so a typo fails at once
  if (args.count("uniform")) uniform = parse_quant_spec(args["uniform"].as<std::string>());

  std::vector<std::string> outputs;
  for (const char* out : {"output", "fake-quant", "save-plan", "report"})
    if (args.count(out)) outputs.push_back(args[out].as<std::string>());
  if (args.count("report")) {
    outputs.push_back(sibling(args["report"].as<std::string>(), "-blocks.svg"));
    outputs.push_back(sibling(args["report"].as<std::string>(), "-levels.svg"));
    outputs.push_back(sibling(args["report"].as<std::string>(), "-formats.svg"));
  }
  OutputSet output_set(outputs, inputs);

  auto [model, split] = load_inputs(args);
  q.search.fit = split.fit;
  if (uniform) q.plan = uniform_plan(model, *uniform, q.search.method);
  if (args.count("plan")) check_plan_covers_model(model, *q.plan, args.count("allow-partial-plan") > 0);
  std::cerr << "budget: " << (q.budget.describe().empty() ? "none" : q.budget.describe()) << "\n";

  ProgressDisplay display;
  q.on_progress = std::ref(display);
  GradualQuantizer quantizer(model, split.calibration, split.evaluation, q);
  const QuantizeOutcome outcome = quantizer.run();
  display.finish();

  const bool met = outcome.status == QuantizeStatus::kMet;
  ReportFiles files;
  files.model = model_path;
  files.model_bytes = static_cast<int64_t>(std::filesystem::file_size(model_path));
  files.budget = q.budget.describe();
  if (met) {
    files.output = args["output"].as<std::string>();
    export_outcome(model, outcome, files.output, args.count("fake-quant") ? args["fake-quant"].as<std::string>() : "");
    files.output_bytes = static_cast<int64_t>(std::filesystem::file_size(output_set.staged_path(files.output)));
    if (args.count("save-plan")) outcome.plan.save(args["save-plan"].as<std::string>());
  }
  std::cout << format_quantize_summary(model, outcome, files);
  if (args.count("report")) {
    const std::string report = args["report"].as<std::string>();
    write_file_atomically(report, quantize_report_json(model, outcome, files));
    write_svg(sibling(report, "-blocks.svg"), bits_per_block_svg(model, outcome, files));
    write_svg(sibling(report, "-levels.svg"), level_distribution_svg(model, outcome, files));
    write_svg(sibling(report, "-formats.svg"), weight_formats_svg(model, outcome, files));
  }
  print_written(output_set.commit());
  if (!met) {
    std::cerr << "gradq quantize: budget not met: " << outcome.messages.front() << "\n";
    return kExitBudgetUnmet;
  }
  return 0;
}

}  // namespace gradq::cli
