// A model written with libtorch's C++ frontend (torch::nn::Module), as a training harness has it,
// implementing QuantizableModel and ModelStages and driven through the whole quantize path: the
// evaluator, the importance analysis, the budgeted search and a uniform plan. The harness gets a
// plan and QuantizedWeights and loads the dequantized weights into its own module; its forward then
// reproduces the numbers gradq validated.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <memory>
#include <set>

#include "eval/block_cache.h"
#include "importance/analyzer.h"
#include "model/quantizable_model.h"
#include "orchestrator/gradual_quantizer.h"
#include "support/test_helpers.h"
#include "support/test_support.h"

namespace gradq {
namespace {
using test::bitwise_equal;

// ---- The harness's model: a GPT-style transformer ------------------------------------------------
struct Config {
  int64_t vocab = 512;  // stories260K's tokenizer
  int64_t ctx = 128;    // test::small_stories_data's windows
  int64_t dim = 64, hidden = 128, heads = 4, layers = 2;
  bool observe = true;  // false: a forward that forgets gradq::observe_input
};

struct AttentionImpl : torch::nn::Module {
  AttentionImpl(const Config& c)
      : heads(c.heads), observe(c.observe),
        qkv(register_module("qkv", torch::nn::Linear(torch::nn::LinearOptions(c.dim, 3 * c.dim).bias(true)))),
        proj(register_module("proj", torch::nn::Linear(torch::nn::LinearOptions(c.dim, c.dim).bias(false)))) {}
  at::Tensor forward(const at::Tensor& x) {
    const int64_t B = x.size(0), T = x.size(1), C = x.size(2), hd = C / heads;
    auto parts = qkv(observe ? observe_input(qkv->weight, x) : x).chunk(3, -1);
    auto split = [&](const at::Tensor& t) { return t.view({B, T, heads, hd}).transpose(1, 2); };
    at::Tensor scores = split(parts[0]).matmul(split(parts[1]).transpose(-2, -1)) / std::sqrt(double(hd));
    scores = scores.masked_fill(at::ones({T, T}, at::kBool).triu(1), -std::numeric_limits<float>::infinity());
    at::Tensor y = scores.softmax(-1).matmul(split(parts[2])).transpose(1, 2).reshape({B, T, C});
    return proj(observe_input(proj->weight, y));
  }
  int64_t heads;
  bool observe;
  torch::nn::Linear qkv, proj;
};
TORCH_MODULE(Attention);

struct MlpImpl : torch::nn::Module {
  MlpImpl(const Config& c)
      : fc(register_module("fc", torch::nn::Linear(torch::nn::LinearOptions(c.dim, c.hidden).bias(true)))),
        out(register_module("out", torch::nn::Linear(torch::nn::LinearOptions(c.hidden, c.dim).bias(true)))) {}
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor h = torch::gelu(fc(observe_input(fc->weight, x)));
    return out(observe_input(out->weight, h));
  }
  torch::nn::Linear fc, out;
};
TORCH_MODULE(Mlp);

struct BlockImpl : torch::nn::Module {
  BlockImpl(const Config& c)
      : ln1(register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.dim})))),
        attn(register_module("attn", Attention(c))),
        ln2(register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.dim})))),
        mlp(register_module("mlp", Mlp(c))) {}
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = x + attn(ln1(x));
    return y + mlp(ln2(y));
  }
  torch::nn::LayerNorm ln1;
  Attention attn;
  torch::nn::LayerNorm ln2;
  Mlp mlp;
};
TORCH_MODULE(Block);

