// gradq quantize: the budgeted search (default), a uniform format (--uniform), a saved plan
// (--plan) or the dynamic policy (--dynamic-policy). All of it is GradualQuantizer; this file
// parses options, shows progress and writes the outputs.

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "cli.h"
#include "common/error.h"
#include "common/files.h"
#include "common/runtime.h"
#include "data/dataset.h"
#include "model/model_loader.h"
#include "orchestrator/gradual_quantizer.h"
#include "report/quantize_report.h"
#include "report/svg_chart.h"
#include "tokenizer/tokenizer.h"

namespace gradq::cli {
namespace {

template <typename T>
std::vector<T> parse_list(const std::string& text, const char* flag) {
  std::vector<T> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t used = 0;
      out.push_back(static_cast<T>(std::stoll(item, &used)));
      GRADQ_CHECK(used == item.size(), "");
    } catch (const std::exception&) {
      throw Error(fmt::format("{} expects comma-separated integers, got '{}'", flag, text));
    }
  }
  return out;
}

// One progress line per event; on a terminal the line is rewritten in place.
class ProgressDisplay {
 public:
  ProgressDisplay() : tty_(::isatty(STDERR_FILENO) != 0), start_(std::chrono::steady_clock::now()) {}
  /// Ends an in-place line so that what follows starts on its own line.
  void finish() { end_line(); }
  void operator()(const std::string& phase, int64_t done, int64_t total, const std::string& detail) {
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    std::string line = fmt::format("[{:6.1f}s] {}", t, phase);
    if (total > 0) line += fmt::format(" {}/{}", done, total);
    if (!detail.empty()) line += ": " + detail;
    if (tty_) {
      if (phase != phase_) end_line();
      std::cerr << "\r\033[K" << line.substr(0, 160) << std::flush;
      open_ = true;
    } else if (phase != phase_ || detail.find("kept") != std::string::npos || phase == "validation") {
      std::cerr << line << "\n";
    }
    phase_ = phase;
  }

 private:
  void end_line() {
    if (open_) std::cerr << "\n";
    open_ = false;
  }
  bool tty_;
  bool open_ = false;
  std::string phase_;
  std::chrono::steady_clock::time_point start_;
};

std::string sibling(const std::string& json_path, const std::string& suffix) {
  std::string base = json_path;
  if (base.size() > 5 && base.compare(base.size() - 5, 5, ".json") == 0) base.resize(base.size() - 5);
  return base + suffix;
}

}  // namespace

