// Converter tests on the real stories260K checkpoint: golden generation and every way a file can be bad.

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>

#include "common/error.h"
#include "model/causal_lm.h"
#include "model/generate.h"
#include "model/llama2c.h"
#include "support/test_support.h"
#include "tokenizer/tokenizer.h"

namespace gradq {
namespace {
namespace fs = std::filesystem;

// SOURCES.md: greedy decoding from BOS alone for 200 tokens decodes to exactly this.
const char* kGolden =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said, \"Lily, let's go to the "
    "park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your ball, but I can't find "
    "it.\"\nLily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\nLily "
    "didn't want to help her mom, so she";

std::string bytes_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

TEST(Llama2c, ReadsStories260KHeader) {
  Llama2cConfig c;
  load_llama2c(test::stories_bin(), &c);
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.hidden_dim, 172);
  EXPECT_EQ(c.n_layers, 5);
  EXPECT_EQ(c.n_heads, 8);
  EXPECT_EQ(c.n_kv_heads, 4);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.seq_len, 512);
  EXPECT_TRUE(c.shared_classifier);
}

TEST(Llama2c, GreedyGenerationFromSavedTorchScriptMatchesGolden) {
  CausalLM model = CausalLM::load(test::stories_pt());
  auto tok = Tokenizer::load_sentencepiece(test::tokenizer_model());
  GenerateOptions opt;
  opt.steps = 200;
  std::vector<int64_t> ids = generate_greedy(model, {1}, opt);
  ASSERT_EQ(ids.size(), 200u);
  EXPECT_EQ(tok->decode(ids), kGolden);
}

TEST(Llama2c, ParameterNamesAndShapes) {
  CausalLM model = CausalLM::load(test::stories_pt());
  EXPECT_EQ(model.vocab_size(), 512);
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& p : model.module().named_parameters(true)) shapes[p.name] = p.value.sizes().vec();
  EXPECT_EQ(shapes.at("tok_embeddings.weight"), (std::vector<int64_t>{512, 64}));
  EXPECT_EQ(shapes.at("layers.4.attention.wk.weight"), (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(shapes.at("layers.0.feed_forward.w2.weight"), (std::vector<int64_t>{64, 172}));
  EXPECT_EQ(shapes.at("norm.weight"), (std::vector<int64_t>{64}));
  EXPECT_EQ(shapes.count("output.weight"), 0u);  // tied classifier
  EXPECT_EQ(shapes.size(), 1u + 5u * 9u + 1u);
}

TEST(Llama2c, UntiedCheckpointGetsOutputHead) {
  // Flip the vocab sign and append a classifier after the RoPE tables: the untied layout.
  const std::string dir = test::temp_dir("untied");
  std::string bytes = bytes_of(test::stories_bin());
  int32_t vocab = -512;
  std::memcpy(&bytes[5 * 4], &vocab, 4);
  std::string classifier(512 * 64 * 4, '\0');
  std::vector<float> w(512 * 64);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.001f * static_cast<float>(i % 97);
  std::memcpy(classifier.data(), w.data(), classifier.size());
  write_bytes(dir + "/untied.bin", bytes + classifier);
  Llama2cConfig c;
  torch::jit::Module m = load_llama2c(dir + "/untied.bin", &c);
  EXPECT_FALSE(c.shared_classifier);
  CausalLM lm(m);
  EXPECT_TRUE(at::equal(lm.parameter("output.weight"), at::from_blob(w.data(), {512, 64}, at::kFloat)));
  EXPECT_EQ(lm.matrix_weights().back().name, "output.weight");
  EXPECT_EQ(lm.matrix_weights().back().role, WeightRole::kHead);
}

struct BadFile {
  std::string name;
  std::function<std::string(std::string)> mutate;
  std::string message;
};

class Llama2cBadFile : public ::testing::TestWithParam<BadFile> {};

TEST_P(Llama2cBadFile, ClearErrorAndNoOutput) {
  const std::string dir = test::temp_dir("bad_" + GetParam().name);
  write_bytes(dir + "/in.bin", GetParam().mutate(bytes_of(test::stories_bin())));
  try {
    convert_llama2c(dir + "/in.bin", dir + "/out.pt");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(GetParam().message), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir + "/out.pt"));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);  // no temp files left
}

std::string set_header(std::string b, int field, int32_t value) {
  b.replace(field * 4, 4, reinterpret_cast<const char*>(&value), 4);
  return b;
}

