// gradq quantize: uniform quantization (--uniform SPEC) or re-applying a saved plan (--plan).

#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "cli.h"
#include "common/error.h"
#include "common/files.h"
#include "data/dataset.h"
#include "eval/evaluator.h"
#include "export/export.h"
#include "model/model_loader.h"
#include "optimizer/plan.h"
#include "tokenizer/tokenizer.h"

namespace gradq::cli {
namespace {

std::string human_bytes(double bytes) {
  if (bytes >= 1e6) return fmt::format("{:.2f} MB", bytes / 1e6);
  if (bytes >= 1e3) return fmt::format("{:.1f} kB", bytes / 1e3);
  return fmt::format("{:.0f} B", bytes);
}

}  // namespace

int cmd_quantize(int argc, char** argv) {
  cxxopts::Options options(
      "gradq quantize",
      "Quantize a causal LM and write it as a packed TorchScript file (quantized linears call gradq::linear; load "
      "libgradq_ops to run it). --uniform SPEC puts every quantizable weight in one format; --plan re-applies a "
      "saved plan. The result is loaded back and evaluated on held-out text against the original model.\n\n"
      "SPEC names: b<bits>g<group>[s][-f32]: bits 2, 3, 4 or 8; group 16, 32, 64, 128 or 'row'; 's' symmetric; "
      "'-f32' fp32 scales (default fp16). Also fp16, bf16, fp32, prune. Example: b4g32.");
  options.add_options()
      ("model", "TorchScript model, or a llama2.c .bin", cxxopts::value<std::string>()->default_value(default_model_path()))
      ("tokenizer", "SentencePiece model", cxxopts::value<std::string>()->default_value(default_tokenizer_path()))
      ("text", "UTF-8 text: calibration part first, held-out evaluation part after", cxxopts::value<std::string>()->default_value(default_text_path()))
      ("uniform", "quantize every quantizable weight to this SPEC", cxxopts::value<std::string>())
      ("plan", "re-apply a plan JSON written by an earlier run (--save-plan)", cxxopts::value<std::string>())
      ("method", "rounding: rtn (round to nearest) or clip (activation-weighted clipping search)", cxxopts::value<std::string>()->default_value("clip"))
      ("o,output", "packed TorchScript output (written atomically; never an input)", cxxopts::value<std::string>())
      ("fake-quant", "also write a fake-quant TorchScript (dequantized weights, the original graph; runs without gradq)", cxxopts::value<std::string>())
      ("save-plan", "write the plan JSON here", cxxopts::value<std::string>())
      ("report", "write a JSON report here", cxxopts::value<std::string>())
      ("include", "regex: also quantize matching matrix weights (e.g. embeddings, the head); repeatable", cxxopts::value<std::vector<std::string>>())
      ("exclude", "regex: do not quantize matching weights; repeatable", cxxopts::value<std::vector<std::string>>())
      ("calib-fraction", "leading fraction of the text's tokens used for calibration", cxxopts::value<double>()->default_value("0.1"))
      ("ctx", "window length in tokens", cxxopts::value<int64_t>()->default_value("256"))
      ("calib-windows", "calibration windows (0 = all)", cxxopts::value<int64_t>()->default_value("16"))
      ("eval-windows", "held-out evaluation windows (0 = all)", cxxopts::value<int64_t>()->default_value("64"))
      ("batch", "windows per forward pass", cxxopts::value<int64_t>()->default_value("8"));
  add_common_options(options);
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;
  GRADQ_CHECK(args.count("output"), "-o/--output is required");
  GRADQ_CHECK(args.count("uniform") + args.count("plan") == 1, "give exactly one of --uniform SPEC or --plan FILE");
  const std::string method_name = args["method"].as<std::string>();
  GRADQ_CHECK(method_name == "rtn" || method_name == "clip", "--method must be rtn or clip, got '{}'", method_name);
  const RoundingMethod method = method_name == "clip" ? RoundingMethod::kClip : RoundingMethod::kRtn;
  const std::string model_path = args["model"].as<std::string>();
  std::vector<std::string> inputs = {model_path, args["tokenizer"].as<std::string>(), args["text"].as<std::string>()};
  if (args.count("plan")) inputs.push_back(args["plan"].as<std::string>());
  for (const char* out : {"output", "fake-quant", "save-plan", "report"})
    if (args.count(out)) check_output_is_not_input(args[out].as<std::string>(), inputs);

  AdapterOptions adapter;
  if (args.count("include")) adapter.include = args["include"].as<std::vector<std::string>>();
  if (args.count("exclude")) adapter.exclude = args["exclude"].as<std::vector<std::string>>();
  auto tokenizer = Tokenizer::load_sentencepiece(args["tokenizer"].as<std::string>());
  CausalLM model = load_model(model_path, adapter);
  check_tokenizer_fits_model(tokenizer->vocab_size(), model.vocab_size());
  DataOptions data;
  data.calib_fraction = args["calib-fraction"].as<double>();
  data.ctx = args["ctx"].as<int64_t>();
  data.calib_windows = args["calib-windows"].as<int64_t>();
  data.eval_windows = args["eval-windows"].as<int64_t>();
  const DataSplit split = make_data_split(tokenizer->encode(read_text_file(args["text"].as<std::string>())),
                                          tokenizer->bos_id(), data);
  const int64_t batch = args["batch"].as<int64_t>();

  const Plan plan = args.count("plan") ? Plan::load(args["plan"].as<std::string>())
                                       : uniform_plan(model, parse_quant_spec(args["uniform"].as<std::string>()), method);
  std::map<std::string, at::Tensor> act_sq_mean;
  if (std::any_of(plan.entries.begin(), plan.entries.end(), [](const PlanEntry& e) { return e.method == RoundingMethod::kClip; })) {
    std::cerr << fmt::format("capturing activation statistics on {} calibration windows\n", split.calibration.size());
    for (auto& [name, stats] : model.capture_input_stats(split.calibration.inputs, batch, /*with_xtx=*/false))
      act_sq_mean[name] = stats.sq_mean();
  }
  std::cerr << fmt::format("quantizing {} weights\n", plan.entries.size());
  const QuantizedWeights quantized = apply_plan(model, plan, act_sq_mean);
  const std::string output = args["output"].as<std::string>();
  export_packed(model, quantized, output);
  if (args.count("fake-quant")) export_fake_quant(model, quantized, args["fake-quant"].as<std::string>());
  if (args.count("save-plan")) plan.save(args["save-plan"].as<std::string>());

  // Validate what was written: load the packed file and evaluate it on held-out windows.
  std::cerr << fmt::format("evaluating the written model on {} held-out windows\n", split.evaluation.size());
  EvaluatorOptions eval_options;
  eval_options.batch = batch;
  GradualEvaluator evaluator(split.evaluation, eval_options);
  evaluator.set_reference(model);
  const EvalResult result = evaluator.evaluate(load_model(output));

  const PlanSize size = plan_size(model, plan);
  const auto input_bytes = static_cast<double>(std::filesystem::file_size(model_path));
  const auto output_bytes = static_cast<double>(std::filesystem::file_size(output));
  const double ref_ppl = result.reference_ppl->value;
  std::cout << fmt::format("quantized {} weights ({} parameters): {:.3f} bits per weight\n", plan.entries.size(),
                           size.weights, size.bits_per_weight());
  std::cout << fmt::format("quantizable weights: {} as fp16 -> {} ({:.1f}% smaller; {:.2f}x)\n", human_bytes(size.fp16_bytes),
                           human_bytes(size.quantized_bytes), 100.0 * (1.0 - double(size.quantized_bytes) / size.fp16_bytes),
                           double(size.fp16_bytes) / size.quantized_bytes);
  std::cout << fmt::format("checkpoint file: {} -> {} ({:.1f}% smaller)\n", human_bytes(input_bytes), human_bytes(output_bytes),
                           100.0 * (1.0 - output_bytes / input_bytes));
  std::cout << fmt::format("held-out perplexity ({} tokens): {:.4f} -> {:.4f} ({:+.2f}%), KL mean {:.5f} nats/token, same top {:.2f}%\n",
                           result.tokens, ref_ppl, result.ppl.value, 100.0 * (result.ppl.value / ref_ppl - 1.0),
                           result.kl->mean.value, 100.0 * result.kl->same_top_rate);
  std::cout << "wrote " << output << "\n";
  if (args.count("report")) {
    nlohmann::ordered_json j;
    j["model"] = model_path;
    j["output"] = output;
    j["weights"] = plan.entries.size();
    j["parameters"] = size.weights;
    j["bits_per_weight"] = size.bits_per_weight();
    j["quantizable_fp16_bytes"] = size.fp16_bytes;
    j["quantizable_bytes"] = size.quantized_bytes;
    j["input_file_bytes"] = input_bytes;
    j["output_file_bytes"] = output_bytes;
    j["heldout"] = nlohmann::ordered_json::parse(eval_result_json(result));
    write_file_atomically(args["report"].as<std::string>(), j.dump(2) + "\n");
  }
  return 0;
}

}  // namespace gradq::cli
