// The model as stages (model/stages.h) and the block-input cache (eval/block_cache.h), on both
// fixtures: the converted stories260K and the GPT-style model (Conv1D weights, learned positions).

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "eval/block_cache.h"
#include "model/causal_lm.h"
#include "optimizer/plan.h"
#include "quant/quantize.h"
#include "support/gpt_fixture.h"
#include "support/test_helpers.h"
#include "support/test_support.h"

namespace gradq {
namespace {

enum class Fixture { kStories, kGpt };

// What does not depend on the tokens (stories260K's causal mask and rotary tables, which its first
// block makes) is held once for all batches at every boundary of a stream or cache; the residual
// stream is each batch's own. Checks that later batches share exactly the tensors equal to the first
// batch's, and returns how many they share.
int64_t expect_shared_where_equal(const std::vector<StageState>& states, int64_t boundary) {
  int64_t shared = 0;
  for (size_t chunk = 1; chunk < states.size(); ++chunk)
    for (size_t i = 0; i < states[0].size(); ++i) {
      if (!states[0][i].isTensor()) continue;
      const at::Tensor& first = states[0][i].toTensor();
      const at::Tensor& mine = states[chunk][i].toTensor();
      const bool same_values = first.sizes() == mine.sizes() && at::equal(first, mine);
      EXPECT_EQ(mine.is_same(first), same_values) << "boundary " << boundary << ", chunk " << chunk << ", value " << i;
      shared += mine.is_same(first);
    }
  return shared;
}


CausalLM make(Fixture f) {
  if (f == Fixture::kStories) return CausalLM::load(test::stories_pt());
  return CausalLM(test::make_gpt_fixture());
}

at::Tensor sample_tokens(int64_t rows, int64_t len, uint64_t seed = 7) {
  at::Generator g = at::detail::createCPUGenerator(seed);
  return at::randint(3, 512, {rows, len}, g, at::kLong);
}

// A weight of block `block` perturbed enough to change the logits visibly.
void perturb(CausalLM& lm, int64_t block) {
  const size_t w = lm.blocks().at(block).weights.front();
  const std::string name = lm.weights()[w].name;
  lm.set_weight(name, lm.weight(name) * 1.5);
}

class Stages : public ::testing::TestWithParam<Fixture> {};

TEST_P(Stages, SplitAtEveryBlockAndMatchTheWholeForwardBitExactly) {
  CausalLM lm = make(GetParam());
  const ModelStages* stages = lm.stages();
  ASSERT_NE(stages, nullptr) << lm.stages_unavailable_reason();
  EXPECT_EQ(lm.stages_unavailable_reason(), "");
  EXPECT_EQ(stages->num_blocks(), static_cast<int64_t>(lm.blocks().size()));
  at::Tensor tokens = sample_tokens(3, 40);
  at::Tensor staged = stages->logits(tokens).to(at::kFloat);
  EXPECT_TRUE(at::equal(staged, lm.logits(tokens)));
  EXPECT_GT(staged.abs().sum().item<double>(), 0);
}

TEST_P(Stages, StatesCarryWhatIsLiveAcrossBoundaries) {
  CausalLM lm = make(GetParam());
  const auto* stages = dynamic_cast<const GraphStages*>(lm.stages());
  ASSERT_NE(stages, nullptr);
  // Every boundary hands on at least the residual stream, and the same values between blocks.
  for (int64_t i = 0; i <= stages->num_blocks(); ++i) EXPECT_GE(stages->state_size(i), 1u) << i;
  for (int64_t i = 2; i < stages->num_blocks(); ++i) EXPECT_EQ(stages->state_size(i), stages->state_size(1)) << i;
  if (GetParam() == Fixture::kStories) EXPECT_GE(stages->state_size(1), 3u);  // x, rotary cos/sin, mask
  // From block 1 on, one tensor per token crosses a boundary: the residual stream. Cut at the next
  // block's first weight, stories260K's states also held the RMSNorm's normalized input, computed
  // before its weight is read (two [B, T, dim] tensors per state).
  const at::Tensor tokens = sample_tokens(2, 16);
  StageState state = stages->embed(tokens);
  for (int64_t i = 0; i < stages->num_blocks(); ++i) {
    state = stages->block(i, state);
    const auto per_token = std::count_if(state.begin(), state.end(), [](const c10::IValue& v) {
      return v.isTensor() && v.toTensor().dim() == 3 && v.toTensor().size(0) == 2 && v.toTensor().size(1) == 16;
    });
    EXPECT_EQ(per_token, 1) << "entering " << (i + 1 < stages->num_blocks() ? "block " + std::to_string(i + 1) : "the head");
  }
}

TEST_P(Stages, ExactFromACachedBlockInputEqualsTheWholeModel) {
  CausalLM lm = make(GetParam());
  at::Tensor tokens = sample_tokens(5, 24);
  BlockInputCache cache(*lm.stages(), tokens, 2);
  ASSERT_EQ(cache.num_blocks(), static_cast<int64_t>(lm.blocks().size()));
  const int64_t b = cache.num_blocks() / 2;
  perturb(lm, b);
  // Batch by batch, as the evaluator asks: a matmul's rounding may depend on how many rows it has.
  for (int64_t begin = 0; begin < 5; begin += 2) {
    at::Tensor whole = lm.logits(tokens.slice(0, begin, std::min<int64_t>(5, begin + 2)));
    at::Tensor from_cache = cache.logits_from(b, cache.chunk_of(begin)).to(at::kFloat);
    EXPECT_TRUE(at::equal(from_cache, whole)) << begin;
    // From -1, the embedding included, whatever is cached.
    EXPECT_TRUE(at::equal(cache.logits_from(-1, cache.chunk_of(begin)).to(at::kFloat), whole)) << begin;
  }
  EXPECT_THROW(cache.logits_from(-2, 0), Error);
  // The unperturbed reference is what blocks after b see from the cache: different logits.
  EXPECT_FALSE(at::equal(cache.logits_from(b + 1, 0).to(at::kFloat), lm.logits(tokens.slice(0, 0, 2))));
  lm.restore_all();
}

TEST_P(Stages, LocalErrorIsZeroUnchangedAndGrowsWithTheChange) {
  CausalLM lm = make(GetParam());
  BlockInputCache cache(*lm.stages(), sample_tokens(3, 16), 2);
  const int64_t b = 1;
  at::Tensor unchanged = cache.local_error(b);
  ASSERT_EQ(unchanged.size(0), 3);
  EXPECT_EQ(unchanged.abs().max().item<double>(), 0.0);
  const size_t w = lm.blocks().at(b).weights.front();
  const std::string name = lm.weights()[w].name;
  const at::Tensor original = lm.weight(name);
  lm.set_weight(name, original * 1.1);
  const double small = cache.local_error(b).mean().item<double>();
  lm.set_weight(name, original * 1.5);
  const double large = cache.local_error(b).mean().item<double>();
  EXPECT_GT(small, 0);
  EXPECT_GT(large, 4 * small);  // about quadratic in the size of the change
  EXPECT_EQ(cache.local_error(b + 1).abs().max().item<double>(), 0.0);  // other blocks see reference inputs
  lm.restore_all();
}

// The gradient at every block's output (output_gradients), pushed back through one block at a time
// from a stream of its inputs (backward_through_block), gives each weight the gradient of the mean
// NLL that one autograd pass through the whole model gives it: the chain rule cut at the block
// boundaries. Windows of unequal scored parts, two batches.
TEST_P(Stages, BlockByBlockGradientsEqualTheWholeModels) {
  CausalLM lm = make(GetParam());
  const at::Tensor tokens = sample_tokens(3, 17);
  Windows windows{tokens.slice(1, 0, 16), tokens.slice(1, 1, 17), at::tensor({0, 5, 0}, at::kLong)};
  const std::map<std::string, at::Tensor> whole = test::whole_model_nll_gradients(lm, windows);
  std::vector<std::vector<StageState>> outputs;
  {
    GradientScope none(lm, GradientScope::Which::kNone);
    outputs = output_gradients(*lm.stages(), windows, 2);
  }
  ASSERT_EQ(static_cast<int64_t>(outputs.size()), lm.stages()->num_blocks());
  BlockInputStream stream(*lm.stages(), windows.inputs, 2);
  int64_t compared = 0;
  for (int64_t b = 0; b < lm.stages()->num_blocks(); ++b, stream.advance()) {
    ASSERT_EQ(outputs[b].size(), 2u);
    GradientScope weights(lm, GradientScope::Which::kQuantizableWeights);
    backward_through_block(*lm.stages(), b, stream.states(), outputs[b]);
    for (size_t i : lm.blocks().at(b).weights) {
      const WeightInfo& w = lm.weights()[i];
      const at::Tensor g = lm.parameter(w.name).grad();
      ASSERT_TRUE(g.defined()) << w.name;
      const at::Tensor& expected = whole.at(w.name);
      EXPECT_TRUE(at::allclose(w.transposed ? g.t() : g, expected, 1e-4, 1e-5 * expected.abs().max().item<double>()))
          << w.name << ": max difference " << ((w.transposed ? g.t() : g) - expected).abs().max().item<double>()
          << " of at most " << expected.abs().max().item<double>();
      ++compared;
    }
  }
  EXPECT_EQ(compared, static_cast<int64_t>(lm.weights().size()));
  for (const WeightInfo& w : lm.weights()) EXPECT_FALSE(lm.parameter(w.name).grad().defined()) << "scopes put back no gradient";
}

TEST_P(Stages, RefreshFollowsChangedWeights) {
  CausalLM lm = make(GetParam());
  at::Tensor tokens = sample_tokens(2, 16);
  BlockInputCache cache(*lm.stages(), tokens, 2);
  perturb(lm, 0);
  cache.refresh(0);
  const int64_t last = cache.num_blocks() - 1;
  EXPECT_TRUE(at::equal(cache.logits_from(last, 0).to(at::kFloat), lm.logits(tokens)));
  EXPECT_GT(cache.bytes(), 0);
  lm.restore_all();
}

// States a refresh computes again (trials, then commit) share as the first computation's did.
TEST_P(Stages, RefreshedStatesShareWhatEveryBatchShares) {
  CausalLM lm = make(GetParam());
  BlockInputCache cache(*lm.stages(), sample_tokens(3, 16), 1);
  std::vector<int64_t> before;
  for (int64_t b = 0; b <= cache.num_blocks(); ++b) before.push_back(expect_shared_where_equal(cache.states(b), b));
  perturb(lm, 0);
  cache.refresh(-1);
  for (int64_t b = 0; b <= cache.num_blocks(); ++b) {
    EXPECT_EQ(expect_shared_where_equal(cache.states(b), b), before[b]) << "boundary " << b;
    if (GetParam() == Fixture::kStories && b < cache.num_blocks()) EXPECT_GT(before[b], 0) << "boundary " << b;
  }
  lm.restore_all();
}

// A moving cache (two boundaries, moved forward) measures every block as the full cache does, bit
// for bit, in a fraction of its memory, and says so when asked for a state it dropped.
TEST_P(Stages, MovingCacheMeasuresBlocksInOrderLikeTheFullOne) {
  CausalLM lm = make(GetParam());
  at::Tensor tokens = sample_tokens(5, 24);
  BlockInputCache all(*lm.stages(), tokens, 2);
  BlockInputCache moving(*lm.stages(), tokens, 2, BlockInputCache::Keep::kMoving);
  const int64_t blocks = all.num_blocks();
  ASSERT_GE(blocks, 3) << "the test needs boundaries to drop";
  int64_t most_bytes = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    moving.move_to(b);
    most_bytes = std::max(most_bytes, moving.bytes());
    EXPECT_EQ(expect_shared_where_equal(moving.states(b + 1), b + 1), expect_shared_where_equal(all.states(b + 1), b + 1));
    perturb(lm, b);
    EXPECT_TRUE(at::equal(moving.local_error(b), all.local_error(b))) << b;
    for (int64_t chunk = 0; chunk < 3; ++chunk)
      EXPECT_TRUE(at::equal(moving.logits_from(b, chunk), all.logits_from(b, chunk))) << b << " " << chunk;
    lm.restore_all();  // the blocks moved past hold the weights the cache describes
  }
  moving.move_to(blocks);
  EXPECT_TRUE(at::equal(moving.logits_from(blocks, 0), all.logits_from(blocks, 0)));
  EXPECT_LT(most_bytes, all.bytes() * 3 / (blocks + 1)) << "about two boundaries of " << blocks + 1;
  const std::string dropped = test::expect_error([&] { moving.state(0, 0); });
  EXPECT_NE(dropped.find("not kept"), std::string::npos) << dropped;
  EXPECT_THROW(moving.move_to(blocks - 1), Error);
  EXPECT_THROW(moving.refresh(0), Error);
  EXPECT_THROW(all.move_to(1), Error);
}

// Statistics collected one block at a time from streamed block inputs are exactly those of the
// whole-model capture over the same windows and batches (what lets a search hold one block's X^T X
// and one boundary's states), and the stream's states are the cache's.
TEST_P(Stages, BlockInputStatsEqualTheWholeCapture) {
  CausalLM lm = make(GetParam());
  at::Tensor tokens = sample_tokens(5, 24);
  const auto whole = lm.capture_input_stats(tokens, 2, /*with_xtx=*/true);
  BlockInputCache cache(*lm.stages(), tokens, 2);
  BlockInputStream stream(*lm.stages(), tokens, 2);
  auto expect_states_of = [&](int64_t b) {
    ASSERT_EQ(stream.block(), b);
    ASSERT_EQ(stream.states().size(), 3u);  // 5 windows in batches of 2
    for (size_t chunk = 0; chunk < stream.states().size(); ++chunk) {
      const StageState& cached = cache.state(b, static_cast<int64_t>(chunk));
      ASSERT_EQ(stream.states()[chunk].size(), cached.size());
      for (size_t i = 0; i < cached.size(); ++i)
        if (cached[i].isTensor()) EXPECT_TRUE(at::equal(stream.states()[chunk][i].toTensor(), cached[i].toTensor()));
    }
    const int64_t streamed = expect_shared_where_equal(stream.states(), b);
    const int64_t cached = expect_shared_where_equal(cache.states(b), b);
    EXPECT_EQ(streamed, cached) << "boundary " << b;
    if (GetParam() == Fixture::kStories && b < cache.num_blocks()) EXPECT_GT(streamed, 0) << "boundary " << b;
  };
  size_t seen = 0;
  for (int64_t b = 0; b < cache.num_blocks(); ++b) {
    expect_states_of(b);
    const auto block = lm.capture_block_input_stats(b, stream.states(), /*with_xtx=*/true);
    stream.advance();
    EXPECT_EQ(block.size(), lm.blocks()[b].weights.size());
    for (const auto& [name, s] : block) {
      SCOPED_TRACE(name);
      const InputStats& w = whole.at(name);
      EXPECT_EQ(s.rows, w.rows);
      EXPECT_TRUE(at::equal(s.sq_sum, w.sq_sum));
      EXPECT_TRUE(at::equal(s.xtx, w.xtx));
      ++seen;
    }
  }
  expect_states_of(cache.num_blocks());  // the head's input
  GRADQ_EXPECT_THROW_MSG(stream.advance(), "at the head already");
  stream.rewind();
  expect_states_of(0);
  size_t in_blocks = 0;
  for (const WeightInfo& w : lm.weights()) in_blocks += w.block_index >= 0;
  EXPECT_EQ(seen, in_blocks);
  // The taps are identities while nothing collects: the staged forward is still the model's.
  EXPECT_TRUE(at::equal(lm.stages()->logits(tokens).to(at::kFloat), lm.logits(tokens)));
  GRADQ_EXPECT_THROW_MSG(lm.capture_block_input_stats(cache.num_blocks(), {}, false), "expected a block in [0, ");
}

// Held-out passes run one block at a time (evaluate_by_block): the same numbers, bit for bit, as
// setting every weight and running the whole model, with no block's new weights left behind.
TEST_P(Stages, EvaluatedBlockByBlockEqualsEveryWeightSet) {
  CausalLM lm = make(GetParam());
  const at::Tensor sampled = sample_tokens(1, 5 * 32 + 1).flatten();
  const std::vector<int64_t> tokens(sampled.data_ptr<int64_t>(), sampled.data_ptr<int64_t>() + sampled.numel());
  WindowSpec spec;
  spec.ctx = 32;
  spec.stride = 32;
  EvaluatorOptions options;
  options.batch = 2;  // the last batch holds one window
  GradualEvaluator evaluator(make_windows(tokens, spec), options);
  ASSERT_EQ(evaluator.windows().size(), 5);
  evaluator.set_reference(lm);
  QuantizedWeights weights;
  for (const WeightInfo& w : lm.weights())
    weights[w.name] = quantize_weight(lm.weight(w.name), w.name, parse_quant_spec("b2g16"), RoundingMethod::kRtn, {});

  std::vector<std::pair<int64_t, int64_t>> progress;
  const EvalResult by_block = evaluate_by_block(lm, weights, evaluator, [&](int64_t done, int64_t blocks) {
    progress.emplace_back(done, blocks);
  });
  const auto blocks = lm.stages()->num_blocks();
  ASSERT_EQ(static_cast<int64_t>(progress.size()), blocks) << "one progress call per block";
  for (int64_t b = 0; b < blocks; ++b) EXPECT_EQ(progress[b], std::make_pair(b + 1, blocks));
  for (const WeightInfo& w : lm.weights()) EXPECT_TRUE(lm.holds_original(w.name)) << w.name;
  EXPECT_EQ(lm.original_bytes(), 0);
  for (const auto& [name, q] : weights) lm.set_weight(name, q.dequantize());
  const EvalResult whole = evaluator.evaluate(lm);
  lm.restore_all();
  EXPECT_GT(whole.kl->mean.value, 1e-3) << "2-bit weights change the model";
  EXPECT_EQ(by_block.tokens, whole.tokens);
  EXPECT_EQ(by_block.nll.value, whole.nll.value);
  EXPECT_EQ(by_block.kl->mean.value, whole.kl->mean.value);
  EXPECT_EQ(by_block.kl->same_top_rate, whole.kl->same_top_rate);

  // A weight changed before is refused (it could not be put back to what it held).
  const std::string& first = lm.weights().front().name;
  lm.set_weight(first, lm.weight(first) * 2);
  EXPECT_THROW(evaluate_by_block(lm, weights, evaluator), Error);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Stages, ::testing::Values(Fixture::kStories, Fixture::kGpt),
                         [](const auto& info) { return info.param == Fixture::kStories ? "stories260K" : "gpt"; });

// A forward that computes two blocks interleaved cannot be split: the reason names them, and the
// model still runs whole.
TEST(StagesFallback, InterleavedBlocksAreRefusedWithAReason) {
  torch::jit::Module m("Interleaved");
  m.register_parameter("emb", at::randn({512, 8}), false);
  torch::jit::Module layers("Layers");
  for (const char* i : {"0", "1"}) {
    torch::jit::Module layer("Layer");
    layer.register_parameter("a", at::randn({8, 8}), false);
    layer.register_parameter("b", at::randn({8, 8}), false);
    layers.register_module(i, layer);
  }
  m.register_module("layers", layers);
  m.register_parameter("out", at::randn({512, 8}), false);
  m.define(R"(
def forward(self, tokens):
    x = torch.embedding(self.emb, tokens)
    h0 = torch.linear(x, getattr(self.layers, "0").a)
    h1 = torch.linear(h0, getattr(self.layers, "1").a)
    h2 = torch.linear(h1, getattr(self.layers, "0").b)
    h3 = torch.linear(h2, getattr(self.layers, "1").b)
    return torch.linear(h3, self.out)
)");
  CausalLM lm(m);
  ASSERT_EQ(lm.blocks().size(), 2u);
  EXPECT_EQ(lm.stages(), nullptr);
  EXPECT_NE(lm.stages_unavailable_reason().find("interleaved"), std::string::npos) << lm.stages_unavailable_reason();
  EXPECT_EQ(lm.logits(sample_tokens(1, 4)).size(2), 512);
}

// A block that adds into its input in place (x += f(x), as scripted Python models often do) must
// not corrupt the cached states that later measurements reuse.
TEST(StagesFallback, InPlaceUpdatesDoNotTouchCachedStates) {
  torch::jit::Module m("InPlace");
  m.register_parameter("emb", at::randn({512, 8}), false);
  torch::jit::Module layers("Layers");
  for (const char* i : {"0", "1", "2"}) {
    torch::jit::Module layer("Layer");
    layer.register_parameter("w", at::randn({8, 8}) * 0.1, false);
    layer.define("def forward(self, x):\n    x += torch.linear(x, self.w)\n    return x\n");
    layers.register_module(i, layer);
  }
  m.register_module("layers", layers);
  m.register_parameter("out", at::randn({512, 8}), false);
  m.define(R"(
def forward(self, tokens):
    x = torch.embedding(self.emb, tokens).clone()
    x = getattr(self.layers, "0").forward(x)
    x = getattr(self.layers, "1").forward(x)
    x = getattr(self.layers, "2").forward(x)
    return torch.linear(x, self.out)
)");
  CausalLM lm(m);
  ASSERT_NE(lm.stages(), nullptr) << lm.stages_unavailable_reason();
  at::Tensor tokens = sample_tokens(2, 6);
  BlockInputCache cache(*lm.stages(), tokens, 2);
  at::Tensor whole = lm.logits(tokens);
  for (int repeat = 0; repeat < 3; ++repeat)
    EXPECT_TRUE(at::equal(cache.logits_from(1, 0).to(at::kFloat), whole)) << repeat;
}

}  // namespace
}  // namespace gradq