struct TinyGptImpl : torch::nn::Module {
  explicit TinyGptImpl(const Config& c)
      : tok(register_module("tok", torch::nn::Embedding(c.vocab, c.dim))),
        pos(register_module("pos", torch::nn::Embedding(c.ctx, c.dim))),
        h(register_module("h", torch::nn::ModuleList())),
        ln_f(register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.dim})))),
        head(register_module("head", torch::nn::Linear(torch::nn::LinearOptions(c.dim, c.vocab).bias(false)))) {
    for (int64_t i = 0; i < c.layers; ++i) h->push_back(Block(c));
  }
  at::Tensor embed(const at::Tensor& tokens) { return tok(tokens) + pos(at::arange(tokens.size(1), at::kLong)); }
  at::Tensor block(int64_t i, const at::Tensor& x) { return h->at<BlockImpl>(static_cast<size_t>(i)).forward(x); }
  at::Tensor logits(const at::Tensor& x) {
    at::Tensor y = ln_f(x);
    return head(observe_input(head->weight, y));
  }
  at::Tensor forward(const at::Tensor& tokens) {
    at::Tensor x = embed(tokens);
    for (size_t i = 0; i < h->size(); ++i) x = block(static_cast<int64_t>(i), x);
    return logits(x);
  }
  torch::nn::Embedding tok, pos;
  torch::nn::ModuleList h;
  torch::nn::LayerNorm ln_f;
  torch::nn::Linear head;
};
TORCH_MODULE(TinyGpt);

// Random init from a fixed seed: the same seed gives the same weights.
TinyGpt make_net(const Config& c = {}, uint64_t seed = 13) {
  torch::manual_seed(seed);
  TinyGpt net(c);
  net->eval();
  return net;
}

// ---- The harness's implementation of gradq's interfaces ----------------------------------------
std::vector<std::pair<std::string, at::Tensor>> named_parameters(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : module.named_parameters()) out.emplace_back(p.key(), p.value());
  return out;
}

class TinyGptStages : public ModelStages {
 public:
  explicit TinyGptStages(std::shared_ptr<TinyGptImpl> net) : net_(std::move(net)) {}
  int64_t num_blocks() const override { return static_cast<int64_t>(net_->h->size()); }
  StageState embed(const at::Tensor& tokens) const override { return {net_->embed(tokens)}; }
  StageState block(int64_t i, const StageState& in) const override { return {net_->block(i, in.at(0).toTensor())}; }
  at::Tensor head(const StageState& in) const override { return net_->logits(in.at(0).toTensor()); }

 private:
  std::shared_ptr<TinyGptImpl> net_;
};

class TinyGptModel : public QuantizableModel {
 public:
  explicit TinyGptModel(TinyGpt net) : net_(net.ptr()), stages_(net.ptr()) {
    std::vector<WeightInfo> matrix;
    std::vector<std::string> quantizable;
    auto add = [&](const std::string& name, const at::Tensor& p, WeightRole role, int64_t block) {
      WeightInfo w;
      w.name = name;
      w.out_features = p.size(0);
      w.in_features = p.size(1);
      w.role = role;
      if (block >= 0) {
        w.block = "h." + std::to_string(block);
        w.block_index = block;
      }
      matrix.push_back(w);
      // Like CausalLM's default: the projections inside the network, not the embeddings or the head.
      if (role == WeightRole::kLinear) quantizable.push_back(name);
    };
    add("tok.weight", net_->tok->weight, WeightRole::kEmbedding, -1);
    add("pos.weight", net_->pos->weight, WeightRole::kEmbedding, -1);
    for (int64_t i = 0; i < stages_.num_blocks(); ++i) {
      const BlockImpl& b = net_->h->at<BlockImpl>(static_cast<size_t>(i));
      const std::string prefix = "h." + std::to_string(i) + ".";
      add(prefix + "attn.qkv.weight", b.attn->qkv->weight, WeightRole::kLinear, i);
      add(prefix + "attn.proj.weight", b.attn->proj->weight, WeightRole::kLinear, i);
      add(prefix + "mlp.fc.weight", b.mlp->fc->weight, WeightRole::kLinear, i);
      add(prefix + "mlp.out.weight", b.mlp->out->weight, WeightRole::kLinear, i);
    }
    add("head.weight", net_->head->weight, WeightRole::kHead, -1);
    register_weights(std::move(matrix), quantizable);
  }

