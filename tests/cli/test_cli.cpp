// The gradq CLI as a user runs it: help, errors as one line with a non-zero exit, real outputs.

#include <gtest/gtest.h>

#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <sys/file.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "common/files.h"
#include "data/dataset.h"
#include "support/gpt_fixture.h"
#include "support/test_support.h"
#include "tokenizer/tokenizer.h"

namespace gradq {
namespace {
namespace fs = std::filesystem;

constexpr double kFp16PplTolerance = 0.002;
constexpr double kBf16PplTolerance = 0.006;

TEST(Cli, HelpAndVersion) {
  auto [rc, out] = test::run(test::cli() + " --help");
  EXPECT_EQ(rc, 0);
  for (const char* cmd : {"convert", "generate", "eval"}) EXPECT_NE(out.find(cmd), std::string::npos);
  auto [vrc, vout] = test::run(test::cli() + " --version");
  EXPECT_EQ(vrc, 0);
  EXPECT_NE(vout.find("gradq 0."), std::string::npos);
  // The allocator the build chose (GRADQ_ALLOCATOR) is the one the CLI's malloc resolves to.
  EXPECT_NE(vout.find(std::string("(heap allocator: ") + GRADQ_TEST_CLI_ALLOCATOR + ")"), std::string::npos) << vout;
  for (const char* cmd : {"convert", "generate", "eval", "quantize"}) {
    auto [hrc, hout] = test::run(test::cli() + " " + cmd + " --help");
    EXPECT_EQ(hrc, 0) << cmd;
    EXPECT_NE(hout.find("--threads"), std::string::npos) << cmd;
    EXPECT_NE(hout.find("(default"), std::string::npos) << cmd;
  }
}

TEST(Cli, ErrorsAreOneLineAndNonZero) {
  for (const std::string args : {"frobnicate", "convert /nonexistent.bin -o /tmp/x.pt", "eval --ctx 0",
                                 "eval --text /nonexistent.txt", "eval --bogus-flag", "quantize --uniform b4g32",
                                 "quantize --uniform b7g32 -o /tmp/x.pt", "quantize --uniform b4g48 -o /tmp/x.pt",
                                 "quantize --uniform b4g32 --method round -o /tmp/x.pt",
                                 "quantize --plan /nonexistent.json -o /tmp/x.pt",
                                 "quantize --uniform b4g32 --fit-on sequential -o /tmp/x.pt",
                                 "quantize --max-kl 0.1 --fit-on quantized -o /tmp/x.pt"}) {
    auto [rc, out] = test::run(test::cli() + " " + args);
    EXPECT_EQ(rc, 1) << args << ": " << out;
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << args << ": " << out;
    EXPECT_NE(out.find("error"), std::string::npos) << out;
  }
}

TEST(Cli, ConvertGenerateEvalOnStories260K) {
  const std::string dir = test::temp_dir("cli");
  auto [rc, out] = test::run(test::cli() + " convert --from llama2c " + test::stories_bin() + " -o " + dir + "/s.pt");
  ASSERT_EQ(rc, 0) << out;
  auto [grc, gout] = test::run(test::cli() + " generate --model " + dir + "/s.pt --steps 30 --threads 1");
  ASSERT_EQ(grc, 0) << gout;
  EXPECT_EQ(gout.rfind("Once upon a time, there was a little girl named Lily.", 0), 0u) << gout;
  auto [erc, eout] = test::run(test::cli() + " eval --model " + dir + "/s.pt --reference " + test::stories_bin() +
                               " --max-windows 4 --ctx 128 --json " + dir + "/e.json");
  ASSERT_EQ(erc, 0) << eout;
  EXPECT_NE(eout.find("same top token"), std::string::npos);
  EXPECT_TRUE(fs::exists(dir + "/e.json"));
  // Refuses to write over an input.
  auto [src, sout] = test::run(test::cli() + " eval --model " + dir + "/s.pt --max-windows 1 --json " + dir + "/s.pt");
  EXPECT_EQ(src, 1) << sout;
  EXPECT_TRUE(fs::file_size(dir + "/s.pt") > 1000000);
}

// convert --dtype: the converter's module runs in fp16 and bf16 (its mask and rotary tables follow the
// activations' dtype), and stories260K in each evaluates close to float32. Measured on these 8
// windows of 128 tokens: fp32 5.2762, fp16 5.2755 (-0.013%), bf16 5.2843 (+0.153%); the bounds are
// about 4x those changes (docs/BENCHMARKS.md).
TEST(Cli, ConvertToEachDtypeEvaluatesCloseToFloat32) {
  const std::string dir = test::temp_dir("cli_dtype");
  std::map<std::string, double> ppl;
  const std::map<std::string, at::ScalarType> dtypes{{"fp32", at::kFloat}, {"fp16", at::kHalf}, {"bf16", at::kBFloat16}};
  for (const auto& [name, dtype] : dtypes) {
    const std::string out = dir + "/s_" + name + ".pt";
    auto [rc, text] = test::run(test::cli() + " convert --from llama2c " + test::stories_bin() + " --dtype " + name + " -o " + out);
    ASSERT_EQ(rc, 0) << text;
    for (const auto& p : torch::jit::load(out).named_parameters(true)) ASSERT_EQ(p.value.scalar_type(), dtype) << p.name;
    auto [erc, eout] = test::run(test::cli() + " eval --model " + out + " --max-windows 8 --ctx 128 --threads 1 --json " +
                                 dir + "/e_" + name + ".json");
    ASSERT_EQ(erc, 0) << eout;
    ppl[name] = nlohmann::json::parse(read_file(dir + "/e_" + name + ".json"))["ppl"]["value"].get<double>();
  }
  EXPECT_GT(ppl["fp32"], 1.0);
  EXPECT_LT(std::abs(ppl["fp16"] / ppl["fp32"] - 1.0), kFp16PplTolerance) << ppl["fp16"] << " vs " << ppl["fp32"];
  EXPECT_LT(std::abs(ppl["bf16"] / ppl["fp32"] - 1.0), kBf16PplTolerance) << ppl["bf16"] << " vs " << ppl["fp32"];
  EXPECT_NE(ppl["bf16"], ppl["fp32"]);  // the conversion really happened
  auto [brc, bout] = test::run(test::cli() + " convert " + test::stories_bin() + " --dtype fp8 -o " + dir + "/x.pt");
  EXPECT_EQ(brc, 1) << bout;
  EXPECT_NE(bout.find("--dtype must be fp32, fp16 or bf16, got 'fp8'"), std::string::npos) << bout;
}

// quantize --uniform writes a packed model that generate runs, a plan that --plan re-applies to
// the same bytes, and refuses to write over its input.
TEST(Cli, QuantizeUniformAndReapplyPlan) {
  const std::string dir = test::temp_dir("cli_quantize");
  const std::string common = " --threads 1 --calib-windows 4 --eval-windows 4";
  auto [rc, out] = test::run(test::cli() + " quantize --uniform b4g32 -o " + dir + "/q.pt --save-plan " + dir +
                             "/plan.json --fake-quant " + dir + "/fq.pt --report " + dir + "/report.json" + common);
  ASSERT_EQ(rc, 0) << out;
  for (const char* line : {"bits per weight", "held-out (", "checkpoint file", "wrote"})
    EXPECT_NE(out.find(line), std::string::npos) << line << "\n" << out;
  EXPECT_LT(fs::file_size(dir + "/q.pt"), fs::file_size(test::stories_bin()) / 3);
  auto [grc, gout] = test::run(test::cli() + " generate --model " + dir + "/q.pt --steps 20 --threads 1");
  EXPECT_EQ(grc, 0) << gout;
  EXPECT_NE(gout.find("Once upon a time"), std::string::npos) << gout;
  auto [prc, pout] = test::run(test::cli() + " quantize --plan " + dir + "/plan.json -o " + dir + "/q2.pt" + common);
  ASSERT_EQ(prc, 0) << pout;
  EXPECT_EQ(read_file(dir + "/q.pt"), read_file(dir + "/q2.pt"));
  const std::string plan_before = read_file(dir + "/plan.json");
  auto [src, sout] = test::run(test::cli() + " quantize --plan " + dir + "/plan.json -o " + dir + "/plan.json" + common);
  EXPECT_EQ(src, 1) << sout;
  EXPECT_EQ(read_file(dir + "/plan.json"), plan_before);
}

// What a failed command prints: one error line, exit 1.
void expect_one_line_error(const std::string& args, const std::string& expected) {
  auto [rc, out] = test::run(test::cli() + " " + args);
  EXPECT_EQ(rc, 1) << args << ": " << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << args << ": " << out;
  EXPECT_NE(out.find(expected), std::string::npos) << args << ": expected '" << expected << "' in: " << out;
}

// Every output option of every command is checked before the model is loaded: the one line is the
// error (load_inputs' "N quantizable weights; ..." line would come first otherwise), and nothing
// of the other outputs is written.
TEST(Cli, OutputLocationsAreCheckedBeforeLoading) {
  const std::string dir = test::temp_dir("cli_outputs");
  const std::string ok = " -o " + dir + "/q.pt";
  for (const std::string missing : {"/nonexistent_dir/x", "/proc/gradq_not_writable"}) {
    for (const std::string& args :
         {"quantize -o " + missing + ".pt", "quantize" + ok + " --report " + missing + ".json",
          "quantize" + ok + " --save-plan " + missing + ".json", "quantize" + ok + " --fake-quant " + missing + ".pt",
          "quantize --uniform b4g32" + ok + " --report " + missing + ".json", "eval --json " + missing + ".json",
          "eval --reference " + test::stories_bin() + " --save-reference " + missing + ".ref",
          "analyze -o " + missing + ".json", "analyze -o " + dir + "/a.json --chart " + missing + ".svg",
          "convert " + test::stories_bin() + " -o " + missing + ".pt", "sweep --out " + missing + "/sweep"})
      expect_one_line_error(args, "cannot ");
  }
  expect_one_line_error("quantize -o " + dir, "is a directory");
  expect_one_line_error("quantize" + ok + " --save-plan " + dir + "/q.pt", "two different outputs");
  EXPECT_TRUE(fs::is_empty(dir)) << "a failed command left files in " << dir;
}

TEST(Cli, OptionsAreCheckedBeforeLoading) {
  expect_one_line_error("quantize --max-ppl-increase 0 -o /tmp/x.pt", "--max-ppl-increase must be > 0, got 0");
  // The progressive search analyzes importance over subsets of the calibration windows (the default
  // allocate search does not).
  expect_one_line_error("quantize --search progressive --calib-windows 2 -o /tmp/x.pt", "--calib-windows must be at least 4");
  auto [rc, out] = test::run(test::cli() + " quantize --search progressive --calib-windows 2 -o /tmp/x.pt");
  EXPECT_EQ(out.find("--subsets"), std::string::npos) << out;  // an analyze option quantize does not have
  expect_one_line_error("analyze -o /tmp/a.json --calib-windows 2", "--calib-windows must be at least --subsets (4)");
  for (const char* threads : {"-1", "100000"})
    expect_one_line_error(std::string("eval --threads ") + threads, "--threads must be between 1 and");
  expect_one_line_error("eval --model " + test::temp_dir("cli_model_dir"), "is a directory, expected a TorchScript file");
  expect_one_line_error("generate --steps -1", "--steps must be >= 0");
  expect_one_line_error("quantize --fit-windows -1 -o /tmp/x.pt",
                        "--fit-windows must be >= 0 (0 = fit on the calibration windows), got -1");
  // Fit windows come after the calibration windows: none are left when those take the whole part.
  expect_one_line_error("quantize --calib-windows 0 -o /tmp/x.pt", "no text left for fit windows");
  expect_one_line_error("quantize --candidate-spill-mb -1 -o /tmp/x.pt", "--candidate-spill-mb must be >= 0, got -1");
  expect_one_line_error("quantize --first-order-weight -1 -o /tmp/x.pt",
                        "first_order_weight (--first-order-weight) must be finite and >= 0, got -1");
  expect_one_line_error("sweep --spill-dir /nonexistent/spill --out /tmp/s", "--spill-dir: '/nonexistent/spill' is not a directory");
}

TEST(Cli, ReferenceStorageIsValidated) {
  const std::string out = test::temp_dir("cli_reference_storage");
  for (const std::string& cmd : std::vector<std::string>{"eval", "analyze -o " + out + "/a.json", "quantize -o " + out + "/q.pt",
                                                         "sweep --out " + out + "/sweep --budgets 0.05"}) {
    for (const char* bad : {"top0", "fp8", "top", "64"})
      expect_one_line_error(cmd + " --reference-storage " + bad,
                            std::string("--reference-storage: unknown reference storage '") + bad +
                                "': expected fp32, fp16, top<K> with K >= 1 (e.g. top64), head or auto");
    auto [hrc, help] = test::run(test::cli() + " " + cmd.substr(0, cmd.find(' ')) + " --help");
    EXPECT_NE(help.find("--reference-storage"), std::string::npos) << cmd;
  }
  expect_one_line_error("eval --reference " + test::stories_bin() + " --save-reference " + out +
                            "/r.pt --reference-storage head",
                        "--save-reference cannot save a head reference");
  EXPECT_TRUE(fs::is_empty(out)) << "a refused command left files in " << out;
  // More tokens kept than stories260K's vocabulary has.
  expect_one_line_error("eval --reference " + test::stories_bin() + " --max-windows 1 --threads 1 --reference-storage top513",
                        "reference storage top513 keeps more tokens than the vocabulary has (512)");
}

// --device on every command that loads a model: a name it does not know, or a GPU this build or
// machine does not have, is one line naming what is missing; cpu runs.
TEST(Cli, DeviceIsValidated) {
  const std::string out = test::temp_dir("cli_device");
  for (const std::string& cmd : std::vector<std::string>{"eval", "generate --steps 1", "analyze -o " + out + "/a.json",
                                                         "quantize -o " + out + "/q.pt",
                                                         "sweep --out " + out + "/sweep --budgets 0.05"}) {
    for (const char* bad : {"tpu", "gpu", "cuda:x"})
      expect_one_line_error(cmd + " --device " + bad,
                            std::string("--device: unknown device '") + bad + "': expected cpu, cuda, cuda:N or auto");
    if (!torch::cuda::is_available()) {
      // Debian's LibTorch: "built against a libtorch without CUDA"; a CUDA one: "sees no GPU".
      expect_one_line_error(cmd + " --device cuda", "--device: device 'cuda': this ");
      expect_one_line_error(cmd + " --device cuda:1", "--device: device 'cuda:1': this ");
    }
    auto [hrc, help] = test::run(test::cli() + " " + cmd.substr(0, cmd.find(' ')) + " --help");
    EXPECT_NE(help.find("--device"), std::string::npos) << cmd;
  }
  EXPECT_TRUE(fs::is_empty(out)) << "a refused command left files in " << out;
  // The model's device given explicitly: the same numbers as the default (auto, the CPU here).
  if (!torch::cuda::is_available()) {
    const std::string args = " --max-windows 2 --ctx 64 --threads 1 --reference " + test::stories_bin();
    auto [rc_cpu, on_cpu] = test::run(test::cli() + " eval --device cpu" + args);
    auto [rc_auto, on_auto] = test::run(test::cli() + " eval" + args);
    EXPECT_EQ(rc_cpu, 0) << on_cpu;
    EXPECT_EQ(rc_auto, 0) << on_auto;
    auto numbers = [](const std::string& text) { return text.substr(0, text.find("seconds (forward)")); };
    EXPECT_NE(on_cpu.find("PPL "), std::string::npos) << on_cpu;
    EXPECT_EQ(numbers(on_cpu), numbers(on_auto));
  }
}

TEST(Cli, BadLogitsAreRejected) {
  const std::string dir = test::temp_dir("cli_logits");
  const std::string shape = "tokens.size(0), tokens.size(1), 512";
  test::scripted_module("    return torch.zeros([" + shape + "]).long() + 1000\n").save(dir + "/int64.pt");
  test::scripted_module("    return torch.full([" + shape + "], float('nan'))\n").save(dir + "/nan.pt");
  test::scripted_module("    x = torch.zeros([" + shape + "])\n    return {\"scores\": x}\n").save(dir + "/dict.pt");
  const std::string common = " --max-windows 2 --ctx 64 --threads 1";
  expect_one_line_error("eval --model " + dir + "/int64.pt" + common, "floating-point logits, it returns Long");
  // Alone, the model's first pass is the evaluation itself (after its "evaluating ..." line).
  auto [rc, out] = test::run(test::cli() + " eval --model " + dir + "/nan.pt" + common);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("error: the model's logits hold NaN or infinite values in window 0 (of 2)"), std::string::npos) << out;
  EXPECT_EQ(out.find("PPL"), std::string::npos) << out;
  expect_one_line_error("eval --model " + test::stories_bin() + " --reference " + dir + "/nan.pt" + common,
                        "NaN or infinite values in window 0");
  expect_one_line_error("eval --model " + dir + "/dict.pt" + common,
                        "a tuple that starts with them or a dict with \"logits\"; it returns a Dict(str, Tensor)");
}

// --tokens: the text's ids from the user's own tokenizer. With the SentencePiece tokenizer's ids and
// its BOS they are the same windows, so every command gives what --text gives: the same numbers, the
// same packed bytes.
TEST(Cli, TokenIdsGiveWhatTheTextGives) {
  const std::string dir = test::temp_dir("cli_tokens");
  const auto tokenizer = Tokenizer::load_sentencepiece(test::tokenizer_model());
  const std::vector<int64_t> ids = tokenizer->encode(read_file(test::tinystories_text()));
  {
    std::ofstream out(dir + "/ids.txt");
    for (const int64_t id : ids) out << id << '\n';
  }
  const std::string tokens = " --tokens " + dir + "/ids.txt --bos-id " + std::to_string(tokenizer->bos_id());
  const std::string common = " --threads 1 --calib-windows 4 --eval-windows 4";
  auto ok = [](const std::string& args) {
    auto [rc, out] = test::run(test::cli() + " " + args);
    EXPECT_EQ(rc, 0) << args << "\n" << out;
    return out;
  };
  ok("eval --max-windows 4 --threads 1 --json " + dir + "/text.json");
  ok("eval --max-windows 4 --threads 1 --json " + dir + "/tokens.json" + tokens);
  const auto text_eval = nlohmann::json::parse(read_file(dir + "/text.json"));
  const auto token_eval = nlohmann::json::parse(read_file(dir + "/tokens.json"));
  EXPECT_EQ(text_eval["ppl"], token_eval["ppl"]);
  EXPECT_EQ(text_eval["tokens"], token_eval["tokens"]);
  ok("quantize --uniform b4g32 -o " + dir + "/text.pt" + common);
  ok("quantize --uniform b4g32 -o " + dir + "/tokens.pt" + common + tokens);
  EXPECT_EQ(read_file(dir + "/text.pt"), read_file(dir + "/tokens.pt"));
  ok("analyze --calib-windows 4 --subsets 2 --no-static --threads 1 -o " + dir + "/analysis.json" + tokens);
  const auto analysis = nlohmann::json::parse(read_file(dir + "/analysis.json"));
  EXPECT_EQ(analysis["inputs"]["tokens"], dir + "/ids.txt");
  EXPECT_FALSE(analysis["inputs"].contains("text"));

  expect_one_line_error("eval --tokens " + dir + "/ids.txt --text " + test::tinystories_text(),
                        "--tokens replaces --text and --tokenizer");
  expect_one_line_error("quantize -o " + dir + "/q.pt --bos-id 1" + common, "--bos-id goes with --tokens");
  expect_one_line_error("quantize -o " + dir + "/ids.txt" + common + tokens, "ids.txt");  // never over an input
  {
    std::ofstream(dir + "/big.txt") << "1 2 3 600\n";
  }
  expect_one_line_error("eval --tokens " + dir + "/big.txt --threads 1",
                        "token id 600 (token 3 of 4) is not a token of the model: expected ids below its vocabulary (512)");
}

// generate --prompt-ids: the tokenizer's ids of a prompt, with its BOS and EOS, generate the ids whose
// text is what generate prints for the prompt itself.
TEST(Cli, GeneratePromptIdsGivesTheTextsIds) {
  const auto tokenizer = Tokenizer::load_sentencepiece(test::tokenizer_model());
  const std::string prompt = "Once upon a time";
  std::string ids;
  for (const int64_t id : tokenizer->encode(prompt)) ids += (ids.empty() ? "" : " ") + std::to_string(id);
  const std::string common = " --steps 24 --threads 1";
  auto [trc, text] = test::run(test::cli() + " generate --prompt '" + prompt + "'" + common);
  ASSERT_EQ(trc, 0) << text;
  auto [irc, out] = test::run(test::cli() + " generate --prompt-ids '" + ids + "' --bos-id " +
                              std::to_string(tokenizer->bos_id()) + " --eos-id " + std::to_string(tokenizer->eos_id()) +
                              common);
  ASSERT_EQ(irc, 0) << out;
  ASSERT_EQ(out.rfind(ids, 0), 0u) << "the prompt's ids first: " << out;
  const std::vector<int64_t> all = parse_token_ids(out, "output");
  const std::vector<int64_t> generated(all.begin() + static_cast<int64_t>(tokenizer->encode(prompt).size()), all.end());
  EXPECT_FALSE(generated.empty());
  EXPECT_EQ(prompt + tokenizer->decode(generated) + "\n", text);
  expect_one_line_error("generate --prompt-ids '1 2' --prompt x", "--prompt-ids replaces --prompt and --tokenizer");
  expect_one_line_error("generate --eos-id 2", "--bos-id and --eos-id go with --prompt-ids");
  expect_one_line_error("generate --prompt-ids '1 600' --threads 1", "token id 600 (token 1 of 2) is not a token of the model");
}

TEST(Cli, ContextIsCheckedAgainstTheModel) {
  expect_one_line_error("eval --ctx 1024 --threads 1", "--ctx 1024 is longer than the model accepts: its forward works up to 512 tokens");
  expect_one_line_error("quantize --ctx 1024 -o /tmp/x.pt --threads 1", "works up to 512 tokens");
  const std::string dir = test::temp_dir("cli_context");
  test::GptConfig config;  // 128 learned positions
  config.layers = 2;
  test::make_gpt_fixture(config).save(dir + "/gpt.pt");
  expect_one_line_error("eval --model " + dir + "/gpt.pt --ctx 256 --threads 1", "works up to 128 tokens");
  // generate: an explicit --max-context beyond the model fails before any text; the default adapts.
  expect_one_line_error("generate --model " + dir + "/gpt.pt --steps 200 --max-context 512 --no-stop --threads 1",
                        "--max-context 512: generation would feed the model up to 200 tokens, but its forward works up to 128");
  auto [rc, out] = test::run(test::cli() + " generate --model " + dir + "/gpt.pt --steps 200 --no-stop --threads 1");
  EXPECT_EQ(rc, 0) << out;
}

TEST(Cli, PlansAreValidated) {
  const std::string dir = test::temp_dir("cli_plans");
  const std::string common = " --threads 1 --calib-windows 4 --eval-windows 4";
  auto plan = [&](const std::string& name, const std::string& weights) {
    std::ofstream(dir + "/" + name) << R"({"format": "gradq-plan", "version": 1, "weights": [)" << weights << "]}";
    return dir + "/" + name;
  };
  const std::string wq = R"({"name": "layers.0.attention.wq.weight", "spec": "b4g32"})";
  expect_one_line_error("quantize -o " + dir + "/q.pt --plan " +
                            plan("dup.json", wq + R"(, {"name": "layers.0.attention.wq.weight", "spec": "b8g32"})"),
                        "plan lists weight 'layers.0.attention.wq.weight' twice (as b4g32 and as b8g32)");
  expect_one_line_error("quantize -o " + dir + "/q.pt --plan " +
                            plan("level.json", R"({"name": "layers.0.attention.wq.weight", "spec": "b7g32"})"),
                        "bits must be one of 2, 3, 4, 5, 6, 8, got 7");
  const std::string partial = plan("partial.json", wq + R"(, {"name": "tok_embeddings.weight", "spec": "b8g32"})");
  // Checked once the model's weights are known: after loading, before any quantization.
  auto [prc, pout] = test::run(test::cli() + " quantize -o " + dir + "/q.pt --plan " + partial + common);
  EXPECT_EQ(prc, 1) << pout;
  EXPECT_NE(pout.find("error: the plan names 1 of the model's 35 quantizable weights; 34 would stay in floating point"),
            std::string::npos) << pout;
  EXPECT_FALSE(fs::exists(dir + "/q.pt"));
  auto [rc, out] = test::run(test::cli() + " quantize -o " + dir + "/q.pt --allow-partial-plan --plan " + partial + common);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("kept in floating point: 34 of 35 quantizable weights (layers.0.attention.wk.weight"),
            std::string::npos) << out;
  // Both planned weights are counted: the embedding (512 x 64) at 8 bits and wq (64 x 64) at 4.
  EXPECT_NE(out.find("int8          1"), std::string::npos) << out;
  EXPECT_NE(out.find("int4          1"), std::string::npos) << out;
}

