// gradq convert / generate / eval.

#include <fmt/ranges.h>  // fmt::join (in fmt/format.h before fmt 11)

#include <iostream>

#include "cli.h"
#include "common/error.h"
#include "common/files.h"
#include "data/dataset.h"
#include "eval/evaluator.h"
#include "model/generate.h"
#include "model/context_check.h"
#include "model/llama2c.h"
#include "model/model_loader.h"
#include "tokenizer/tokenizer.h"

namespace gradq::cli {

int cmd_convert(int argc, char** argv) {
  cxxopts::Options options("gradq convert", "Convert a checkpoint to a TorchScript causal LM "
                                            "(forward: tokens int64 [B, T] -> logits [B, T, vocab] in the parameters' dtype).");
  options.add_options()
      ("from", "input format (only llama2c: llama2.c legacy float32 checkpoints)", cxxopts::value<std::string>()->default_value("llama2c"))
      ("input", "input checkpoint", cxxopts::value<std::string>())
      ("o,output", "output TorchScript file (written atomically; never the input)", cxxopts::value<std::string>())
      ("dtype", "parameter dtype of the output: fp32, fp16 or bf16", cxxopts::value<std::string>()->default_value("fp32"));
  options.parse_positional({"input"});
  options.positional_help("INPUT");
  add_common_options(options);
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;
  GRADQ_CHECK(args["from"].as<std::string>() == "llama2c", "--from must be llama2c, got '{}'", args["from"].as<std::string>());
  GRADQ_CHECK(args.count("input"), "an input checkpoint is required");
  GRADQ_CHECK(args.count("output"), "-o/--output is required");
  const std::string dtype = args["dtype"].as<std::string>();
  GRADQ_CHECK(dtype == "fp32" || dtype == "fp16" || dtype == "bf16", "--dtype must be fp32, fp16 or bf16, got '{}'", dtype);
  OutputSet output_set({args["output"].as<std::string>()}, {args["input"].as<std::string>()});
  // Validated while it is read, before anything is written.
  const Llama2cConfig config = convert_llama2c(args["input"].as<std::string>(), args["output"].as<std::string>(),
                                               dtype == "fp32" ? at::kFloat : dtype == "fp16" ? at::kHalf : at::kBFloat16);
  output_set.commit();
  std::cout << fmt::format("wrote {}: dim {}, hidden {}, {} layers, {} heads ({} kv), vocab {} ({} classifier), seq_len {}\n",
                           args["output"].as<std::string>(), config.dim, config.hidden_dim, config.n_layers, config.n_heads,
                           config.n_kv_heads, config.vocab_size, config.shared_classifier ? "tied" : "untied", config.seq_len);
  return 0;
}

int cmd_generate(int argc, char** argv) {
  cxxopts::Options options("gradq generate",
                           "Greedy (argmax) generation. The prompt is encoded after a BOS token. With --prompt-ids "
                           "(a model whose tokenizer is not SentencePiece) the prompt is token ids and the generated "
                           "ids are printed.");
  options.add_options()
      ("model", "TorchScript model, or a llama2.c .bin", cxxopts::value<std::string>()->default_value(default_model_path()))
      ("tokenizer", "SentencePiece model", cxxopts::value<std::string>()->default_value(default_tokenizer_path()))
      ("prompt", "text to continue", cxxopts::value<std::string>()->default_value(""))
      ("prompt-ids", "token ids to continue instead of --prompt and --tokenizer (integers separated by whitespace "
                     "or commas, as --tokens reads them); prints the generated ids", cxxopts::value<std::string>())
      ("bos-id", "with --prompt-ids: the token put before the prompt (-1: none)", cxxopts::value<int64_t>()->default_value("-1"))
      ("eos-id", "with --prompt-ids: the token that ends generation (-1: none)", cxxopts::value<int64_t>()->default_value("-1"))
      ("steps", "tokens to generate", cxxopts::value<int64_t>()->default_value("256"))
      ("max-context", "feed at most this many trailing tokens to the model (0 = all)", cxxopts::value<int64_t>()->default_value("512"))
      ("no-stop", "do not stop at BOS/EOS");
  add_device_option(options);
  add_common_options(options);
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;
  GRADQ_CHECK(args["steps"].as<int64_t>() >= 0, "--steps must be >= 0, got {}", args["steps"].as<int64_t>());
  GRADQ_CHECK(args["max-context"].as<int64_t>() >= 0, "--max-context must be >= 0 (0 = all), got {}",
              args["max-context"].as<int64_t>());
  check_token_options(args, "prompt-ids", "prompt", {"bos-id", "eos-id"});
  const bool ids = args.count("prompt-ids") > 0;
  const std::unique_ptr<Tokenizer> tokenizer =
      ids ? nullptr : Tokenizer::load_sentencepiece(args["tokenizer"].as<std::string>());
  const int64_t bos = ids ? args["bos-id"].as<int64_t>() : tokenizer->bos_id();
  const int64_t eos = ids ? args["eos-id"].as<int64_t>() : tokenizer->eos_id();
  const std::vector<int64_t> prompt_ids = ids ? parse_token_ids(args["prompt-ids"].as<std::string>(), "--prompt-ids")
                                              : tokenizer->encode(args["prompt"].as<std::string>());
  CausalLM model = load_model(args["model"].as<std::string>(), read_adapter_options(args));
  if (ids) {
    check_token_ids_fit_model(prompt_ids, bos, model.vocab_size());
    GRADQ_CHECK(eos < model.vocab_size(), "--eos-id {} is not a token of the model: expected an id below its "
                "vocabulary ({})", eos, model.vocab_size());
  } else {
    check_tokenizer_fits_model(tokenizer->vocab_size(), model.vocab_size());
  }
  std::vector<int64_t> prompt;
  if (bos >= 0) prompt.push_back(bos);
  prompt.insert(prompt.end(), prompt_ids.begin(), prompt_ids.end());
  GenerateOptions gen;
  gen.steps = args["steps"].as<int64_t>();
  gen.max_context = args["max-context"].as<int64_t>();
  if (gen.steps > 0) {
    // The longest input generation feeds the model, checked before any text is printed.
    const int64_t needed = static_cast<int64_t>(prompt.size()) + gen.steps - 1;
    const int64_t fed = gen.max_context > 0 ? std::min(gen.max_context, needed) : needed;
    const int64_t longest = accepted_context(model, fed);
    if (args.count("max-context") || gen.max_context == 0)
      GRADQ_CHECK(longest == fed, "--max-context {}: generation would feed the model up to {} tokens, but its forward "
                  "works up to {}: give --max-context {} or less", gen.max_context, fed, longest, longest);
    gen.max_context = longest;  // the default bound adapts to a model with a shorter context
    GRADQ_CHECK(gen.max_context > 0, "the model's forward fails on every input of 1 to {} tokens", fed);
  }
  if (!args.count("no-stop"))
    for (int64_t id : {bos, eos})
      if (id >= 0) gen.stop_ids.push_back(id);
  if (ids) {
    std::cout << fmt::format("{}", fmt::join(prompt_ids, " "));
    generate_greedy(model, prompt, gen, [&](int64_t id) { std::cout << ' ' << id << std::flush; });
    std::cout << std::endl;
    return 0;
  }
  std::cout << args["prompt"].as<std::string>();
  // Decode the growing sequence and print what is new, so multi-token characters print whole.
  std::vector<int64_t> generated;
  std::string printed;
  generate_greedy(model, prompt, gen, [&](int64_t id) {
    generated.push_back(id);
    std::string text = tokenizer->decode(generated);
    if (text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0) {
      std::cout << text.substr(printed.size()) << std::flush;
      printed = text;
    }
  });
  std::cout << std::endl;
  return 0;
}

int cmd_eval(int argc, char** argv) {
  cxxopts::Options options("gradq eval",
                           "Perplexity of a model on a text, and with --reference (or --load-reference) the KL divergence "
                           "and related statistics against it. Each window of --ctx tokens starts with BOS; windows start "
                           "every --stride tokens and score only the tokens no earlier window scored.");
  options.add_options()
      ("model", "TorchScript model, or a llama2.c .bin", cxxopts::value<std::string>()->default_value(default_model_path()))
      ("reference", "full-precision reference model for KL statistics", cxxopts::value<std::string>())
      ("load-reference", "reference log-probabilities saved by --save-reference (used as stored; a float32 one is converted when --reference-storage is given)", cxxopts::value<std::string>())
      ("save-reference", "save the reference log-probabilities to this file", cxxopts::value<std::string>())
      ("tokenizer", "SentencePiece model", cxxopts::value<std::string>()->default_value(default_tokenizer_path()))
      ("text", "UTF-8 text file to evaluate on", cxxopts::value<std::string>()->default_value(default_text_path()))
      ("ctx", "window length in tokens", cxxopts::value<int64_t>()->default_value("256"))
      ("stride", "tokens between window starts (default: --ctx)", cxxopts::value<int64_t>())
      ("max-windows", "evaluate only the first N windows (0 = all)", cxxopts::value<int64_t>()->default_value("0"))
      ("batch", "windows per forward pass (more may be faster on a GPU; on a CPU they only add activation memory)",
       cxxopts::value<int64_t>()->default_value(std::to_string(EvaluatorOptions{}.batch)))
      ("json", "also write the numbers as JSON to this file", cxxopts::value<std::string>());
  add_token_options(options);
  add_reference_storage_option(options);
  add_device_option(options);
  add_common_options(options);
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;
  GRADQ_CHECK(!(args.count("reference") && args.count("load-reference")), "give --reference or --load-reference, not both");
  check_token_options(args);
  std::vector<std::string> inputs = {args["model"].as<std::string>()};
  for (const auto& [role, path] : text_inputs(args)) inputs.push_back(path);
  if (args.count("reference")) inputs.push_back(args["reference"].as<std::string>());
  const int64_t ctx = args["ctx"].as<int64_t>();
  GRADQ_CHECK(ctx >= 2, "--ctx must be at least 2 tokens, got {}", ctx);
  GRADQ_CHECK(args["batch"].as<int64_t>() >= 1, "--batch must be at least 1, got {}", args["batch"].as<int64_t>());
  GRADQ_CHECK(args["max-windows"].as<int64_t>() >= 0, "--max-windows must be >= 0 (0 = all), got {}",
              args["max-windows"].as<int64_t>());
  GRADQ_CHECK(!args.count("save-reference") || args.count("reference"), "--save-reference needs --reference");
  ReferenceStorage storage = read_reference_storage_option(args);
  GRADQ_CHECK(!args.count("save-reference") || storage.kind != ReferenceStorage::Kind::kHead,
              "--save-reference cannot save a head reference (it holds the model's states, not log-probabilities): "
              "give --reference-storage fp32, fp16 or top<K>");
  // A saved reference holds log-probabilities, so auto keeps fp16 for it.
  if (args.count("save-reference") && storage.kind == ReferenceStorage::Kind::kAuto) storage = ReferenceStorage::float16();
  std::vector<std::string> outputs;
  for (const char* out : {"json", "save-reference"})
    if (args.count(out)) outputs.push_back(args[out].as<std::string>());
  OutputSet output_set(outputs, inputs);

  const AdapterOptions adapter = read_adapter_options(args);
  const TokenStream stream = read_token_stream(args);
  CausalLM model = load_model(args["model"].as<std::string>(), adapter);
  stream.check_fits(model.vocab_size());
  check_context(model, ctx, "--ctx");
  WindowSpec spec;
  spec.ctx = ctx;
  spec.stride = args.count("stride") ? args["stride"].as<int64_t>() : spec.ctx;
  spec.bos_id = stream.bos_id;
  spec.max_windows = args["max-windows"].as<int64_t>();
  Windows windows = make_windows(stream.ids, spec);
  EvaluatorOptions eval_options;
  eval_options.batch = args["batch"].as<int64_t>();
  eval_options.reference_storage = storage;
  GradualEvaluator evaluator(windows, eval_options);
  if (args.count("reference")) {
    CausalLM reference = load_model(args["reference"].as<std::string>(), adapter);
    GRADQ_CHECK(reference.vocab_size() == model.vocab_size(), "reference vocabulary {} differs from the model's {}",
                reference.vocab_size(), model.vocab_size());
    check_context(reference, ctx, "--ctx (for the reference)");
    evaluator.set_reference(reference);
  } else if (args.count("load-reference")) {
    // A saved reference is used as stored; a float32 one is converted when another storage is asked for.
    Reference loaded = Reference::load(args["load-reference"].as<std::string>());
    if (args.count("reference-storage") && storage.kind != ReferenceStorage::Kind::kAuto && storage != loaded.storage)
      loaded = loaded.to_storage(storage);
    evaluator.set_reference(std::move(loaded));
  }
  if (evaluator.reference())
    std::cerr << fmt::format("reference log-probabilities: {}, {:.1f} MB\n", evaluator.reference()->storage.name(),
                             static_cast<double>(evaluator.reference()->bytes()) / 1e6);
  if (args.count("save-reference")) evaluator.reference()->save(args["save-reference"].as<std::string>());
  std::cerr << fmt::format("evaluating {} windows of {} tokens ({} scored tokens)\n", windows.size(), spec.ctx,
                           windows.scored_tokens());
  EvalResult result = evaluator.evaluate(model);
  std::cout << format_eval_table(result);
  if (args.count("json")) write_file_atomically(args["json"].as<std::string>(), eval_result_json(result));
  print_written(output_set.commit());
  return 0;
}

}  // namespace gradq::cli
