// gradq sweep: gradq quantize over a list of perplexity budgets plus uniform baselines, with the
// shared work done once; resumable, shardable, and a regression gate for nightly runs.
// gradq sweep merge: combines shard directories into one report. All of it is sweep/sweep.h.

#include <fmt/ranges.h>  // fmt::join (in fmt/format.h before fmt 11)

#include <algorithm>
#include <filesystem>
#include <iostream>

#include "cli.h"
#include "common/error.h"
#include "common/files.h"
#include "sweep/sweep.h"

namespace gradq::cli {
namespace {

std::vector<double> parse_budgets(const std::string& text) {
  std::vector<double> out;
  for (const std::string& item : split_commas(text)) {
    if (item.empty()) continue;
    try {
      size_t used = 0;
      out.push_back(std::stod(item, &used));
      GRADQ_CHECK(used == item.size(), "");
    } catch (const std::exception&) {
      throw Error(fmt::format("--budgets expects comma-separated numbers (0.05 = +5% perplexity), got '{}'", text));
    }
  }
  return out;
}

std::vector<QuantSpec> parse_baselines(const std::string& text) {
  std::vector<QuantSpec> out;
  if (text == "none") return out;
  for (const std::string& item : split_commas(text))
    if (!item.empty()) out.push_back(parse_quant_spec(item));
  return out;
}

void add_gate_options(cxxopts::Options& options) {
  options.add_options("regression gate")
      ("compare-to", "a previous sweep.json: exit 3 when a point regressed (naming it and by how much)", cxxopts::value<std::string>())
      ("tolerance", "relative held-out perplexity a point may gain over the previous sweep before it counts as a regression", cxxopts::value<double>()->default_value("0.005"))
      ("bits-tolerance", "bits per weight a point may gain over the previous sweep", cxxopts::value<double>()->default_value("0.01"));
}

// Writes the report of a complete sweep, prints it, and applies the regression gate.
int finish(const cxxopts::ParseResult& args, const std::string& dir, const SweepResult& result,
           const std::optional<SweepResult>& previous, const char* command) {
  if (!result.complete()) {
    std::cout << fmt::format(
        "{} of {} points are in {}; not finished: {}.\nWhen every shard has finished, combine them with `gradq sweep "
        "merge --out DIR SHARD_DIR...`.\n",
        result.points.size(), result.points.size() + result.missing.size(), dir, fmt::join(result.missing, ", "));
    GRADQ_CHECK(!previous, "--compare-to needs the complete sweep: give it to `gradq sweep merge`");
    return 0;
  }
  OutputSet report({dir + "/sweep.json", dir + "/sweep.csv", dir + "/sweep.md", dir + "/pareto.svg"}, {});
  write_sweep_report(dir, result);
  const std::vector<std::string> written = report.commit();
  std::cout << sweep_markdown(result) << "\n";
  print_written(written);
  if (!previous) return 0;
  RegressionTolerance tolerance;
  tolerance.ppl = args["tolerance"].as<double>();
  tolerance.bits = args["bits-tolerance"].as<double>();
  GRADQ_CHECK(tolerance.ppl >= 0 && tolerance.bits >= 0, "tolerances must be >= 0, got --tolerance {} --bits-tolerance {}",
              tolerance.ppl, tolerance.bits);
  const std::vector<std::string> regressions = find_regressions(result, *previous, tolerance);
  if (regressions.empty()) {
    std::cout << fmt::format("no regression against {} ({} points compared)\n", args["compare-to"].as<std::string>(),
                             previous->points.size());
    return 0;
  }
  std::cerr << fmt::format("gradq {}: {} regression(s) against {}:\n", command, regressions.size(),
                           args["compare-to"].as<std::string>());
  for (const std::string& r : regressions) std::cerr << "  " << r << "\n";
  return kExitRegression;
}

std::optional<SweepResult> read_previous(const cxxopts::ParseResult& args) {
  if (!args.count("compare-to")) return std::nullopt;
  const std::string path = args["compare-to"].as<std::string>();
  try {
    return sweep_from_json(read_file(path));
  } catch (const Error& e) {
    throw Error(fmt::format("--compare-to {}: {}", path, e.what()));
  }
}

int cmd_sweep_merge(int argc, char** argv) {
  cxxopts::Options options("gradq sweep merge",
                           "Combine the directories of a sharded sweep (each written by `gradq sweep --shard i/n`) into "
                           "one directory with the full report.\n\nusage: gradq sweep merge --out DIR SHARD_DIR...");
  options.add_options("files")
      ("out", "directory of the merged sweep (may be one of the shard directories)", cxxopts::value<std::string>())
      ("shards", "shard directories", cxxopts::value<std::vector<std::string>>());
  add_gate_options(options);
  add_common_options(options);
  options.parse_positional({"shards"});
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;
  GRADQ_CHECK(args.count("out"), "--out is required");
  GRADQ_CHECK(args.count("shards"), "give the shard directories to merge");
  const std::optional<SweepResult> previous = read_previous(args);
  const std::string out = args["out"].as<std::string>();
  const SweepResult merged = merge_sweeps(args["shards"].as<std::vector<std::string>>(), out);
  return finish(args, out, merged, previous, "sweep merge");
}

}  // namespace

int cmd_sweep(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "merge") return cmd_sweep_merge(argc - 1, argv + 1);
  cxxopts::Options options(
      "gradq sweep",
      "Run `gradq quantize` for each perplexity budget in --budgets, once with --search and once with each other "
      "strategy in --compare-search, and evaluate each uniform format in --baselines, on the same model and text. "
      "The references, the importance analysis (when a progressive point needs it) and the quantized candidates "
      "are computed once and shared by every point.\n\n"
      "Everything goes to --out DIR: shared.json, analysis.json, points/<id>.json (+ .plan.json, which `gradq "
      "quantize --plan` re-applies), and once every point is there the report: sweep.json, sweep.csv, sweep.md and "
      "pareto.svg (bits per weight vs perplexity change).\n"
      "Resume: run the same command again; finished points are skipped. A directory refuses a run with another "
      "model, text or search configuration.\n"
      "Shards: --shard i/n runs every n-th point (a cron job, CI matrix or Slurm array per shard); shards may share "
      "DIR or write their own, combined by `gradq sweep merge --out DIR SHARD_DIR...`.\n"
      "Exit codes: 0 done (a budget that cannot be met is a result, not an error), 1 error, 3 regression against "
      "--compare-to.");
  options.add_options("sweep")
      ("out", "sweep directory (created; a re-run resumes it)", cxxopts::value<std::string>())
      ("budgets", "relative held-out perplexity increases, one point each", cxxopts::value<std::string>()->default_value("0.01,0.02,0.05,0.1,0.2"))
      ("compare-search", "search strategies whose budget points are added for comparison, comma-separated (points "
                         "budget-<b>-<strategy>; the one --search uses is not repeated; 'none' for none)",
       cxxopts::value<std::string>()->default_value("allocate,progressive"))
      ("baselines", "uniform formats to place beside them ('none' for none)", cxxopts::value<std::string>()->default_value("b8g128,b6g128,b5g128,b4g128,b4g32,b4g16,b3g32,b2g32"))
      ("shard", "run only shard i of n (1-based), e.g. 2/4", cxxopts::value<std::string>()->default_value("1/1"));
  add_gate_options(options);
  add_search_options(options);
  add_input_options(options);
  add_common_options(options);
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;
  GRADQ_CHECK(args.count("out"), "--out is required (the sweep directory)");
  const std::string dir = args["out"].as<std::string>();
  check_output_is_not_input(dir, input_paths(args));