  at::Tensor forward(const at::Tensor& tokens) const override { return net_->forward(tokens); }
  int64_t vocab_size() const override { return net_->head->weight.size(0); }
  std::vector<std::pair<std::string, at::Tensor>> parameters() const override { return named_parameters(*net_); }
  const ModelStages* stages() const override { return &stages_; }

 private:
  std::shared_ptr<TinyGptImpl> net_;
  TinyGptStages stages_;
};

// A harness that declares a weight with its dimensions swapped.
class MisdeclaredModel : public QuantizableModel {
 public:
  explicit MisdeclaredModel(TinyGpt net) : net_(net.ptr()) {
    WeightInfo w;
    w.name = "h.0.mlp.fc.weight";  // [hidden 128, dim 64]
    w.out_features = 64;
    w.in_features = 128;
    register_weights({w}, {w.name});
  }
  at::Tensor forward(const at::Tensor& tokens) const override { return net_->forward(tokens); }
  int64_t vocab_size() const override { return 512; }
  std::vector<std::pair<std::string, at::Tensor>> parameters() const override { return named_parameters(*net_); }

 private:
  std::shared_ptr<TinyGptImpl> net_;
};

// The net of `model`'s seed with `weights` dequantized into it, as a harness loads a result.
TinyGpt net_with(const QuantizedWeights& weights) {
  TinyGpt net = make_net();
  torch::NoGradGuard no_grad;
  auto params = net->named_parameters();
  for (const auto& [name, q] : weights) {
    if (!params.contains(name)) {
      ADD_FAILURE() << "the net has no parameter " << name;
      continue;
    }
    params[name].copy_(q.dequantize());
  }
  return net;
}

