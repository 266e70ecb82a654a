#include <fmt/ranges.h>

#include <filesystem>
#include <iostream>
#include <sstream>

#include "cli.h"
#include "common/error.h"
#include "common/runtime.h"
#include "model/context_check.h"
#include "model/model_loader.h"
#include "tokenizer/tokenizer.h"

namespace gradq::cli {

void add_common_options(cxxopts::Options& options) {
  static const std::string threads_help =
      fmt::format("CPU threads for libtorch, 1 to {} ({} cores x {}); 0 = the cores the load average leaves idle",
                  kMaxThreadsPerCore * hardware_threads(), hardware_threads(), kMaxThreadsPerCore);
  options.add_options("general")
      ("threads", threads_help, cxxopts::value<int>()->default_value("0"))
      ("h,help", "show this help");
}

void add_device_option(cxxopts::Options& options, const std::string& group) {
  options.add_options(group)
      ("device", "where the model runs: cpu, cuda, cuda:N, or auto (the first GPU when this gradq's libtorch has "
                 "CUDA and sees one, else the CPU)", cxxopts::value<std::string>()->default_value("auto"));
}

AdapterOptions read_adapter_options(const cxxopts::ParseResult& args) {
  AdapterOptions adapter;
  try {
    adapter.device = parse_device(args["device"].as<std::string>());
  } catch (const Error& e) {
    throw Error(fmt::format("--device: {}", e.what()));
  }
  return adapter;
}

bool parse(cxxopts::Options& options, int argc, char** argv, cxxopts::ParseResult& out) {
  out = options.parse(argc, argv);
  if (out.count("help")) {
    std::cout << options.help() << std::endl;
    return false;
  }
  if (!out.unmatched().empty()) throw cxxopts::exceptions::invalid_option_syntax(out.unmatched().front());
  set_threads(out["threads"].as<int>());
  return true;
}

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) items.push_back(item);
  return items;
}

std::vector<int64_t> parse_int_list(const std::string& text, const char* flag) {
  std::vector<int64_t> out;
  for (const std::string& item : split_commas(text)) {
    try {
      size_t used = 0;
      out.push_back(std::stoll(item, &used));
      GRADQ_CHECK(used == item.size(), "");
    } catch (const std::exception&) {
      throw Error(fmt::format("{} expects comma-separated integers, got '{}'", flag, text));
    }
  }
  return out;
}

void add_search_options(cxxopts::Options& options) {
  options.add_options("search")
      ("search", "progressive (widths lowered one pass at a time, group-size search, rollback) or allocate (every weight measured alone at every candidate; an allocator picks the cheapest mix that meets the budget, corrected by whole-model measurements, then measured downgrades)", cxxopts::value<std::string>()->default_value(search_strategy_name(SearchOptions{}.strategy)))
      ("repair-confidence", "--search allocate: a downgrade on held-out text is kept only when the budget holds this many standard errors above its measurement (0: up to the limit, which is optimistic for other text)", cxxopts::value<double>()->default_value("1"))
      ("safety", "the search uses the quality limits divided by this (held-out validation then checks the full "
                 "limits); default 1 for --search allocate, 1.5 for progressive", cxxopts::value<double>())
      ("bits", "bit widths to try, high to low, from 8, 6, 5, 4, 3 and 2", cxxopts::value<std::string>()->default_value(fmt::to_string(fmt::join(SearchOptions{}.bits, ","))))
      ("group-sizes", "group sizes to try, cheapest first", cxxopts::value<std::string>()->default_value("128,64,32,16"))
      ("encodings", "side information of the candidates, each with every group size: asym (b-bit zero points), z8 (8-bit zero points), s (symmetric), k6, k8 (sub-scales; no CUDA kernel reads them)", cxxopts::value<std::string>()->default_value("asym,s"))
      ("method", "rounding: rtn (round to nearest), clip (activation-weighted clipping search), gptq (GPTQ with clipped static groups) or trained (learned rounding)", cxxopts::value<std::string>()->default_value(rounding_method_name(SearchOptions{}.method)))
      ("gptq-damp", "GPTQ's dampening, a fraction of the mean diagonal of the Hessian", cxxopts::value<double>()->default_value("0.01"))
      ("gptq-refit", "refit GPTQ's group scales by least squares to its codes (lower layer error and KL; under perplexity budgets not fewer bits on every model)")
      ("search-measure", "how candidates are measured on a model split into blocks: local (its block's output error times a per-block factor predicts the KL: one block per candidate, whatever the depth) or exact (every candidate from its block to the logits). Default: local for --search allocate (its curves; every plan is then measured whole), exact for progressive (whose steps are decided one by one; local ones are confirmed together by exact passes)", cxxopts::value<std::string>())
      ("no-trained-fallback", "do not try trained rounding when plain rounding breaks the budget")
      ("kl-prices", "--search allocate under a perplexity budget: allocate by KL alone, not by each block's perplexity per KL (measured with its local factor; perplexity and KL part ways block by block)")
      ("first-order-weight", "--search allocate under a perplexity budget: weight in each candidate's price of the first-order perplexity change it makes (<g, W_q - W>, g the gradient of the fit windows' mean NLL; KL, second order, misses it), beside its KL times its block's perplexity per KL; a price keeps at least half of that (0: none)", cxxopts::value<double>()->default_value(fmt::to_string(SearchOptions{}.first_order_weight)))
      ("measure-every-candidate", "--search allocate: measure every GPTQ candidate, not only those on the lower hull of bytes against GPTQ's own output error (the allocator picks hull points only; the screen skips about 3 in 4 with every encoding)")
      ("trained-iterations", "signed-gradient steps of trained rounding", cxxopts::value<int>()->default_value("200"))
      ("candidate-cache-mb", "MiB of quantized candidates the search keeps in memory for reuse (a sweep's points share them); the least recently used go to the spill file", cxxopts::value<int64_t>()->default_value(std::to_string(CandidateCache::kDefaultMaxBytes >> 20)))
      ("candidate-spill-mb", "MiB of candidates dropped from memory that the search keeps in a temporary file to read back instead of quantizing them again (0: none)", cxxopts::value<int64_t>()->default_value(std::to_string(CandidateCache::kDefaultSpillBytes >> 20)))
      ("spill-dir", "directory of that temporary file (removed as soon as it is opened; default $TMPDIR, else /var/tmp, which unlike /tmp is on disk on systems whose /tmp is in memory)", cxxopts::value<std::string>())
      ("allow-prune", "let the search remove a weight entirely after its lowest bit width")
      ("seed", "seed of the importance analysis' noise probes", cxxopts::value<uint64_t>()->default_value("0"))
      ("analysis", "importance from this `gradq analyze` JSON instead of a fresh analysis", cxxopts::value<std::string>())
      ("policy", "constraint policy JSON: allowed levels by weight name (configs/policies/)", cxxopts::value<std::string>());
}