// The outputs of a command are one set: a failing output leaves none of the others, stale
// temporaries of killed runs are removed, a live writer of the same output is refused, and the
// summary lists every file written.
TEST(Cli, OutputsAreOneSet) {
  const std::string dir = test::temp_dir("cli_outset");
  const std::string common = " --uniform b4g32 --threads 1 --calib-windows 4 --eval-windows 4 -o " + dir + "/q.pt";
  expect_one_line_error("quantize" + common + " --report /proc/gradq_report.json", "cannot write");
  EXPECT_TRUE(fs::is_empty(dir));

  std::ofstream(dir + "/.q.pt.tmp.999999") << "left by a killed run";
  auto [rc, out] = test::run(test::cli() + " quantize" + common + " --save-plan " + dir + "/plan.json --fake-quant " +
                             dir + "/fq.pt --report " + dir + "/report.json");
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("wrote " + dir + "/q.pt, " + dir + "/fq.pt, " + dir + "/plan.json, " + dir + "/report.json, " +
                     dir + "/report-blocks.svg, " + dir + "/report-levels.svg, " + dir + "/report-formats.svg\n"),
            std::string::npos) << out;
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  EXPECT_EQ(names, (std::set<std::string>{"q.pt", "fq.pt", "plan.json", "report.json", "report-blocks.svg",
                                          "report-levels.svg", "report-formats.svg"}));

  const std::string before = read_file(dir + "/q.pt");
  const int fd = ::open((dir + "/.q.pt.tmp.4242").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);  // another gradq writing q.pt
  expect_one_line_error("quantize" + common, "another process (pid 4242) is writing");
  ::close(fd);
  EXPECT_EQ(read_file(dir + "/q.pt"), before);
}

TEST(Cli, FailedSweepLeavesNoDirectory) {
  const std::string dir = test::temp_dir("cli_sweep_fail");
  test::GptConfig config;
  config.layers = 2;
  test::make_gpt_fixture(config).save(dir + "/gpt.pt");
  expect_one_line_error("sweep --out " + dir + "/sweep --model " + dir + "/gpt.pt --ctx 256 --threads 1",
                        "works up to 128 tokens");
  EXPECT_FALSE(fs::exists(dir + "/sweep"));
}

}  // namespace
}  // namespace gradq
