// gradq analyze: per-layer and per-block importance (csrc/importance/analyzer.h).

#include <iostream>

#include "cli.h"
#include "common/error.h"
#include "common/files.h"
#include "data/dataset.h"
#include "importance/analyzer.h"
#include "model/context_check.h"
#include "model/model_loader.h"
#include "report/analysis_chart.h"
#include "report/svg_chart.h"
#include "tokenizer/tokenizer.h"

namespace gradq::cli {

int cmd_analyze(int argc, char** argv) {
  cxxopts::Options options(
      "gradq analyze",
      "Importance of every quantizable layer and block: noise, RTN (8/4/2-bit), disable and 4->8-bit upgrade probes, "
      "each one pass over the calibration windows measured by KL against the full-precision model, plus static "
      "signals (weight magnitude, activation second moment, gradient magnitude, Fisher |grad x int4 error|). Prints "
      "the ranked units, the stability of the ranking across calibration subsets and the score distribution; writes "
      "JSON (read by the quantizer) and optionally an SVG bar chart. Calibration: the first --calib-fraction of the "
      "text's tokens, windows of --ctx tokens starting with BOS.");
  options.add_options()
      ("model", "TorchScript model, or a llama2.c .bin", cxxopts::value<std::string>()->default_value(default_model_path()))
      ("tokenizer", "SentencePiece model", cxxopts::value<std::string>()->default_value(default_tokenizer_path()))
      ("text", "UTF-8 text file (its first --calib-fraction is the calibration set)", cxxopts::value<std::string>()->default_value(default_text_path()))
      ("o,output", "analysis JSON to write (atomically; never an input)", cxxopts::value<std::string>())
      ("chart", "also write an SVG bar chart of per-layer importance", cxxopts::value<std::string>())
      ("config", "combined-score weights and normalization (JSON)", cxxopts::value<std::string>()->default_value(default_importance_config_path()))
      ("seed", "noise seed (same seed, same results)", cxxopts::value<uint64_t>()->default_value("0"))
      ("alpha", "noise probe: sigma = alpha * std(W)", cxxopts::value<double>()->default_value("0.1"))
      ("group-size", "group size of the RTN/upgrade quantization (16, 32, 64, 128; 0 = whole row)", cxxopts::value<int64_t>()->default_value("128"))
      ("subsets", "K calibration subsets for the stability analysis", cxxopts::value<int64_t>()->default_value("4"))
      ("calib-windows", "calibration windows (the first N of the calibration split)", cxxopts::value<int64_t>()->default_value("16"))
      ("ctx", "window length in tokens", cxxopts::value<int64_t>()->default_value("128"))
      ("calib-fraction", "fraction of the text's tokens that is the calibration set", cxxopts::value<double>()->default_value("0.1"))
      ("batch", "windows per forward pass (each holds its ctx x vocab float32 logits several times over: more "
                "windows may be faster on a GPU, on a CPU they only add memory)",
       cxxopts::value<int64_t>()->default_value(std::to_string(AnalyzerOptions{}.batch)))
      ("measure", "how probes of units in blocks are measured: local (block alone, its output error scaled by a "
                  "factor calibrated per block against an exact probe; cost per unit independent of depth), exact "
                  "(blocks from the unit's on, from cached block inputs) or whole (every probe a whole forward pass)",
       cxxopts::value<std::string>()->default_value("local"))
      ("no-static", "skip the static signals (activation capture and gradient passes)");
  add_token_options(options);
  add_reference_storage_option(options);
  add_device_option(options);
  add_common_options(options);
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;
  GRADQ_CHECK(args.count("output"), "-o/--output is required (the analysis JSON)");
  const std::string output = args["output"].as<std::string>();
  const std::string config_path = args["config"].as<std::string>();
  check_token_options(args);
  std::vector<std::string> inputs = {args["model"].as<std::string>(), config_path};
  for (const auto& [role, path] : text_inputs(args)) inputs.push_back(path);
  std::vector<std::string> outputs = {output};
  if (args.count("chart")) outputs.push_back(args["chart"].as<std::string>());

  AnalyzerOptions opt;
  opt.config = load_importance_config(config_path);
  opt.seed = args["seed"].as<uint64_t>();
  opt.noise_alpha = args["alpha"].as<double>();
  opt.group_size = args["group-size"].as<int64_t>();
  opt.subsets = args["subsets"].as<int64_t>();
  opt.batch = args["batch"].as<int64_t>();
  opt.static_signals = !args.count("no-static");
  opt.measurement = parse_measurement(args["measure"].as<std::string>());
  opt.reference_storage = read_reference_storage_option(args);
  const int64_t calib_windows = args["calib-windows"].as<int64_t>();
  GRADQ_CHECK(calib_windows >= opt.subsets,
              "--calib-windows must be at least --subsets ({}): each subset needs a window; got {}", opt.subsets,
              calib_windows);
  GRADQ_CHECK(args["ctx"].as<int64_t>() >= 2, "--ctx must be at least 2 tokens, got {}", args["ctx"].as<int64_t>());
  OutputSet output_set(outputs, inputs);

  const TokenStream stream = read_token_stream(args);
  CausalLM model = load_model(args["model"].as<std::string>(), read_adapter_options(args));
  stream.check_fits(model.vocab_size());
  check_context(model, args["ctx"].as<int64_t>(), "--ctx");
  const TokenSplit split = split_tokens(stream.ids, args["calib-fraction"].as<double>());
  WindowSpec spec;
  spec.ctx = args["ctx"].as<int64_t>();
  spec.stride = spec.ctx;
  spec.bos_id = stream.bos_id;
  spec.max_windows = calib_windows;
  Windows windows = make_windows(split.calibration, spec);
  GRADQ_CHECK(windows.size() == calib_windows,
              "the calibration split ({} tokens) holds only {} windows of {} tokens, --calib-windows asks for {}",
              split.calibration.size(), windows.size(), spec.ctx, calib_windows);

  ProgressDisplay display;
  opt.on_progress = [&](const AnalysisProgress& p) { display.update("analysis", p.done, p.total, p.what); };
  ImportanceAnalyzer analyzer(model, windows, opt);
  int64_t layers = 0;
  for (const auto& u : analyzer.units()) layers += u.kind == UnitKind::kLayer;
  std::cerr << fmt::format("analyzing {} units ({} layers, {} blocks): {} probes, {} passes over {} calibration windows "
                           "of {} tokens ({} subsets)\n",
                           analyzer.units().size(), layers, analyzer.units().size() - layers, analyzer.planned_probes(),
                           analyzer.planned_passes(), windows.size(), spec.ctx, opt.subsets);
  if (opt.measurement != Measurement::kWhole && !model.stages())
    std::cerr << "the model is measured whole: " << model.stages_unavailable_reason() << "\n";
  ImportanceAnalysis analysis = analyzer.run();
  display.finish();
  analysis.inputs = text_inputs(args);
  analysis.inputs["model"] = inputs[0];
  analysis.inputs["config"] = config_path;

  std::cout << format_analysis_table(analysis) << std::flush;
  save_analysis(output, analysis);
  if (args.count("chart")) write_svg(args["chart"].as<std::string>(), analysis_chart_svg(analysis));
  print_written(output_set.commit());
  return 0;
}

}  // namespace gradq::cli
