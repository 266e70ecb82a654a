// Every gradq command on every model of the user-style zoo (tests/zoo/README.md, tools/make_zoo.py):
// models scripted and traced from plain nn.Modules, with Meta, Hugging Face and GPT-2 names, in fp32,
// fp16 and bf16. The packed output must load in a plain libtorch program, keep the model's dtype, and
// compute the fake-quant export's logits within a tolerance derived from that dtype.

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "common/error.h"
#include "common/files.h"
#include "model/causal_lm.h"
#include "model/graph_utils.h"
#include "support/test_support.h"

namespace gradq {
namespace {
namespace fs = std::filesystem;

struct ZooModel {
  const char* name;
  at::ScalarType dtype;             // of its parameters in the file
  const char* folder = "models";  // under tests/zoo
};

const ZooModel kZoo[] = {
    {"gpt2_script", at::kFloat},         {"gpt2_tied_trace_bf16", at::kBFloat16},
    {"meta_swiglu_gqa_trace", at::kFloat}, {"meta_bias_gelu_fp16", at::kHalf},
    {"hf_llama_tied_bf16", at::kBFloat16}, {"hf_qkv_bias_trace_fp16", at::kHalf},
};

// Hugging Face transformers' own classes, traced (tools/make_hf_zoo.py): their forwards return a
// tuple, a dict or the logits.
const ZooModel kHuggingFaceZoo[] = {
    {"hf_llama_tuple_bf16", at::kBFloat16, "models_hf"},     {"hf_qwen2_tied_dict", at::kFloat, "models_hf"},
    {"hf_gpt2_tuple", at::kFloat, "models_hf"},              {"hf_phi3_fused_tensor", at::kFloat, "models_hf"},
    {"hf_gemma_tied_dict_bf16", at::kBFloat16, "models_hf"}, {"hf_opt_tuple", at::kFloat, "models_hf"},
};

std::string zoo_path(const std::string& name, const std::string& folder = "models") {
  return std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/zoo/" + folder + "/" + name + ".pt";
}
std::string zoo_path(const ZooModel& z) { return zoo_path(z.name, z.folder); }

// Small data options shared by every command: a few short windows keep each model to seconds.
const std::string kData = " --threads 1 --ctx 64";
const std::string kQuantizeData = kData + " --calib-windows 4 --eval-windows 4";

// Parameters and buffers by name with their dtypes, as the file holds them.
std::map<std::string, at::ScalarType> tensor_dtypes(const torch::jit::Module& m) {
  std::map<std::string, at::ScalarType> out;
  for (const auto& p : m.named_parameters(true)) out[p.name] = p.value.scalar_type();
  for (const auto& b : m.named_buffers(true)) out[b.name] = b.value.scalar_type();
  return out;
}

// Logits in float64 of the model as a CPU consumer runs it: fp16 modules converted to float32 first.
at::Tensor consumer_logits(const std::string& path, const at::Tensor& tokens) {
  torch::jit::Module m = torch::jit::load(path);
  m.eval();
  bool half = false;
  for (const auto& p : m.named_parameters(true)) half = half || p.value.scalar_type() == at::kHalf;
  // Floating tensors only (Module::to would convert a packed model's codes too).
  auto to_float = [&](at::Tensor t) {
    if (half && t.is_floating_point()) t.set_data(t.to(at::kFloat));
  };
  for (const auto& p : m.named_parameters(true)) to_float(p.value);
  for (const auto& b : m.named_buffers(true)) to_float(b.value);
  c10::InferenceMode guard;
  return logits_of(m.forward({tokens})).to(at::kDouble);
}

double epsilon(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return std::ldexp(1.0, -10);
    case at::kBFloat16: return std::ldexp(1.0, -7);
    default: return std::ldexp(1.0, -23);
  }
}

class Zoo : public ::testing::TestWithParam<ZooModel> {};

// Loads with gradq's adapter: the model's dtype is found and its matrix weights are quantizable.
TEST_P(Zoo, AdapterFindsWeightsAndDtype) {
  const ZooModel& z = GetParam();
  CausalLM model = CausalLM::load(zoo_path(z));
  EXPECT_EQ(model.dtype(), z.dtype);
  EXPECT_EQ(model.vocab_size(), 512);
  EXPECT_GE(model.blocks().size(), 2u);
  EXPECT_GE(model.weights().size(), 2 * model.blocks().size());
  for (const BlockInfo& b : model.blocks()) EXPECT_GE(b.weights.size(), 4u) << b.name;
  // Its forward splits into stages, whatever container it returns the logits in.
  EXPECT_NE(model.stages(), nullptr) << model.stages_unavailable_reason();
  // fp16 is computed in float32 on the CPU; everything else in its own dtype.
  const at::Tensor w = model.parameter(model.weights().front().name);
  EXPECT_EQ(w.scalar_type(), z.dtype == at::kHalf ? at::kFloat : z.dtype);
  EXPECT_EQ(model.stored_dtype(model.weights().front().name, w.scalar_type()), z.dtype);
}

TEST_P(Zoo, EveryCommand) {
  const ZooModel& z = GetParam();
  const std::string model = zoo_path(z);
  const std::string dir = test::temp_dir(std::string("zoo_") + z.name);
  auto ok = [](const std::string& command) {
    auto [rc, out] = test::run(command);
    EXPECT_EQ(rc, 0) << command << "\n" << out;
    return out;
  };
  const std::string cli = test::cli();

  ok(cli + " analyze --model " + model + " --calib-windows 4 --subsets 2 -o " + dir + "/analysis.json" + kData);
  EXPECT_TRUE(fs::exists(dir + "/analysis.json"));

  // A perplexity budget: the search then also takes gradients through the model's stages (its
  // first-order prices), which met inference-mode tensors inside Hugging Face layers' tuple inputs.
  ok(cli + " quantize --model " + model + " --max-ppl-increase 0.05 -o " + dir +
     "/search.pt --fake-quant " + dir + "/search_fq.pt" + kQuantizeData);
  ok(cli + " quantize --model " + model + " --uniform b4g32 -o " + dir + "/q.pt --fake-quant " + dir + "/fq.pt" +
     kQuantizeData);
  EXPECT_LT(fs::file_size(dir + "/q.pt"), fs::file_size(model));

  const std::string prompt = " --prompt 'Once upon a time' --steps 8 --no-stop --threads 1";
  for (const std::string& file : {model, dir + "/q.pt"}) {
    const std::string out = ok(cli + " generate --model " + file + prompt);
    EXPECT_GT(out.size(), std::string("Once upon a time").size() + 4) << file << ": " << out;
  }
  // One eval covers the model (the reference) and the packed file.
  ok(cli + " eval --model " + dir + "/q.pt --reference " + model + " --max-windows 4 --json " + dir + "/eval.json" + kData);
  const auto eval = nlohmann::json::parse(read_file(dir + "/eval.json"));
  for (const char* key : {"ppl", "reference_ppl"}) {
    const double ppl = eval[key]["value"].get<double>();
    EXPECT_TRUE(std::isfinite(ppl) && ppl > 1.0) << key << " " << ppl;
  }
  EXPECT_GT(eval["kl"]["mean"]["value"].get<double>(), 0.0);  // 4-bit weights change the outputs

  // A plain libtorch program runs the packed files once the op library is loaded.
  const std::string load_check = std::string(GRADQ_TEST_LOAD_CHECK) + (z.dtype == at::kHalf ? " --float " : " ");
  for (const char* file : {"q.pt", "search.pt"}) {
    const std::string out = ok(load_check + dir + "/" + file + " " + GRADQ_TEST_OPS_LIBRARY);
    EXPECT_NE(out.find("logits [2, 8, 512]"), std::string::npos) << out;
  }

  // Both exports keep every tensor of the model in its own dtype (a quantized weight is replaced by
  // codes and scales in the packed file, so only the names it shares with the model are compared).
  const auto original = tensor_dtypes(torch::jit::load(model));
  for (const char* file : {"fq.pt", "q.pt", "search_fq.pt", "search.pt"}) {
    const auto written = tensor_dtypes(torch::jit::load(dir + "/" + file));
    int64_t compared = 0;
    for (const auto& [name, dtype] : original) {
      auto it = written.find(name);
      if (it == written.end()) continue;
      EXPECT_EQ(it->second, dtype) << file << ": " << name;
      ++compared;
    }
    EXPECT_GT(compared, 4) << file;
  }

  // The packed model computes what the fake-quant model computes. Both round the same weights once
  // to the model's dtype (the packed one at its linear outputs, the fake-quant one in its weights),
  // so they agree to a few roundings per layer: tolerance 2 * layers * eps(dtype) * max |logit|
  // (measured: at most 0.29 of it, bf16 Hugging Face Llama; 0 where every quantized weight is read
  // through gradq::dequantize, as GPT-2's Conv1D is).
  CausalLM adapter = CausalLM::load(model);
  const auto layers = static_cast<double>(adapter.blocks().size());
  const at::Tensor tokens = ((at::arange(96, at::kLong) * 37 + 11) % 511 + 1).view({2, 48});
  for (const auto& [packed, fake] : {std::pair{"q.pt", "fq.pt"}, std::pair{"search.pt", "search_fq.pt"}}) {
    const at::Tensor a = consumer_logits(dir + "/" + packed, tokens);
    const at::Tensor b = consumer_logits(dir + "/" + fake, tokens);
    ASSERT_EQ(a.sizes(), b.sizes());
    const double scale = b.abs().max().item<double>();
    ASSERT_GT(scale, 0.0);
    const double tolerance = 2.0 * layers * epsilon(z.dtype) * scale;
    const double err = (a - b).abs().max().item<double>();
    EXPECT_LE(err, tolerance) << packed << " vs " << fake << " (max |logit| " << scale << ")";
  }
}

INSTANTIATE_TEST_SUITE_P(UserModels, Zoo, ::testing::ValuesIn(kZoo),
                         [](const ::testing::TestParamInfo<ZooModel>& info) { return std::string(info.param.name); });
INSTANTIATE_TEST_SUITE_P(HuggingFace, Zoo, ::testing::ValuesIn(kHuggingFaceZoo),
                         [](const ::testing::TestParamInfo<ZooModel>& info) { return std::string(info.param.name); });

// An fp16 Hugging Face model traced on a CPU makes its attention masks in fp16 inside the trace;
// gradq computes fp16 models in float32 on a CPU, so it refuses the model in one line that says why
// and what to do instead of failing somewhere in the search.
TEST(ZooHuggingFace, Fp16TraceOnCpuIsRefusedInOneLine) {
  const std::string command =
      test::cli() + " eval --model " + zoo_path("hf_gpt2_fp16_cpu_refused", "models_hf") + " --max-windows 2" + kData;
  auto [rc, out] = test::run(command);
  EXPECT_EQ(rc, 1) << command << "\n" << out;
  EXPECT_NE(out.find("forward fails on int64 tokens"), std::string::npos) << out;
  EXPECT_NE(out.find("save the model in float32 or bf16, or run it on a GPU"), std::string::npos) << out;
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << "expected one line, got:\n" << out;
}

// Files written by PyTorch 2.x (models_torch2/, PyTorch 2.11; tests/zoo/README.md), on either libtorch
// line. make_zoo.py's models saved by 2.11 hold the same weights as those of models/ (saved by 1.13)
// and must give gradq the same logits.
std::string torch2_path(const std::string& name) {
  return std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/zoo/models_torch2/" + name + ".pt";
}

TEST(ZooTorch2, ScriptedAndTracedFilesGiveTheLogitsOfThe113Files) {
  const at::Tensor tokens = ((at::arange(96, at::kLong) * 37 + 11) % 511 + 1).view({2, 48});
  for (const char* name : {"hf_llama_tied_bf16", "gpt2_tied_trace_bf16"}) {
    SCOPED_TRACE(name);
    const at::Tensor want = CausalLM::load(zoo_path(name)).logits(tokens);
    const at::Tensor got = CausalLM::load(torch2_path(name)).logits(tokens);
    ASSERT_EQ(got.sizes(), want.sizes());
    EXPECT_TRUE(at::equal(got, want)) << "max difference " << (got - want).abs().max().item<double>();
    EXPECT_GT(got.abs().max().item<double>(), 0.0);
  }
}

// sdpa_script.pt calls aten::scaled_dot_product_attention, which PyTorch 2.0 introduced: gradq runs
// it on the 2.x line and, on the 1.13 line, refuses it in one line that names the version problem.
TEST(ZooTorch2, OpOfPyTorch2RunsOrFailsNamingTheVersion) {
  const std::string command = test::cli() + " eval --model " + torch2_path("sdpa_script") + " --max-windows 2" + kData;
  auto [rc, out] = test::run(command);
  if (TORCH_VERSION_MAJOR >= 2) {
    EXPECT_EQ(rc, 0) << command << "\n" << out;
    EXPECT_NE(out.find("PPL"), std::string::npos) << out;
  } else {
    EXPECT_EQ(rc, 1) << command << "\n" << out;
    EXPECT_NE(out.find("written by PyTorch 2.x and this gradq is built against libtorch 1.13"), std::string::npos)
        << out;
    EXPECT_NE(out.find("scaled_dot_product_attention"), std::string::npos) << out;  // what 1.13 lacks
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << "expected one line, got:\n" << out;
  }
}

// CausalLM::load from a stream (what fuzz_torchscript calls) shares the file load's error path: on
// the 1.13 line it too must tell a PyTorch 2.x file apart, which rereads the stream after the failed load.
TEST(ZooTorch2, StreamLoadRunsOrFailsNamingTheVersion) {
  const std::string path = torch2_path("sdpa_script");
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in) << path;
  if (TORCH_VERSION_MAJOR >= 2) {
    const CausalLM model = CausalLM::load(in, path);
    EXPECT_GT(model.logits(at::ones({1, 4}, at::kLong)).abs().max().item<double>(), 0.0);
    return;
  }
  try {
    CausalLM::load(in, path);
    FAIL() << "loaded " << path << " on libtorch 1.x";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("written by PyTorch 2.x and this gradq is built against libtorch 1.13"), std::string::npos) << msg;
    EXPECT_NE(msg.find("scaled_dot_product_attention"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace gradq