struct Fixture {
  TinyGpt net = make_net();
  TinyGptModel model{net};
  DataSplit data = test::small_stories_data();
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

// ---- Tests ----------------------------------------------------------------------------------------

TEST(FrontendModel, RegistersItsWeightsAndBlocks) {
  Fixture& f = fixture();
  ASSERT_EQ(f.model.weights().size(), 8u);
  EXPECT_EQ(f.model.matrix_weights().size(), 11u);
  ASSERT_EQ(f.model.blocks().size(), 2u);
  EXPECT_EQ(f.model.blocks()[1].name, "h.1");
  EXPECT_EQ(f.model.blocks()[1].weights, (std::vector<size_t>{4, 5, 6, 7}));
  EXPECT_EQ(f.model.block_position("h.1"), 1);
  EXPECT_EQ(f.model.weights()[2].name, "h.0.mlp.fc.weight");
  EXPECT_EQ(f.model.weights()[2].out_features, 128);
  EXPECT_EQ(f.model.dtype(), at::kFloat);
  // The parameter is the module's own tensor, not a copy.
  EXPECT_TRUE(f.model.parameter("h.0.attn.qkv.weight").is_same(f.net->h->at<BlockImpl>(0).attn->qkv->weight));
  EXPECT_NE(test::expect_error([&] { f.model.weight_index("h.0.attn.qkv.bias"); }).find("h.0.attn.qkv.weight"),
            std::string::npos);
  const std::string msg = test::expect_error([] { MisdeclaredModel m(make_net()); });
  EXPECT_NE(msg.find("'h.0.mlp.fc.weight' is declared [out 64, in 128]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("it is 128x64"), std::string::npos) << msg;
}

TEST(FrontendModel, StagesComputeTheForward) {
  Fixture& f = fixture();
  const at::Tensor tokens = f.data.evaluation.inputs.slice(0, 0, 2);
  const at::Tensor whole = f.model.logits(tokens);
  ASSERT_EQ(whole.sizes(), (at::IntArrayRef{2, 128, 512}));
  EXPECT_GT(whole.abs().max().item<double>(), 0.0);
  c10::InferenceMode guard;
  EXPECT_TRUE(bitwise_equal(f.model.stages()->logits(tokens), whole));
  EXPECT_TRUE(bitwise_equal(f.net->forward(tokens), whole));
}

TEST(FrontendModel, SetWeightChangesTheModuleAndRestoreIsBitExact) {
  Fixture& f = fixture();
  const std::string name = "h.1.mlp.out.weight";
  const at::Tensor tokens = f.data.evaluation.inputs.slice(0, 0, 1);
  const at::Tensor before = f.model.logits(tokens);
  const at::Tensor original = f.model.weight(name);
  f.model.set_weight(name, at::zeros_like(original));
  EXPECT_FALSE(f.model.holds_original(name));
  EXPECT_EQ(f.net->h->at<BlockImpl>(1).mlp->out->weight.abs().sum().item<double>(), 0.0);
  EXPECT_TRUE(bitwise_equal(f.model.original_weight(name), original));
  EXPECT_EQ(f.model.original_bytes(), original.numel() * 4);
  EXPECT_FALSE(bitwise_equal(f.model.logits(tokens), before));
  f.model.restore(name);
  EXPECT_TRUE(f.model.holds_original(name));
  EXPECT_TRUE(bitwise_equal(f.model.logits(tokens), before));
}

TEST(FrontendModel, ObserveInputRecordsEachWeightsInputAndBlockCaptureEqualsWholeCapture) {
  Fixture& f = fixture();
  const at::Tensor& inputs = f.data.calibration.inputs;  // [4, 128]
  const int64_t batch = 2;
  const auto whole = f.model.capture_input_stats(inputs, batch, /*with_xtx=*/true);
  ASSERT_EQ(whole.size(), 8u);
  for (const auto& [name, s] : whole) EXPECT_EQ(s.rows, inputs.numel()) << name;
  // Block 0's first projection reads ln1 of the embedding.
  {
    c10::InferenceMode guard;
    const at::Tensor x = f.net->h->at<BlockImpl>(0).ln1(f.net->embed(inputs)).reshape({-1, 64}).to(at::kDouble);
    const InputStats& s = whole.at("h.0.attn.qkv.weight");
    EXPECT_TRUE(at::allclose(s.sq_sum, x.pow(2).sum(0), 1e-9, 1e-9));
    EXPECT_TRUE(at::allclose(s.xtx, x.t().matmul(x), 1e-9, 1e-9));
  }
  // One block at a time from the states entering it: the same numbers, bit for bit.
  BlockInputStream stream(*f.model.stages(), inputs, batch);
  for (int64_t b = 0; b < 2; ++b) {
    const auto block = f.model.capture_block_input_stats(b, stream.states(), /*with_xtx=*/true);
    ASSERT_EQ(block.size(), 4u);
    for (const auto& [name, s] : block) {
      EXPECT_EQ(s.rows, whole.at(name).rows) << name;
      EXPECT_TRUE(bitwise_equal(s.sq_sum, whole.at(name).sq_sum)) << name;
      EXPECT_TRUE(bitwise_equal(s.xtx, whole.at(name).xtx)) << name;
    }
    stream.advance();
  }
  // Outside a capture observe_input records nothing and hands back its input.
  const at::Tensor x = at::ones({2, 64});
  EXPECT_TRUE(observe_input(f.net->head->weight, x).is_same(x));
  // A forward that does not observe a weight's input is named.
  Config forgetful;
  forgetful.observe = false;
  TinyGptModel model(make_net(forgetful));
  BlockInputStream forgetful_stream(*model.stages(), inputs, batch);
  const std::string msg = test::expect_error(
      [&] { model.capture_block_input_stats(0, forgetful_stream.states(), /*with_xtx=*/false); });
  EXPECT_NE(msg.find("'h.0.attn.qkv.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("observe_input"), std::string::npos) << msg;
}

TEST(FrontendModel, EvaluatorAndImportanceAnalysisRunOnIt) {
  Fixture& f = fixture();
  const at::Tensor tokens = f.data.evaluation.inputs.slice(0, 0, 1);
  const at::Tensor before = f.model.logits(tokens);
  GradualEvaluator evaluator(f.data.calibration);
  evaluator.set_reference(f.model);
  const EvalResult self = evaluator.evaluate(f.model);
  ASSERT_TRUE(self.kl.has_value());
  EXPECT_EQ(self.kl->mean.value, 0.0);
  // A random model predicts about uniformly over the 512 tokens.
  EXPECT_GT(self.ppl.value, 100.0);
  EXPECT_LT(self.ppl.value, 5000.0);

  AnalyzerOptions o;
  o.subsets = 2;
  o.group_size = 32;
  o.batch = 2;
  ImportanceAnalyzer analyzer(f.model, f.data.calibration, o);
  const ImportanceAnalysis analysis = analyzer.run();
  EXPECT_EQ(analysis.measurement, "local");  // the harness's stages are used
  ASSERT_EQ(analysis.units.size(), 10u);     // 8 layers, 2 blocks
  for (const UnitImportance& u : analysis.units) {
    EXPECT_GE(u.rank, 1) << u.unit.name;
    EXPECT_TRUE(std::isfinite(u.score)) << u.unit.name;
    EXPECT_GT(u.probes.at("rtn_int2").kl, 0.0) << u.unit.name;
  }
  EXPECT_GT(analysis.baseline.kl, 0.0);
  EXPECT_EQ(analysis.timing.gradient_passes, 1);  // the Fisher signal went through forward()
  for (const WeightInfo& w : f.model.weights()) EXPECT_TRUE(f.model.holds_original(w.name)) << w.name;
  EXPECT_TRUE(bitwise_equal(f.model.logits(tokens), before));
}

// What gradq validated on held-out text is what the harness's own module computes with the
// outcome's weights loaded.
void expect_outcome_reproduced(Fixture& f, const QuantizerOptions& q, const QuantizeOutcome& out) {
  ASSERT_TRUE(out.heldout.has_value());
  ASSERT_TRUE(out.heldout->kl.has_value());
  for (const WeightInfo& w : f.model.weights()) EXPECT_TRUE(f.model.holds_original(w.name)) << w.name;

  TinyGpt loaded = net_with(out.weights);
  TinyGptModel harness(loaded);
  EvaluatorOptions eval_options;
  eval_options.batch = q.batch;
  eval_options.reference_storage = q.reference_storage;
  GradualEvaluator heldout(f.data.evaluation, eval_options);
  heldout.set_reference(f.model);
  const EvalResult r = heldout.evaluate(harness);
  // evaluate_by_block computes what a whole pass does, bit for bit.
  EXPECT_EQ(r.kl->mean.value, out.heldout->kl->mean.value);
  EXPECT_EQ(r.ppl.value, out.heldout->ppl.value);

  // And the logits of gradq's model with the weights set equal the harness's forward.
  const at::Tensor tokens = f.data.evaluation.inputs.slice(0, 0, 2);
  for (const auto& [name, w] : out.weights) f.model.set_weight(name, w.dequantize());
  const at::Tensor gradq_logits = f.model.logits(tokens);
  f.model.restore_all();
  c10::InferenceMode guard;
  EXPECT_TRUE(bitwise_equal(loaded->forward(tokens), gradq_logits));
  EXPECT_FALSE(bitwise_equal(f.net->forward(tokens), gradq_logits));
}

// Every weight quantized to integers, and not all alike: the budget (0.0003 nats; all at 2 bits
// measured 0.001) made the search choose per weight.
void expect_mixed_integer_plan(const QuantizeOutcome& out) {
  std::set<std::string> specs;
  for (const PlanEntry& e : out.plan.entries) {
    EXPECT_TRUE(e.spec.is_integer()) << e.name << " " << e.spec.name();
    specs.insert(e.spec.name());
  }
  EXPECT_GT(specs.size(), 1u);
  EXPECT_GT(out.size.bits_per_weight(), 2.0);
  EXPECT_LT(out.size.bits_per_weight(), 5.0);
}

TEST(FrontendModel, BudgetedSearchQuantizesEveryWeightAndTheHarnessReproducesTheValidation) {
  Fixture& f = fixture();
  QuantizerOptions q;
  q.batch = 4;
  q.budget.max_kl = 0.0003;
  q.search.group_sizes = {64, 32};
  const QuantizeOutcome out = GradualQuantizer(f.model, f.data.calibration, f.data.evaluation, q).run();
  ASSERT_EQ(out.status, QuantizeStatus::kMet) << (out.messages.empty() ? "" : out.messages.front());
  EXPECT_EQ(out.search_measurement, "local");  // searched block by block through the harness's stages
  ASSERT_EQ(out.plan.entries.size(), 8u);
  ASSERT_EQ(out.weights.size(), 8u);
  expect_mixed_integer_plan(out);
  EXPECT_LE(out.heldout->kl->mean.value, 0.0003);
  EXPECT_GT(out.heldout->kl->mean.value, 0.0);
  expect_outcome_reproduced(f, q, out);
}

TEST(FrontendModel, UniformGptqPlanIsAppliedBlockByBlockAndTheHarnessReproducesIt) {
  Fixture& f = fixture();
  QuantizerOptions q;
  q.batch = 4;
  q.plan = uniform_plan(f.model, parse_quant_spec("b4g32"), RoundingMethod::kGptq);
  const QuantizeOutcome out = GradualQuantizer(f.model, f.data.calibration, f.data.evaluation, q).run();
  ASSERT_EQ(out.status, QuantizeStatus::kMet);
  ASSERT_EQ(out.weights.size(), 8u);
  for (const PlanEntry& e : out.plan.entries) EXPECT_EQ(e.spec.name(), "b4g32") << e.name;
  EXPECT_GT(out.size.bits_per_weight(), 4.0);
  EXPECT_LT(out.size.bits_per_weight(), 5.0);
  // GPTQ rounds with the statistics the harness's observe_input calls recorded, one block at a time:
  // the same codes as with the whole model's statistics.
  const auto stats = f.model.capture_input_stats(f.data.calibration.inputs, q.batch, /*with_xtx=*/true);
  const QuantizedWeights whole = apply_plan(f.model, *q.plan, stats, q.search.rounding);
  for (const auto& [name, w] : whole) EXPECT_TRUE(bitwise_equal(w.dequantize(), out.weights.at(name).dequantize())) << name;
  expect_outcome_reproduced(f, q, out);
}

TEST(FrontendModel, ProgressiveSearchRanksTheHarnessModelAndMeetsTheBudget) {
  Fixture& f = fixture();
  QuantizerOptions q;
  q.batch = 4;
  q.budget.max_kl = 0.0003;
  q.search.strategy = SearchStrategy::kProgressive;
  q.search.method = RoundingMethod::kClip;
  q.search.group_sizes = {64, 32};
  q.search.rounding.trained.iterations = 20;
  q.analyzer.subsets = 2;
  q.analyzer.group_size = 32;
  const QuantizeOutcome out = GradualQuantizer(f.model, f.data.calibration, f.data.evaluation, q).run();
  ASSERT_EQ(out.status, QuantizeStatus::kMet) << (out.messages.empty() ? "" : out.messages.front());
  // The order came from an importance analysis of the harness's model.
  ASSERT_EQ(out.order.size(), 8u);
  EXPECT_TRUE(std::any_of(out.phases.begin(), out.phases.end(), [](const PhaseTiming& p) { return p.name == "analysis"; }));
  ASSERT_EQ(out.plan.entries.size(), 8u);
  expect_mixed_integer_plan(out);
  EXPECT_LE(out.heldout->kl->mean.value, 0.0003);
  expect_outcome_reproduced(f, q, out);
}

}  // namespace
}  // namespace gradq