INSTANTIATE_TEST_SUITE_P(
    Files, Llama2cBadFile,
    ::testing::Values(
        BadFile{"empty", [](std::string) { return std::string(); }, "truncated"},
        BadFile{"header_only", [](std::string b) { return b.substr(0, 28); }, "truncated"},
        BadFile{"truncated", [](std::string b) { return b.substr(0, b.size() - 1000); }, "truncated"},
        BadFile{"oversized", [](std::string b) { return b + std::string(4096, '\0'); }, "oversized"},
        BadFile{"heads_not_dividing_dim", [](std::string b) { return set_header(b, 3, 7); }, "not divisible by n_heads"},
        BadFile{"kv_heads", [](std::string b) { return set_header(b, 4, 3); }, "multiple of n_kv_heads"},
        BadFile{"negative_layers", [](std::string b) { return set_header(b, 2, -5); }, "n_layers = -5"},
        BadFile{"huge_dim", [](std::string b) { return set_header(b, 0, 1 << 30); }, "dim = 1073741824"},
        BadFile{"nan_weight",
                [](std::string b) {
                  const float nan = std::nanf("");
                  b.replace(28 + 4 * 1000, 4, reinterpret_cast<const char*>(&nan), 4);
                  return b;
                },
                "non-finite"}),
    [](const auto& info) { return info.param.name; });

TEST(Llama2c, MissingFileAndOutputOverInput) {
  EXPECT_THROW(load_llama2c("/nonexistent/x.bin"), Error);
  const std::string dir = test::temp_dir("same");
  write_bytes(dir + "/m.bin", bytes_of(test::stories_bin()));
  EXPECT_THROW(convert_llama2c(dir + "/m.bin", dir + "/m.bin"), Error);
  EXPECT_TRUE(bytes_of(dir + "/m.bin") == bytes_of(test::stories_bin()));
}

// The reader converts each tensor as it copies it out of the file (no float32 copy of the model): the
// parameters are those of the float32 module converted afterwards.
TEST(Llama2c, ReadingInADtypeEqualsConvertingTheFloat32Module) {
  torch::jit::Module f32 = load_llama2c(test::stories_bin());
  for (at::ScalarType dtype : {at::kHalf, at::kBFloat16}) {
    torch::jit::Module direct = load_llama2c(test::stories_bin(), nullptr, dtype);
    torch::jit::Module converted = f32.clone();
    converted.to(dtype);
    std::map<std::string, at::Tensor> expected;
    for (const auto& p : converted.named_parameters()) expected[p.name] = p.value;
    size_t n = 0;
    for (const auto& p : direct.named_parameters()) {
      ASSERT_TRUE(expected.count(p.name)) << p.name;
      EXPECT_EQ(p.value.scalar_type(), dtype) << p.name;
      EXPECT_TRUE(at::equal(p.value, expected.at(p.name))) << p.name << " in " << c10::toString(dtype);
      ++n;
    }
    EXPECT_EQ(n, expected.size());
  }
}

// A finite float32 weight beyond float16's largest value (65504) would become infinite: the fp16
// conversion refuses it naming the weight, bfloat16 (float32's range) takes it.
TEST(Llama2c, WeightBeyondFloat16RangeIsRefusedInFp16Only) {
  const std::string dir = test::temp_dir("fp16_range");
  std::string bytes = bytes_of(test::stories_bin());
  const float big = 1e5f;
  bytes.replace(28 + 4 * 1000, 4, reinterpret_cast<const char*>(&big), 4);  // in tok_embeddings
  write_bytes(dir + "/in.bin", bytes);
  try {
    convert_llama2c(dir + "/in.bin", dir + "/out.pt", at::kHalf);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("weight 'tok_embeddings.weight' has values beyond float16's range (largest "
                                         "magnitude 100000)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(fs::exists(dir + "/out.pt"));
  convert_llama2c(dir + "/in.bin", dir + "/out.pt", at::kBFloat16);
  EXPECT_TRUE(fs::exists(dir + "/out.pt"));
}

TEST(Llama2c, ConversionIsDeterministic) {
  const std::string dir = test::temp_dir("determinism");
  convert_llama2c(test::stories_bin(), dir + "/a.pt");
  convert_llama2c(test::stories_bin(), dir + "/b.pt");
  EXPECT_TRUE(bytes_of(dir + "/a.pt") == bytes_of(dir + "/b.pt"));
}

}  // namespace
}  // namespace gradq