void add_reference_storage_option(cxxopts::Options& options, const std::string& group) {
  options.add_options(group)
      ("reference-storage", "how the full-precision reference log-probabilities are kept: auto (head when the fp16 "
                            "log-probabilities of the windows would take more than 64 MiB and the model allows it, "
                            "else fp16: large vocabularies, e.g. 1 GB at 32,000 tokens and 64 windows of 256), fp16 "
                            "(2 bytes x vocab per scored token; KL within 0.01% of fp32's on stories260K), fp32 (exact, "
                            "twice that), top<K> (the K most probable tokens and the tail mass, e.g. top64: 8 x K "
                            "bytes; KL a lower bound, 0.3% under fp32's at top64 on stories260K, more on flat "
                            "distributions) or head (no log-probabilities: the model's input to its head, its width "
                            "in values per token, and the reference recomputed per batch: fp32's KL for one more head "
                            "product; the head and embeddings must stay unquantized, and it cannot be saved). "
                            "Perplexity, delta p and same-top are exact with each "
                            "(docs/BENCHMARKS.md)",
       cxxopts::value<std::string>()->default_value("auto"));
}

ReferenceStorage read_reference_storage_option(const cxxopts::ParseResult& args) {
  try {
    return ReferenceStorage::parse(args["reference-storage"].as<std::string>());
  } catch (const Error& e) {
    throw Error(fmt::format("--reference-storage: {}", e.what()));
  }
}

void add_token_options(cxxopts::Options& options, const std::string& group) {
  options.add_options(group)
      ("tokens", "token ids instead of --text and --tokenizer (for a model whose tokenizer is not SentencePiece): a "
                 "file of non-negative integers separated by whitespace or commas, or a JSON list, made by the model's "
                 "own tokenizer from one text", cxxopts::value<std::string>())
      ("bos-id", "with --tokens: the token every window starts with (-1: none)",
       cxxopts::value<int64_t>()->default_value("-1"));
}

std::map<std::string, std::string> text_inputs(const cxxopts::ParseResult& args) {
  if (args.count("tokens")) return {{"tokens", args["tokens"].as<std::string>()}};
  return {{"text", args["text"].as<std::string>()}, {"tokenizer", args["tokenizer"].as<std::string>()}};
}

