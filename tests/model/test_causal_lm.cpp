// Adapter tests, each run on both fixtures: stories260K (converted llama2.c) and the GPT-style model.

#include <gtest/gtest.h>

#include "common/error.h"
#include "model/causal_lm.h"
#include "support/gpt_fixture.h"
#include "support/test_support.h"

namespace gradq {
namespace {

enum class Fixture { kStories, kGpt };

CausalLM make(Fixture f, const AdapterOptions& options = {}) {
  if (f == Fixture::kStories) return CausalLM::load(test::stories_pt(), options);
  return CausalLM(test::make_gpt_fixture(), options);
}

at::Tensor sample_tokens(int64_t rows, int64_t len, uint64_t seed = 7) {
  at::Generator g = at::detail::createCPUGenerator(seed);
  return at::randint(3, 512, {rows, len}, g, at::kLong);
}

class Adapter : public ::testing::TestWithParam<Fixture> {};

TEST_P(Adapter, ListsQuantizableWeightsWithLayout) {
  CausalLM lm = make(GetParam());
  if (GetParam() == Fixture::kStories) {
    ASSERT_EQ(lm.weights().size(), 35u);  // 5 layers x (wq wk wv wo w1 w2 w3)
    EXPECT_EQ(lm.weights()[0].name, "layers.0.attention.wq.weight");
    const WeightInfo& w2 = lm.weights()[lm.weight_index("layers.0.feed_forward.w2.weight")];
    EXPECT_EQ(w2.out_features, 64);
    EXPECT_EQ(w2.in_features, 172);
    EXPECT_FALSE(w2.transposed);
    // The tied embedding is a matrix weight but excluded by default.
    EXPECT_EQ(lm.matrix_weights().front().name, "tok_embeddings.weight");
    EXPECT_EQ(lm.matrix_weights().front().role, WeightRole::kEmbedding);
  } else {
    ASSERT_EQ(lm.weights().size(), 48u);  // 12 layers x (c_attn c_proj c_fc c_proj)
    const WeightInfo& c_attn = lm.weights()[0];
    EXPECT_EQ(c_attn.name, "transformer.h.0.attn.c_attn.weight");
    EXPECT_TRUE(c_attn.transposed);  // Conv1D: stored [in, out]
    EXPECT_EQ(c_attn.out_features, 96);
    EXPECT_EQ(c_attn.in_features, 32);
    const WeightInfo& proj = lm.weights()[lm.weight_index("transformer.h.3.attn.c_proj.weight")];
    EXPECT_TRUE(proj.transposed);  // through torch.addmm
    std::map<std::string, WeightRole> roles;
    for (const auto& w : lm.matrix_weights()) roles[w.name] = w.role;
    EXPECT_EQ(roles.at("transformer.wte.weight"), WeightRole::kEmbedding);
    EXPECT_EQ(roles.at("transformer.wpe.weight"), WeightRole::kEmbedding);
    EXPECT_EQ(roles.at("lm_head.weight"), WeightRole::kHead);
  }
}

TEST_P(Adapter, IncludeAndExcludePatterns) {
  AdapterOptions opt;
  opt.include = {GetParam() == Fixture::kStories ? "tok_embeddings" : "lm_head"};
  opt.exclude = {"\\.0\\."};
  CausalLM lm = make(GetParam(), opt);
  const size_t per_layer = GetParam() == Fixture::kStories ? 7 : 4;
  const size_t layers = GetParam() == Fixture::kStories ? 5 : 12;
  EXPECT_EQ(lm.weights().size(), per_layer * (layers - 1) + 1);
  for (const auto& w : lm.weights()) EXPECT_EQ(w.name.find(".0."), std::string::npos) << w.name;
  AdapterOptions bad;
  bad.exclude = {"(["};
  EXPECT_THROW(make(GetParam(), bad), Error);
}

TEST_P(Adapter, BlocksInNumericOrder) {
  CausalLM lm = make(GetParam());
  const auto& blocks = lm.blocks();
  ASSERT_EQ(blocks.size(), GetParam() == Fixture::kStories ? 5u : 12u);
  for (size_t i = 0; i < blocks.size(); ++i) {
    EXPECT_EQ(blocks[i].index, static_cast<int64_t>(i));
    EXPECT_EQ(blocks[i].name, (GetParam() == Fixture::kStories ? "layers." : "transformer.h.") + std::to_string(i));
    for (size_t w : blocks[i].weights) EXPECT_EQ(lm.weights()[w].block_index, static_cast<int64_t>(i));
  }
}

TEST_P(Adapter, SetAndRestoreAreBitExactOverManyCycles) {
  CausalLM lm = make(GetParam());
  at::Tensor tokens = sample_tokens(2, 16);
  at::Tensor before = lm.logits(tokens);
  std::map<std::string, at::Tensor> originals;
  for (const auto& w : lm.weights()) originals[w.name] = lm.weight(w.name);
  at::Generator g = at::detail::createCPUGenerator(3);
  for (int cycle = 0; cycle < 20; ++cycle) {
    for (const auto& w : lm.weights()) {
      at::Tensor v = lm.weight(w.name);
      lm.set_weight(w.name, v + at::normal(0, 0.1, v.sizes(), g));
    }
    EXPECT_FALSE(at::equal(lm.logits(tokens), before));
    if (cycle % 2) lm.restore_all();
    else
      for (const auto& w : lm.weights()) lm.restore(w.name);
  }
  for (const auto& w : lm.weights()) EXPECT_TRUE(at::equal(lm.weight(w.name), originals[w.name])) << w.name;
  EXPECT_TRUE(at::equal(lm.logits(tokens), before));
}

// The model is the one owner of original weights: a changed weight keeps its loaded storage as its
// original, once, whatever is set afterwards, and gives it back on restore; an unchanged one is its own
// original (nothing copied). What original_weight() hands out stays the original.
TEST_P(Adapter, OriginalWeightsAreKeptOnceWhateverIsSet) {
  CausalLM lm = make(GetParam());
  std::map<std::string, at::Tensor> originals;
  int64_t bytes = 0;
  for (const auto& w : lm.weights()) {
    originals[w.name] = lm.weight(w.name);
    bytes += static_cast<int64_t>(originals[w.name].nbytes());
    EXPECT_TRUE(lm.holds_original(w.name));
  }
  const WeightInfo& first = lm.weights()[0];
  const at::Tensor handed_out = lm.original_weight(first.name);
  EXPECT_EQ(lm.original_bytes(), 0) << "nothing is copied before a weight changes, nor to hand out an original";
  if (!first.transposed)
    EXPECT_EQ(handed_out.data_ptr(), lm.parameter(first.name).data_ptr()) << "an unchanged weight is its own original";
  for (int round = 0; round < 3; ++round)
    for (const auto& w : lm.weights()) lm.set_weight(w.name, at::full({w.out_features, w.in_features}, round + 1.0));
  EXPECT_EQ(lm.original_bytes(), bytes) << "one original of each weight, however often it is set";
  EXPECT_TRUE(at::equal(handed_out, originals[first.name]));
  for (const auto& w : lm.weights()) {
    EXPECT_FALSE(lm.holds_original(w.name));
    EXPECT_TRUE(at::equal(lm.weight(w.name), at::full({w.out_features, w.in_features}, 3.0))) << w.name;
    EXPECT_TRUE(at::equal(lm.original_weight(w.name), originals[w.name])) << w.name;
    EXPECT_EQ(lm.original_weight(w.name).sizes(), (std::vector<int64_t>{w.out_features, w.in_features}));
  }
  lm.restore_all();
  EXPECT_EQ(lm.original_bytes(), 0) << "restored weights hold no second copy";
  for (const auto& w : lm.weights()) {
    EXPECT_TRUE(lm.holds_original(w.name));
    EXPECT_TRUE(at::equal(lm.weight(w.name), originals[w.name])) << w.name;
  }
  EXPECT_TRUE(at::equal(handed_out, originals[first.name]));
  EXPECT_THROW(lm.original_weight("no.such.weight"), Error);
}

// An fp16 model computes in float32 on a CPU; its originals are kept in fp16 (exact), half the bytes.
TEST(AdapterOriginals, Fp16OriginalsAreKeptInFp16) {
  CausalLM lm = CausalLM::load(std::string(GRADQ_TEST_SOURCE_DIR) + "/tests/zoo/models/meta_bias_gelu_fp16.pt");
  ASSERT_EQ(lm.dtype(), at::kHalf);
  int64_t numel = 0;
  std::map<std::string, at::Tensor> originals;
  for (const auto& w : lm.weights()) {
    originals[w.name] = lm.weight(w.name);
    numel += w.numel();
    lm.set_weight(w.name, at::zeros({w.out_features, w.in_features}));
  }
  EXPECT_EQ(lm.original_bytes(), 2 * numel);
  for (const auto& w : lm.weights()) {
    const at::Tensor o = lm.original_weight(w.name);
    EXPECT_EQ(o.scalar_type(), originals[w.name].scalar_type()) << "handed out in the dtype the model computes in";
    EXPECT_TRUE(at::equal(o, originals[w.name])) << w.name;
  }
  lm.restore_all();
  EXPECT_EQ(lm.original_bytes(), 0);
  for (const auto& w : lm.weights()) EXPECT_TRUE(at::equal(lm.weight(w.name), originals[w.name])) << w.name;
}

TEST_P(Adapter, SetWeightUsesLogicalLayoutAndChecksShape) {
  CausalLM lm = make(GetParam());
  const WeightInfo& w = lm.weights()[0];
  at::Tensor v = at::arange(w.numel(), at::kFloat).view({w.out_features, w.in_features});
  lm.set_weight(w.name, v);
  EXPECT_TRUE(at::equal(lm.weight(w.name), v));
  EXPECT_TRUE(at::equal(lm.parameter(w.name), w.transposed ? v.t() : v));
  EXPECT_THROW(lm.set_weight(w.name, v.t().contiguous().view({w.in_features, w.out_features}).narrow(0, 0, 1)), Error);
  EXPECT_THROW(lm.set_weight("no.such.weight", v), Error);
}

TEST_P(Adapter, CapturedInputStatisticsMatchDirectComputation) {
  CausalLM lm = make(GetParam());
  at::Tensor tokens = sample_tokens(3, 24);
  at::Tensor before = lm.logits(tokens);
  auto stats = lm.capture_input_stats(tokens, /*batch=*/2, /*with_xtx=*/true);
  EXPECT_TRUE(at::equal(lm.logits(tokens), before));  // the model itself is untouched
  ASSERT_EQ(stats.size(), lm.weights().size());

  // The first weight's input is the normalized embedding, which the test computes by hand.
  at::Tensor x;
  if (GetParam() == Fixture::kStories) {
    at::Tensor e = at::embedding(lm.parameter("tok_embeddings.weight"), tokens);
    x = e * at::rsqrt(e.pow(2).mean(-1, true) + 1e-5) * lm.parameter("layers.0.attention_norm.weight");
  } else {
    at::Tensor e = at::embedding(lm.parameter("transformer.wte.weight"), tokens) +
                   at::embedding(lm.parameter("transformer.wpe.weight"), at::arange(24));
    x = at::layer_norm(e, {32}, lm.parameter("transformer.h.0.ln_1.weight"), lm.parameter("transformer.h.0.ln_1.bias"));
  }
  x = x.reshape({-1, x.size(-1)}).to(at::kDouble);
  const InputStats& s = stats.at(lm.weights()[0].name);
  EXPECT_EQ(s.rows, 3 * 24);
  EXPECT_TRUE(at::allclose(s.sq_sum, x.pow(2).sum(0), 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(s.xtx, x.t().matmul(x), 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(s.sq_mean(), x.pow(2).mean(0).to(at::kFloat), 1e-5, 1e-6));
  for (const auto& w : lm.weights()) {
    const InputStats& st = stats.at(w.name);
    EXPECT_EQ(st.sq_sum.size(0), w.in_features) << w.name;
    EXPECT_GT(st.sq_sum.min().item<double>(), 0.0) << w.name;
    EXPECT_TRUE(at::allclose(st.xtx.diagonal(), st.sq_sum)) << w.name;
  }
  // Weights that read one input hold one copy of its statistics; the others their own.
  if (GetParam() == Fixture::kStories) {
    auto xtx_of = [&](const std::string& name) { return stats.at("layers.0." + name + ".weight").xtx.data_ptr(); };
    EXPECT_EQ(xtx_of("attention.wq"), xtx_of("attention.wk"));
    EXPECT_EQ(xtx_of("attention.wq"), xtx_of("attention.wv"));
    EXPECT_EQ(xtx_of("feed_forward.w1"), xtx_of("feed_forward.w3"));
    EXPECT_NE(xtx_of("attention.wq"), xtx_of("attention.wo"));
    EXPECT_NE(xtx_of("feed_forward.w1"), xtx_of("feed_forward.w2"));
    EXPECT_NE(xtx_of("attention.wq"), xtx_of("feed_forward.w1"));
    EXPECT_EQ(stats.at("layers.0.attention.wv.weight").rows, 3 * 24);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, Adapter, ::testing::Values(Fixture::kStories, Fixture::kGpt),
                         [](const auto& info) { return info.param == Fixture::kStories ? "stories260K" : "gpt"; });

TEST(AdapterErrors, RejectsModulesThatAreNotCausalLMs) {
  torch::jit::Module m("NotAnLM");
  m.define("def forward(self, x):\n    return x.float().sum(-1)\n");
  EXPECT_THROW({ CausalLM lm(m); }, Error);
  EXPECT_THROW(CausalLM::load("/nonexistent.pt"), Error);
  const std::string dir = test::temp_dir("notts");
  std::ofstream(dir + "/junk.pt") << "this is not a zip archive";
  EXPECT_THROW(CausalLM::load(dir + "/junk.pt"), Error);
}

}  // namespace
}  // namespace gradq