int cmd_quantize(int argc, char** argv) {
  cxxopts::Options options(
      "gradq quantize",
      "Find the smallest mixed-precision plan within a quality budget and write the model as packed TorchScript "
      "(quantized linears call gradq::linear; load libgradq_ops to run it).\n\n"
      "Default (search): measure layer importance, then lower each layer 8 -> 4 -> 2 bits, least important first, "
      "trying group sizes 128 -> 64 -> 32 -> 16, keeping a step only while the calibration windows stay within the "
      "budget divided by --safety; then validate on held-out text against the full budget, upgrading layers until "
      "it holds. Without a quality limit the budget is --max-ppl-increase 0.05.\n"
      "Other modes: --uniform SPEC (every weight in one format), --plan FILE (re-apply a saved plan), "
      "--dynamic-policy FILE (levels by importance share, no search).\n"
      "Exit codes: 0 done, 1 error, 2 the quality budget cannot be met (a report is still written).\n\n"
      "SPEC names: b<bits>g<group>[s][-f32]: bits 2, 3, 4 or 8; group 16, 32, 64, 128 or 'row'; 's' symmetric; "
      "'-f32' fp32 scales. Also fp16, bf16, fp32, prune.\n"
      "Text: the first --calib-fraction of its tokens is calibration (search), the rest held-out (validation).");
  options.add_options("budget")
      ("max-ppl-increase", "relative perplexity increase allowed on held-out text (0.05 = +5%)", cxxopts::value<double>())
      ("max-kl", "mean KL divergence allowed, nats per token", cxxopts::value<double>())
      ("target-memory-reduction", "stop once the quantizable weights are this much smaller than in fp16 (0.6 = 60%)", cxxopts::value<double>())
      ("safety", "the search uses the quality limits divided by this", cxxopts::value<double>()->default_value("2"));
  options.add_options("mode")
      ("uniform", "every quantizable weight in this SPEC (no search)", cxxopts::value<std::string>())
      ("plan", "re-apply a plan JSON written by --save-plan (no search)", cxxopts::value<std::string>())
      ("dynamic-policy", "levels by importance share from this policy JSON (no search); see configs/policies/dynamic.json", cxxopts::value<std::string>())
      ("analysis", "importance from this `gradq analyze` JSON instead of a fresh analysis", cxxopts::value<std::string>())
      ("policy", "constraint policy JSON: allowed levels by weight name (configs/policies/)", cxxopts::value<std::string>());
  options.add_options("search")
      ("bits", "bit widths to try, high to low (add 3 for 3-bit)", cxxopts::value<std::string>()->default_value("8,4,2"))
      ("group-sizes", "group sizes to try, cheapest first", cxxopts::value<std::string>()->default_value("128,64,32,16"))
      ("method", "rounding: rtn (round to nearest) or clip (activation-weighted clipping search)", cxxopts::value<std::string>()->default_value("clip"))
      ("no-trained-fallback", "do not try trained rounding when plain rounding breaks the budget")
      ("trained-iterations", "signed-gradient steps of trained rounding", cxxopts::value<int>()->default_value("200"))
      ("allow-prune", "let the search remove a weight entirely after its lowest bit width")
      ("seed", "seed of the importance analysis' noise probes", cxxopts::value<uint64_t>()->default_value("0"));
  options.add_options("files")
      ("model", "TorchScript model, or a llama2.c .bin", cxxopts::value<std::string>()->default_value(default_model_path()))
      ("tokenizer", "SentencePiece model", cxxopts::value<std::string>()->default_value(default_tokenizer_path()))
      ("text", "UTF-8 text: calibration part first, held-out part after", cxxopts::value<std::string>()->default_value(default_text_path()))
      ("o,output", "packed TorchScript output (written atomically; never an input)", cxxopts::value<std::string>())
      ("fake-quant", "also write a fake-quant TorchScript (dequantized weights in the original graph; runs without gradq)", cxxopts::value<std::string>())
      ("save-plan", "write the plan JSON here", cxxopts::value<std::string>())
      ("report", "write the JSON report here, and beside it <name>-blocks.svg and <name>-levels.svg", cxxopts::value<std::string>())
      ("include", "regex: also quantize matching matrix weights (embeddings, the head); repeatable", cxxopts::value<std::vector<std::string>>())
      ("exclude", "regex: do not quantize matching weights; repeatable", cxxopts::value<std::vector<std::string>>());
  options.add_options("data")
      ("calib-fraction", "leading fraction of the text's tokens used for calibration", cxxopts::value<double>()->default_value("0.1"))
      ("ctx", "window length in tokens", cxxopts::value<int64_t>()->default_value("256"))
      ("calib-windows", "calibration windows (0 = all)", cxxopts::value<int64_t>()->default_value("8"))
      ("eval-windows", "held-out evaluation windows (0 = all)", cxxopts::value<int64_t>()->default_value("64"))
      ("batch", "windows per forward pass", cxxopts::value<int64_t>()->default_value("8"));
  add_common_options(options);
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;
  GRADQ_CHECK(args.count("uniform") + args.count("plan") + args.count("dynamic-policy") <= 1,
              "give at most one of --uniform, --plan and --dynamic-policy");
  const std::string model_path = args["model"].as<std::string>();
  std::vector<std::string> inputs = {model_path, args["tokenizer"].as<std::string>(), args["text"].as<std::string>()};
  for (const char* in : {"plan", "dynamic-policy", "analysis", "policy"})
    if (args.count(in)) inputs.push_back(args[in].as<std::string>());
  GRADQ_CHECK(args.count("output"), "-o/--output is required");
  std::vector<std::string> outputs;
  for (const char* out : {"output", "fake-quant", "save-plan", "report"})
    if (args.count(out)) outputs.push_back(args[out].as<std::string>());
  if (args.count("report")) {
    outputs.push_back(sibling(args["report"].as<std::string>(), "-blocks.svg"));
    outputs.push_back(sibling(args["report"].as<std::string>(), "-levels.svg"));
  }
  for (const std::string& out : outputs) check_output_is_not_input(out, inputs);

  QuantizerOptions q;
  if (args.count("max-ppl-increase")) q.budget.max_ppl_increase = args["max-ppl-increase"].as<double>();
  if (args.count("max-kl")) q.budget.max_kl = args["max-kl"].as<double>();
  if (args.count("target-memory-reduction")) q.budget.target_memory_reduction = args["target-memory-reduction"].as<double>();
  q.budget.safety = args["safety"].as<double>();
  const bool searching = !args.count("uniform") && !args.count("plan") && !args.count("dynamic-policy");
  if (searching && !q.budget.max_ppl_increase && !q.budget.max_kl) q.budget.max_ppl_increase = 0.05;
  q.batch = args["batch"].as<int64_t>();
  q.search.bits = parse_list<int>(args["bits"].as<std::string>(), "--bits");
  q.search.group_sizes = parse_list<int64_t>(args["group-sizes"].as<std::string>(), "--group-sizes");
  const std::string method = args["method"].as<std::string>();
  GRADQ_CHECK(method == "rtn" || method == "clip", "--method must be rtn or clip, got '{}'", method);
  q.search.method = parse_rounding_method(method);
  q.search.trained_fallback = !args.count("no-trained-fallback");
  q.search.trained.iterations = args["trained-iterations"].as<int>();
  q.search.allow_prune = args.count("allow-prune") > 0;
  q.analyzer.seed = args["seed"].as<uint64_t>();
  if (args.count("policy")) q.policy = PrecisionPolicy::load(args["policy"].as<std::string>());
  if (args.count("analysis")) q.analysis_path = args["analysis"].as<std::string>();
  if (args.count("plan")) q.plan = Plan::load(args["plan"].as<std::string>());
  if (args.count("dynamic-policy")) q.dynamic = DynamicPolicy::load(args["dynamic-policy"].as<std::string>());

  AdapterOptions adapter;
  if (args.count("include")) adapter.include = args["include"].as<std::vector<std::string>>();
  if (args.count("exclude")) adapter.exclude = args["exclude"].as<std::vector<std::string>>();
  auto tokenizer = Tokenizer::load_sentencepiece(args["tokenizer"].as<std::string>());
  CausalLM model = load_model(model_path, adapter);
  check_tokenizer_fits_model(tokenizer->vocab_size(), model.vocab_size());
  if (args.count("uniform"))
    q.plan = uniform_plan(model, parse_quant_spec(args["uniform"].as<std::string>()), q.search.method);
  DataOptions data;
  data.calib_fraction = args["calib-fraction"].as<double>();
  data.ctx = args["ctx"].as<int64_t>();
  data.calib_windows = args["calib-windows"].as<int64_t>();
  data.eval_windows = args["eval-windows"].as<int64_t>();
  const DataSplit split = make_data_split(tokenizer->encode(read_text_file(args["text"].as<std::string>())),
                                          tokenizer->bos_id(), data);
  std::cerr << fmt::format("{} quantizable weights; {} calibration and {} held-out windows of {} tokens; budget: {}\n",
                           model.weights().size(), split.calibration.size(), split.evaluation.size(), data.ctx,
                           q.budget.describe().empty() ? "none" : q.budget.describe());

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
    files.output_bytes = static_cast<int64_t>(std::filesystem::file_size(files.output));
    if (args.count("save-plan")) outcome.plan.save(args["save-plan"].as<std::string>());
  }
  std::cout << format_quantize_summary(model, outcome, files);
  if (args.count("report")) {
    const std::string report = args["report"].as<std::string>();
    write_file_atomically(report, quantize_report_json(model, outcome, files));
    write_svg(sibling(report, "-blocks.svg"), bits_per_block_svg(model, outcome));
    write_svg(sibling(report, "-levels.svg"), level_distribution_svg(model, outcome));
  }
  if (!met) {
    std::cerr << "gradq quantize: budget not met: " << outcome.messages.front() << "\n";
    return kExitBudgetUnmet;
  }
  std::cout << "wrote " << files.output << "\n";
  return 0;
}

}  // namespace gradq::cli