void check_token_options(const cxxopts::ParseResult& args, const std::string& ids_option,
                         const std::string& text_option, const std::vector<std::string>& id_options) {
  if (args.count(ids_option)) {
    GRADQ_CHECK(!args.count(text_option) && !args.count("tokenizer"),
                "--{} replaces --{} and --tokenizer: give the token ids or the text, not both", ids_option, text_option);
    for (const std::string& id : id_options)
      GRADQ_CHECK(args[id].as<int64_t>() >= -1, "--{} must be a token id or -1 (none), got {}", id, args[id].as<int64_t>());
    return;
  }
  std::vector<std::string> flags, tokens;
  bool given = false;
  for (const std::string& id : id_options) {
    given = given || args.count(id) > 0;
    flags.push_back("--" + id);
    tokens.push_back(id == "bos-id" ? "BOS" : "EOS");
  }
  GRADQ_CHECK(!given, "{} {} with --{} (a SentencePiece tokenizer brings its own {})", fmt::join(flags, " and "),
              flags.size() == 1 ? "goes" : "go", ids_option, fmt::join(tokens, " and "));
}

void TokenStream::check_fits(int64_t model_vocab) const {
  if (tokenizer_vocab > 0) {
    check_tokenizer_fits_model(tokenizer_vocab, model_vocab);
  } else {
    check_token_ids_fit_model(ids, bos_id, model_vocab);
  }
}

TokenStream read_token_stream(const cxxopts::ParseResult& args) {
  TokenStream stream;
  if (args.count("tokens")) {
    stream.ids = read_token_file(args["tokens"].as<std::string>());
    stream.bos_id = args["bos-id"].as<int64_t>();
    return stream;
  }
  auto tokenizer = Tokenizer::load_sentencepiece(args["tokenizer"].as<std::string>());
  stream.ids = tokenizer->encode(read_text_file(args["text"].as<std::string>()));
  stream.bos_id = tokenizer->bos_id();
  stream.tokenizer_vocab = tokenizer->vocab_size();
  return stream;
}

void add_input_options(cxxopts::Options& options) {
  options.add_options("files")
      ("model", "TorchScript model, or a llama2.c .bin", cxxopts::value<std::string>()->default_value(default_model_path()))
      ("tokenizer", "SentencePiece model", cxxopts::value<std::string>()->default_value(default_tokenizer_path()))
      ("text", "UTF-8 text: calibration part first, held-out part after", cxxopts::value<std::string>()->default_value(default_text_path()))
      ("include", "regex: also quantize matching matrix weights (embeddings, the head); repeatable", cxxopts::value<std::vector<std::string>>())
      ("exclude", "regex: do not quantize matching weights; repeatable", cxxopts::value<std::vector<std::string>>());
  add_token_options(options, "files");
  add_device_option(options, "files");
  options.add_options("data")
      ("calib-fraction", "leading fraction of the text's tokens used for calibration", cxxopts::value<double>()->default_value("0.1"))
      ("ctx", "window length in tokens", cxxopts::value<int64_t>()->default_value("256"))
      ("calib-windows", "calibration windows (0 = all)", cxxopts::value<int64_t>()->default_value(std::to_string(DataOptions{}.calib_windows)))
      ("eval-windows", "held-out evaluation windows (0 = all)", cxxopts::value<int64_t>()->default_value("64"))
      ("fit-windows", "windows the rounding is fitted on (GPTQ's X^T X), the calibration part's next after the "
                      "calibration windows (0 = fit on the calibration windows)", cxxopts::value<int64_t>()->default_value("32"))
      ("batch", "windows per forward pass (more may be faster on a GPU; on a CPU they only add activation memory)",
       cxxopts::value<int64_t>()->default_value(std::to_string(QuantizerOptions{}.batch)));
  add_reference_storage_option(options, "data");
}

