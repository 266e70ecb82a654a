// gradq analyze: per-layer and per-block importance (csrc/importance/analyzer.h).

#include <unistd.h>

#include <cmath>
#include <iostream>

#include "cli.h"
#include "common/error.h"
#include "common/files.h"
#include "data/dataset.h"
#include "importance/analyzer.h"
#include "model/model_loader.h"
#include "report/svg_chart.h"
#include "tokenizer/tokenizer.h"

namespace gradq::cli {
namespace {

std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  if (s < 60) return fmt::format("{:.1f} s", s);
  return fmt::format("{}m{:02d}s", static_cast<int64_t>(s) / 60, static_cast<int>(std::fmod(s, 60.0)));
}

// A progress bar on stderr: redrawn in place on a terminal, one line per tenth of the work otherwise
// (so logs stay short).
class ProgressBar {
 public:
  ProgressBar() : tty_(::isatty(STDERR_FILENO) == 1) {}
  void update(const AnalysisProgress& p) {
    const double frac = p.total ? static_cast<double>(p.done) / static_cast<double>(p.total) : 1.0;
    const double eta = p.done ? p.seconds / static_cast<double>(p.done) * static_cast<double>(p.total - p.done) : NAN;
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(frac * kWidth);
    const std::string line = fmt::format("[{}{}] {:>4}/{} {:>3.0f}%  {} elapsed, ETA {}", std::string(filled, '#'),
                                         std::string(kWidth - filled, '.'), p.done, p.total, 100 * frac,
                                         duration(p.seconds), duration(eta));
    if (tty_) {
      std::string what = p.what.size() > 40 ? p.what.substr(0, 37) + "..." : p.what;
      std::cerr << "\r" << line << "  " << fmt::format("{:<40}", what) << (p.done == p.total ? "\n" : "") << std::flush;
      return;
    }
    const int64_t tenth = p.total ? p.done * 10 / p.total : 10;
    if (tenth > last_tenth_ || p.done == p.total) {
      last_tenth_ = tenth;
      std::cerr << line << "\n";
    }
  }

 private:
  bool tty_;
  int64_t last_tenth_ = 0;
};

}  // namespace

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
      ("batch", "windows per forward pass", cxxopts::value<int64_t>()->default_value("16"))
      ("measure", "how probes of units in blocks are measured: local (block alone, its output error scaled by a "
                  "factor calibrated per block against an exact probe; cost per unit independent of depth), exact "
                  "(blocks from the unit's on, from cached block inputs) or whole (every probe a whole forward pass)",
       cxxopts::value<std::string>()->default_value("local"))
      ("no-static", "skip the static signals (activation capture and gradient passes)");
  add_common_options(options);
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;
  GRADQ_CHECK(args.count("output"), "-o/--output is required (the analysis JSON)");
  const std::string output = args["output"].as<std::string>();
  const std::string config_path = args["config"].as<std::string>();
  const std::vector<std::string> inputs = {args["model"].as<std::string>(), args["tokenizer"].as<std::string>(),
                                           args["text"].as<std::string>(), config_path};
  check_output_is_not_input(output, inputs);
  if (args.count("chart")) {
    check_output_is_not_input(args["chart"].as<std::string>(), inputs);
    check_output_is_not_input(args["chart"].as<std::string>(), {output});
  }

  AnalyzerOptions opt;
  opt.config = load_importance_config(config_path);
  opt.seed = args["seed"].as<uint64_t>();
  opt.noise_alpha = args["alpha"].as<double>();
  opt.group_size = args["group-size"].as<int64_t>();
  opt.subsets = args["subsets"].as<int64_t>();
  opt.batch = args["batch"].as<int64_t>();
  opt.static_signals = !args.count("no-static");
  opt.measurement = parse_measurement(args["measure"].as<std::string>());
  const int64_t calib_windows = args["calib-windows"].as<int64_t>();
  GRADQ_CHECK(calib_windows >= 1, "--calib-windows must be at least 1, got {}", calib_windows);

  auto tokenizer = Tokenizer::load_sentencepiece(args["tokenizer"].as<std::string>());
  CausalLM model = load_model(args["model"].as<std::string>());
  check_tokenizer_fits_model(tokenizer->vocab_size(), model.vocab_size());
  const TokenSplit split =
      split_tokens(tokenizer->encode(read_text_file(args["text"].as<std::string>())), args["calib-fraction"].as<double>());
  WindowSpec spec;
  spec.ctx = args["ctx"].as<int64_t>();
  spec.stride = spec.ctx;
  spec.bos_id = tokenizer->bos_id();
  spec.max_windows = calib_windows;
  Windows windows = make_windows(split.calibration, spec);
  GRADQ_CHECK(windows.size() == calib_windows,
              "the calibration split ({} tokens) holds only {} windows of {} tokens, --calib-windows asks for {}",
              split.calibration.size(), windows.size(), spec.ctx, calib_windows);

  ProgressBar bar;
  opt.on_progress = [&](const AnalysisProgress& p) { bar.update(p); };
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
  analysis.inputs = {{"model", inputs[0]}, {"tokenizer", inputs[1]}, {"text", inputs[2]}, {"config", config_path}};

  std::cout << format_analysis_table(analysis) << std::flush;
  save_analysis(output, analysis);
  std::cerr << "wrote " << output << "\n";
  if (args.count("chart")) {
    write_svg(args["chart"].as<std::string>(), analysis_chart_svg(analysis));
    std::cerr << "wrote " << args["chart"].as<std::string>() << "\n";
  }
  return 0;
}

}  // namespace gradq::cli
