// Packed and fake-quant export on stories260K and the GPT-style fixture: the packed file really
// runs (in gradq and in a plain libtorch program once the op library is loaded), computes what the
// fake-quant model computes, and is as small as the accounting says.

#include <caffe2/serialize/inline_container.h>
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>

#include "common/files.h"
#include "export/export.h"
#include "model/causal_lm.h"
#include "optimizer/plan.h"
#include "support/gpt_fixture.h"
#include "support/test_helpers.h"
#include "support/test_support.h"

namespace gradq {
namespace {
namespace fs = std::filesystem;
using test::bitwise_equal;

at::Tensor sample_tokens(int64_t rows, int64_t cols, int64_t vocab, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randint(1, vocab, {rows, cols}, gen, at::kLong);
}

// The model with every weight of `q` set to its dequantized values: what the search evaluates.
at::Tensor fake_quant_logits(CausalLM& model, const QuantizedWeights& q, const at::Tensor& tokens) {
  for (const auto& [name, t] : q) model.set_weight(name, t.dequantize());
  at::Tensor logits = model.logits(tokens);
  model.restore_all();
  return logits;
}

int64_t parameter_bytes(const torch::jit::Module& m) {
  int64_t bytes = 0;
  for (const auto& p : m.named_parameters()) bytes += p.value.nbytes();
  for (const auto& b : m.named_buffers()) bytes += b.value.nbytes();
  return bytes;
}

// Bytes of the tensor storages in a TorchScript archive (its data/ records).
int64_t archive_data_bytes(const std::string& path) {
  caffe2::serialize::PyTorchStreamReader reader(path);
  int64_t bytes = 0;
  for (const std::string& record : reader.getAllRecords())
    if (record.rfind("data/", 0) == 0) bytes += static_cast<int64_t>(std::get<1>(reader.getRecord(record)));
  return bytes;
}

class PackedExport : public ::testing::TestWithParam<std::string> {};

// At each spec, on stories260K: the packed file loads, its logits equal the fake-quant model's
// bit for bit for batched input (gradq::linear dequantizes and calls the same GEMM) and within a
// float-summation tolerance for single-token decode (fused loop), and the file shrinks by exactly
// the bytes the accounting predicts, up to the zip records of the added tensors.
TEST_P(PackedExport, StoriesLogitsAndSizeMatchTheAccounting) {
  CausalLM model = CausalLM::load(test::stories_pt());
  const QuantSpec spec = parse_quant_spec(GetParam());
  const Plan plan = uniform_plan(model, spec, RoundingMethod::kRtn);
  const QuantizedWeights q = apply_plan(model, plan);
  const std::string dir = test::temp_dir("export_" + GetParam());
  const std::string path = dir + "/packed.pt";
  export_packed(model, q, path);

  CausalLM packed = CausalLM::load(path);
  EXPECT_TRUE(packed.weights().empty()) << "every quantizable weight should be stored packed";
  const at::Tensor batch = sample_tokens(3, 40, model.vocab_size(), 1);
  const at::Tensor expected = fake_quant_logits(model, q, batch);
  EXPECT_TRUE(bitwise_equal(packed.logits(batch), expected));
  EXPECT_FALSE(bitwise_equal(model.logits(batch), expected)) << "quantization changed nothing";
  const at::Tensor one = batch.slice(0, 0, 1).slice(1, 0, 1);
  const at::Tensor decode = packed.logits(one), decode_expected = fake_quant_logits(model, q, one);
  const double tol = 1e-5 * decode_expected.abs().max().item<double>();
  EXPECT_LE((decode - decode_expected).abs().max().item<double>(), tol);

  // The tensor data in the archive shrinks by exactly the accounting: fp32 weights out, their
  // packed storage in. The rest of the file (zip records, the inlined forward's code, which is
  // larger than the original's per-module code) is a fixed overhead reported here.
  int64_t fp32 = 0, stored = 0;
  for (const auto& [name, t] : q) {
    fp32 += 4 * t.out_features * t.in_features;
    stored += t.storage_bytes();
  }
  EXPECT_EQ(archive_data_bytes(path), archive_data_bytes(test::stories_pt()) - fp32 + stored);
  EXPECT_EQ(parameter_bytes(torch::jit::load(path)), parameter_bytes(model.module()) - fp32 + stored);
  const auto original_size = static_cast<int64_t>(fs::file_size(test::stories_pt()));
  const auto packed_size = static_cast<int64_t>(fs::file_size(path));
  std::cout << fmt::format("{}: file {} -> {} bytes; predicted saving {} bytes, actual {} ({:.1f}%)\n", GetParam(),
                           original_size, packed_size, fp32 - stored, original_size - packed_size,
                           100.0 * (original_size - packed_size) / (fp32 - stored));
  EXPECT_GT(original_size - packed_size, 0.9 * (fp32 - stored));
}

// b4g32k6: fp16 super-scales, which gradq must not hold in float32 when it loads the packed file.
INSTANTIATE_TEST_SUITE_P(Specs, PackedExport, ::testing::Values("b4g128", "b8g128", "b6g32", "b5g128", "b3g32s", "b2g64-f32", "b4g32k6"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

TEST(PackedExportMixed, EveryLevelOfTheLadderInOneModel) {
  AdapterOptions with_embedding;
  with_embedding.include = {"tok_embeddings"};
  CausalLM model = CausalLM::load(test::stories_pt(), with_embedding);
  Plan plan;
  const std::vector<std::string> specs = {"b4g32", "b8grow", "b2g16", "b3g64s", "b5g16s",
                                          "b6g64", "fp16",   "bf16",  "prune",  "fp32"};
  size_t i = 0;
  for (const WeightInfo& w : model.weights()) plan.entries.push_back({w.name, parse_quant_spec(specs[i++ % specs.size()])});
  ASSERT_EQ(model.weights().front().role, WeightRole::kEmbedding) << "the tied embedding/head should be included";
  const QuantizedWeights q = apply_plan(model, plan);
  const std::string path = test::temp_dir("export_mixed") + "/packed.pt";
  export_packed(model, q, path);
  CausalLM packed = CausalLM::load(path);
  const at::Tensor batch = sample_tokens(2, 33, model.vocab_size(), 2);
  EXPECT_TRUE(bitwise_equal(packed.logits(batch), fake_quant_logits(model, q, batch)));
  // Stored types: fp16/bf16 weights in their own type, prune as one broadcast element.
  torch::jit::Module loaded = torch::jit::load(path);
  for (const PlanEntry& e : plan.entries) {
    if (e.spec.level == QuantLevel::kFp16 || e.spec.level == QuantLevel::kBf16 || e.spec.level == QuantLevel::kPrune) {
      at::Tensor stored;
      for (const auto& b : loaded.named_buffers())
        if (b.name == e.name) stored = b.value;
      ASSERT_TRUE(stored.defined()) << e.name;
      if (e.spec.level == QuantLevel::kPrune) {
        EXPECT_EQ(stored.storage().nbytes(), 4u) << e.name;
      } else {
        EXPECT_EQ(stored.scalar_type(), e.spec.level == QuantLevel::kFp16 ? at::kHalf : at::kBFloat16) << e.name;
      }
    }
  }
}

// A scripted Python model (tests/zoo) in bf16: nn.Linear(bias=False) declares a parameter slot that
// holds None (issue 13: export failed with "Expected Tensor but got None"), and every level of the
// ladder reads back in bf16, so the packed model computes what the fake-quant model computes up to
// bf16 rounding (2 roundings per layer).
TEST(PackedExportMixed, EveryLevelInABfloat16ScriptedModelWithNoneBiases) {
  CausalLM model = CausalLM::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/zoo/models/hf_llama_tied_bf16.pt");
  ASSERT_EQ(model.dtype(), at::kBFloat16);
  Plan plan;
  const std::vector<std::string> specs = {"b4g32", "b8grow", "b2g16", "b3g64s", "b5g16s",
                                          "b6g64", "fp16",   "bf16",  "prune",  "fp32"};
  size_t i = 0;
  for (const WeightInfo& w : model.weights()) plan.entries.push_back({w.name, parse_quant_spec(specs[i++ % specs.size()])});
  ASSERT_GE(plan.entries.size(), specs.size());
  const QuantizedWeights q = apply_plan(model, plan);
  const std::string path = test::temp_dir("export_bf16") + "/packed.pt";
  export_packed(model, q, path);
  torch::jit::Module loaded = torch::jit::load(path);
  const torch::jit::Module head = loaded.attr("lm_head").toModule();
  EXPECT_TRUE(head.attr("bias").isNone());
  EXPECT_TRUE(head.type()->is_parameter(head.type()->getAttributeSlot("bias")));
  // Unquantized tensors keep bf16; each weight that is read back carries its dtype in <name>_dtype.
  for (const auto& p : loaded.named_parameters()) EXPECT_EQ(p.value.scalar_type(), at::kBFloat16) << p.name;
  int64_t dtype_buffers = 0;
  for (const auto& b : loaded.named_buffers()) {
    if (b.name.size() < 6 || b.name.compare(b.name.size() - 6, 6, "_dtype") != 0) continue;
    EXPECT_EQ(b.value.scalar_type(), at::kBFloat16) << b.name;
    EXPECT_EQ(b.value.numel(), 0) << b.name;
    ++dtype_buffers;
  }
  EXPECT_EQ(dtype_buffers, static_cast<int64_t>(plan.entries.size()) -
                               std::count_if(plan.entries.begin(), plan.entries.end(),
                                             [](const PlanEntry& e) { return e.spec.level == QuantLevel::kPrune; }));
  CausalLM packed = CausalLM::load(path);
  const at::Tensor batch = sample_tokens(2, 33, model.vocab_size(), 5);
  const at::Tensor want = fake_quant_logits(model, q, batch);
  const at::Tensor got = packed.logits(batch);
  const double scale = want.abs().max().item<double>();
  ASSERT_GT(scale, 0.0);
  const double tolerance = 2.0 * static_cast<double>(model.blocks().size()) * std::ldexp(1.0, -7) * scale;
  EXPECT_LE((got - want).abs().max().item<double>(), tolerance);
  EXPECT_GT((got - want).abs().max().item<double>(), 0.0);  // bf16 reads really differ from float32 ones
}

TEST(PackedExport, ConvOneDWeightsOfTheGptFixture) {
  CausalLM model(test::make_gpt_fixture());
  const QuantizedWeights q = apply_plan(model, uniform_plan(model, parse_quant_spec("b4g16"), RoundingMethod::kRtn));
  const std::string path = test::temp_dir("export_gpt") + "/packed.pt";
  export_packed(model, q, path);
  CausalLM packed = CausalLM::load(path);
  const at::Tensor batch = sample_tokens(2, 24, model.vocab_size(), 3);
  EXPECT_TRUE(bitwise_equal(packed.logits(batch), fake_quant_logits(model, q, batch)));
}

// A scripted forward with a defaulted input beside the tokens: the packed forward keeps the input and
// its default, so gradq (which calls forward(tokens)) and any caller load and run it as they did the model.
TEST(PackedExport, KeepsTheForwardsArgumentNamesAndDefaults) {
  torch::jit::Module wrapper = test::make_gpt_fixture_with_defaulted_inputs();
  CausalLM model(wrapper);
  const QuantizedWeights q = apply_plan(model, uniform_plan(model, parse_quant_spec("b4g16"), RoundingMethod::kRtn));
  const std::string path = test::temp_dir("export_defaults") + "/packed.pt";
  export_packed(model, q, path);
  torch::jit::Module loaded = torch::jit::load(path);
  const c10::FunctionSchema& schema = loaded.get_method("forward").function().getSchema();
  ASSERT_EQ(schema.arguments().size(), 4u);
  EXPECT_EQ(schema.arguments()[2].name(), "attention_mask");
  ASSERT_TRUE(schema.arguments()[2].default_value().has_value());
  EXPECT_TRUE(schema.arguments()[2].default_value()->isNone());
  EXPECT_EQ(schema.arguments()[3].name(), "scale");
  ASSERT_TRUE(schema.arguments()[3].default_value().has_value());
  EXPECT_EQ(schema.arguments()[3].default_value()->toDouble(), 1.0);
  const at::Tensor batch = sample_tokens(2, 24, model.vocab_size(), 3);
  EXPECT_TRUE(bitwise_equal(CausalLM::load(path).logits(batch), fake_quant_logits(model, q, batch)));
  const at::Tensor half_mask = (at::arange(24, at::kLong) % 2).view({1, 24}).expand({2, 24}).to(at::kFloat);
  c10::InferenceMode guard;
  EXPECT_EQ(loaded.forward({batch, half_mask}).toTensor().select(1, 0).abs().max().item<double>(), 0.0);
}

TEST(PackedExport, SameInputsSameBytes) {
  CausalLM model = CausalLM::load(test::stories_pt());
  const QuantizedWeights q = apply_plan(model, uniform_plan(model, parse_quant_spec("b4g32"), RoundingMethod::kRtn));
  const std::string dir = test::temp_dir("export_bytes");
  export_packed(model, q, dir + "/a.pt");
  export_packed(model, q, dir + "/b.pt");
  EXPECT_EQ(read_file(dir + "/a.pt"), read_file(dir + "/b.pt"));
}

// A libtorch program without gradq: the packed file fails to load with a message naming the
// missing op, and runs once libgradq_ops is loaded; the fake-quant file needs nothing.
TEST(PackedExport, LoadsInAPlainLibtorchProgramOnlyWithTheOpLibrary) {
  CausalLM model = CausalLM::load(test::stories_pt());
  const QuantizedWeights q = apply_plan(model, uniform_plan(model, parse_quant_spec("b4g64"), RoundingMethod::kRtn));
  const std::string dir = test::temp_dir("export_plain");
  export_packed(model, q, dir + "/packed.pt");
  export_fake_quant(model, q, dir + "/fake.pt");

  const std::string check = GRADQ_TEST_LOAD_CHECK;
  auto [rc_without, out_without] = test::run(check + " " + dir + "/packed.pt");
  EXPECT_NE(rc_without, 0);
  EXPECT_NE(out_without.find("gradq::linear"), std::string::npos) << out_without;
  auto [rc_with, out_with] = test::run(check + " " + dir + "/packed.pt " + GRADQ_TEST_OPS_LIBRARY);
  EXPECT_EQ(rc_with, 0) << out_with;
  auto [rc_fake, out_fake] = test::run(check + " " + dir + "/fake.pt");
  EXPECT_EQ(rc_fake, 0) << out_fake;
  // Both print the logits of the same 2 x 8 tokens; batched, they agree bit for bit.
  EXPECT_EQ(out_with, out_fake);
}

TEST(FakeQuantExport, OriginalGraphWithDequantizedWeightsAndModelUnchanged) {
  CausalLM model = CausalLM::load(test::stories_pt());
  const at::Tensor batch = sample_tokens(2, 20, model.vocab_size(), 4);
  const at::Tensor before = model.logits(batch);
  const QuantizedWeights q = apply_plan(model, uniform_plan(model, parse_quant_spec("b3g32"), RoundingMethod::kRtn));
  const std::string path = test::temp_dir("export_fake") + "/fake.pt";
  export_fake_quant(model, q, path);
  EXPECT_TRUE(bitwise_equal(model.logits(batch), before));
  CausalLM fake = CausalLM::load(path);
  EXPECT_EQ(fake.weights().size(), model.weights().size());
  EXPECT_TRUE(bitwise_equal(fake.logits(batch), fake_quant_logits(model, q, batch)));
}

TEST(ExportErrors, NamesAndShapesAreChecked) {
  CausalLM model = CausalLM::load(test::stories_pt());
  QuantizedWeights q;
  q["layers.0.nope.weight"] = quantize_tensor(at::zeros({4, 4}), parse_quant_spec("b4g16"));
  const std::string dir = test::temp_dir("export_errors");
  EXPECT_NE(test::expect_error([&] { export_packed(model, q, dir + "/x.pt"); }).find("not a matrix weight"), std::string::npos);
  q.clear();
  q[model.weights()[0].name] = quantize_tensor(at::zeros({4, 4}), parse_quant_spec("b4g16"));
  EXPECT_NE(test::expect_error([&] { export_packed(model, q, dir + "/x.pt"); }).find("quantized as [4, 4]"), std::string::npos);
  EXPECT_FALSE(fs::exists(dir + "/x.pt"));
}

}  // namespace
}  // namespace gradq