void read_search_options(const cxxopts::ParseResult& args, QuantizerOptions& q) {
  if (args.count("safety")) q.budget.safety = args["safety"].as<double>();
  q.batch = args["batch"].as<int64_t>();
  q.reference_storage = read_reference_storage_option(args);
  q.search.bits.clear();
  for (int64_t bits : parse_int_list(args["bits"].as<std::string>(), "--bits")) q.search.bits.push_back(static_cast<int>(bits));
  q.search.group_sizes = parse_int_list(args["group-sizes"].as<std::string>(), "--group-sizes");
  q.search.encodings = split_commas(args["encodings"].as<std::string>());
  try {
    q.search.method = parse_rounding_method(args["method"].as<std::string>());
  } catch (const Error& e) {
    throw Error(fmt::format("--method: {}", e.what()));
  }
  try {
    q.search.strategy = parse_search_strategy(args["search"].as<std::string>());
  } catch (const Error& e) {
    throw Error(fmt::format("--search: {}", e.what()));
  }
  try {
    if (args.count("search-measure"))
      q.search.measurement = parse_candidate_measurement(args["search-measure"].as<std::string>());
  } catch (const Error& e) {
    throw Error(fmt::format("--search-measure: {}", e.what()));
  }
  q.search.repair_confidence = args["repair-confidence"].as<double>();
  q.search.trained_fallback = !args.count("no-trained-fallback");
  q.search.screen_candidates = !args.count("measure-every-candidate");
  q.search.perplexity_prices = !args.count("kl-prices");
  q.search.first_order_weight = args["first-order-weight"].as<double>();
  q.search.rounding.trained.iterations = args["trained-iterations"].as<int>();
  q.search.rounding.gptq.damp = args["gptq-damp"].as<double>();
  q.search.rounding.gptq.refit_scales = args.count("gptq-refit") > 0;
  q.search.allow_prune = args.count("allow-prune") > 0;
  const int64_t cache_mb = args["candidate-cache-mb"].as<int64_t>();
  GRADQ_CHECK(cache_mb >= 0, "--candidate-cache-mb must be >= 0, got {}", cache_mb);
  q.search.candidate_cache_bytes = cache_mb << 20;
  const int64_t spill_mb = args["candidate-spill-mb"].as<int64_t>();
  GRADQ_CHECK(spill_mb >= 0, "--candidate-spill-mb must be >= 0, got {}", spill_mb);
  q.search.candidate_spill.max_bytes = spill_mb << 20;
  if (args.count("spill-dir")) {
    // Checked now rather than when the search starts, after the reference passes.
    q.search.candidate_spill.dir = args["spill-dir"].as<std::string>();
    GRADQ_CHECK(std::filesystem::is_directory(q.search.candidate_spill.dir), "--spill-dir: '{}' is not a directory",
                q.search.candidate_spill.dir);
  }
  q.analyzer.seed = args["seed"].as<uint64_t>();
  if (args.count("policy")) q.policy = PrecisionPolicy::load(args["policy"].as<std::string>());
  if (args.count("analysis")) q.analysis_path = args["analysis"].as<std::string>();
}

std::vector<std::string> input_paths(const cxxopts::ParseResult& args) {
  std::vector<std::string> inputs = {args["model"].as<std::string>()};
  for (const auto& [role, path] : text_inputs(args)) inputs.push_back(path);
  for (const char* optional : {"analysis", "policy"})
    if (args.count(optional)) inputs.push_back(args[optional].as<std::string>());
  return inputs;
}

void check_input_options(const cxxopts::ParseResult& args) {
  check_token_options(args);
  const int64_t ctx = args["ctx"].as<int64_t>();
  GRADQ_CHECK(ctx >= 2, "--ctx must be at least 2 tokens, got {}", ctx);
  for (const char* count : {"calib-windows", "eval-windows"})
    GRADQ_CHECK(args[count].as<int64_t>() >= 0, "--{} must be >= 0 (0 = all), got {}", count, args[count].as<int64_t>());
  GRADQ_CHECK(args["fit-windows"].as<int64_t>() >= 0,
              "--fit-windows must be >= 0 (0 = fit on the calibration windows), got {}", args["fit-windows"].as<int64_t>());
  GRADQ_CHECK(args["batch"].as<int64_t>() >= 1, "--batch must be at least 1, got {}", args["batch"].as<int64_t>());
  const double fraction = args["calib-fraction"].as<double>();
  GRADQ_CHECK(fraction > 0 && fraction < 1, "--calib-fraction must be in (0, 1), got {}", fraction);
}

void print_written(const std::vector<std::string>& paths) {
  if (!paths.empty()) std::cout << "wrote " << fmt::format("{}", fmt::join(paths, ", ")) << "\n";
}

Inputs load_inputs(const cxxopts::ParseResult& args) {
  AdapterOptions adapter = read_adapter_options(args);
  if (args.count("include")) adapter.include = args["include"].as<std::vector<std::string>>();
  if (args.count("exclude")) adapter.exclude = args["exclude"].as<std::vector<std::string>>();
  const TokenStream stream = read_token_stream(args);
  CausalLM model = load_model(args["model"].as<std::string>(), adapter);
  stream.check_fits(model.vocab_size());
  check_context(model, args["ctx"].as<int64_t>(), "--ctx");
  DataOptions data;
  data.calib_fraction = args["calib-fraction"].as<double>();
  data.ctx = args["ctx"].as<int64_t>();
  data.calib_windows = args["calib-windows"].as<int64_t>();
  data.eval_windows = args["eval-windows"].as<int64_t>();
  data.fit_windows = args["fit-windows"].as<int64_t>();
  DataSplit split = make_data_split(stream.ids, stream.bos_id, data);
  std::cerr << fmt::format("{} quantizable weights; {} calibration, {} and {} held-out windows of {} tokens\n",
                           model.weights().size(), split.calibration.size(),
                           split.fit.size() ? fmt::format("{} fit", split.fit.size()) : "no fit (fitted on calibration)",
                           split.evaluation.size(), data.ctx);
  return {std::move(model), std::move(split)};
}

}  // namespace gradq::cli