  SweepOptions sweep;
  check_input_options(args);
  read_search_options(args, sweep.quantizer);
  std::vector<SearchStrategy> compare;
  for (const std::string& name : split_commas(args["compare-search"].as<std::string>())) {
    if (name == "none") continue;
    SearchStrategy s;
    try {
      s = parse_search_strategy(name);
    } catch (const Error& e) {
      throw Error(fmt::format("--compare-search: {}", e.what()));
    }
    if (s != sweep.quantizer.search.strategy && std::find(compare.begin(), compare.end(), s) == compare.end())
      compare.push_back(s);
  }
  sweep.points = sweep_points(parse_budgets(args["budgets"].as<std::string>()),
                              parse_baselines(args["baselines"].as<std::string>()), compare);
  sweep.shard = Shard::parse(args["shard"].as<std::string>());
  sweep.model_name = args["model"].as<std::string>();
  const std::optional<SweepResult> previous = read_previous(args);
  // The directory is created and proven writable now, not after the shared analysis; one this run
  // created is removed again if the run fails before a point is written.
  std::error_code ec;
  const bool created = !std::filesystem::exists(dir, ec);
  GRADQ_CHECK(std::filesystem::create_directory(dir, ec) || std::filesystem::is_directory(dir, ec),
              "cannot create the sweep directory '{}': {}", dir, ec ? ec.message() : "a file of that name exists");
  struct RemoveIfEmpty {
    std::string dir;
    bool armed;
    ~RemoveIfEmpty() {
      std::error_code ignored;
      if (armed && std::filesystem::is_empty(dir, ignored)) std::filesystem::remove(dir, ignored);
    }
  } cleanup{dir, created};
  check_output_location(dir + "/sweep.json");

  auto [model, split] = load_inputs(args);
  sweep.quantizer.search.fit = split.fit;
  ProgressDisplay display;
  sweep.on_progress = std::ref(display);
  SweepRunner runner(model, split.calibration, split.evaluation, sweep);
  const SweepResult result = runner.run(dir);
  display.finish();
  return finish(args, dir, result, previous, "sweep");
}

}  // namespace gradq::cli
