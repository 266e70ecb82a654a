// GradualEvaluator on stories260K and real TinyStories text, checked against independent computations.

#include <gtest/gtest.h>
#include <torch/serialize.h>

#include <filesystem>
#include <fstream>

#include "common/error.h"
#include "data/dataset.h"
#include "eval/evaluator.h"
#include "model/causal_lm.h"
#include "support/test_helpers.h"
#include "support/test_support.h"
#include "tokenizer/tokenizer.h"

namespace gradq {
namespace {

struct Setup {
  CausalLM model = CausalLM::load(test::stories_pt());
  std::vector<int64_t> tokens;
  Setup() {
    auto tok = Tokenizer::load_sentencepiece(test::tokenizer_model());
    std::string text = read_text_file(test::tinystories_text()).substr(0, 40000);
    tokens = tok->encode(text);
  }
};
Setup& setup() {
  static Setup s;
  return s;
}

Windows windows(int64_t ctx, int64_t stride, int64_t max_windows) {
  WindowSpec spec;
  spec.ctx = ctx;
  spec.stride = stride;
  spec.bos_id = 1;
  spec.max_windows = max_windows;
  return make_windows(setup().tokens, spec);
}

// Token-by-token NLL, one window at a time, straight from the logits.
double nll_by_hand(const CausalLM& model, const Windows& w, int64_t* count) {
  double sum = 0;
  *count = 0;
  for (int64_t i = 0; i < w.size(); ++i) {
    at::Tensor logits = model.logits(w.inputs[i].unsqueeze(0))[0].to(at::kDouble);
    for (int64_t p = w.score_from[i].item<int64_t>(); p < w.inputs.size(1); ++p) {
      at::Tensor lp = at::log_softmax(logits[p], -1);
      sum -= lp[w.targets[i][p].item<int64_t>()].item<double>();
      ++*count;
    }
  }
  return sum;
}

class Perplexity : public ::testing::TestWithParam<std::tuple<int64_t, int64_t>> {};

TEST_P(Perplexity, EqualsTokenByTokenComputation) {
  auto [ctx, stride] = GetParam();
  Windows w = windows(ctx, stride, 6);
  EvaluatorOptions opt;
  opt.batch = 4;  // not a divisor of 6: a partial last batch
  GradualEvaluator ev(w, opt);
  EvalResult r = ev.evaluate(setup().model);
  int64_t count = 0;
  const double nll = nll_by_hand(setup().model, w, &count);
  EXPECT_EQ(r.tokens, count);
  EXPECT_EQ(r.tokens, w.scored_tokens());
  EXPECT_NEAR(r.ppl.value, std::exp(nll / count), 1e-4 * std::exp(nll / count));
  EXPECT_GT(r.ppl.stderr_, 0);
  // stories260K on TinyStories with real context: far better than uniform (512). With one or two
  // tokens of context it confidently predicts a story start mid-story, so no bound applies there.
  if (ctx >= 64) {
    EXPECT_LT(r.ppl.value, 20.0);
    EXPECT_GT(r.ppl.value, 1.5);
  }
}

INSTANTIATE_TEST_SUITE_P(CtxStride, Perplexity,
                         ::testing::Values(std::make_tuple(64, 64), std::make_tuple(64, 32), std::make_tuple(64, 1),
                                           std::make_tuple(128, 100), std::make_tuple(2, 2)),
                         [](const auto& info) {
                           return "ctx" + std::to_string(std::get<0>(info.param)) + "_stride" +
                                  std::to_string(std::get<1>(info.param));
                         });

TEST(Evaluator, KlAgainstItselfIsZero) {
  GradualEvaluator ev(windows(128, 128, 8));
  ev.set_reference(setup().model);
  EvalResult r = ev.evaluate(setup().model);
  ASSERT_TRUE(r.kl.has_value());
  EXPECT_NEAR(r.kl->mean.value, 0.0, 1e-7);
  EXPECT_NEAR(r.kl->max, 0.0, 1e-6);
  EXPECT_DOUBLE_EQ(r.kl->same_top_rate, 1.0);
  EXPECT_NEAR(r.kl->ppl_ratio.value, 1.0, 1e-9);
  EXPECT_NEAR(r.kl->delta_ppl.value, 0.0, 1e-9);
  EXPECT_NEAR(r.kl->delta_p_rms, 0.0, 1e-9);
}

TEST(Evaluator, KlAgainstPerturbedCopyEqualsDirectComputation) {
  Windows w = windows(128, 64, 6);
  GradualEvaluator ev(w);
  ev.set_reference(setup().model);
  CausalLM& model = setup().model;
  at::Generator g = at::detail::createCPUGenerator(11);
  for (const auto& info : model.weights()) {
    at::Tensor v = model.weight(info.name);
    model.set_weight(info.name, v + at::normal(0, 0.3, v.sizes(), g) * v.std());
  }
  EvalResult r = ev.evaluate(model);

  // Direct: KL(P_ref || P_model) per scored token, from the two models' logits.
  at::Tensor mask = at::arange(128).unsqueeze(0) >= w.score_from.unsqueeze(1);
  at::Tensor lq = at::log_softmax(model.logits(w.inputs).index({mask}).to(at::kDouble), -1);
  model.restore_all();
  at::Tensor lr = at::log_softmax(model.logits(w.inputs).index({mask}).to(at::kDouble), -1);
  at::Tensor kl = (lr.exp() * (lr - lq)).sum(-1);
  ASSERT_TRUE(r.kl.has_value());
  EXPECT_GT(r.kl->mean.value, 1e-3);
  EXPECT_NEAR(r.kl->mean.value, kl.mean().item<double>(), 1e-5 * kl.mean().item<double>() + 1e-7);
  EXPECT_NEAR(r.kl->max, kl.max().item<double>(), 1e-4 * kl.max().item<double>());
  EXPECT_LT(r.kl->same_top_rate, 1.0);
  EXPECT_GT(r.kl->ppl_ratio.value, 1.0);
  EXPECT_NEAR(r.kl->median, kl.median().item<double>(), 0.05 * kl.median().item<double>());
  // Percentiles are ordered.
  for (size_t i = 1; i < r.kl->percentiles.size(); ++i) EXPECT_GE(r.kl->percentiles[i - 1], r.kl->percentiles[i]);
  EXPECT_NEAR(r.ppl.value / r.reference_ppl->value, r.kl->ppl_ratio.value, 1e-9 * r.kl->ppl_ratio.value);
}

TEST(Evaluator, ReferenceSaveLoadRoundTripAndMismatch) {
  const std::string dir = test::temp_dir("reference");
  GradualEvaluator a(windows(64, 64, 5));
  a.set_reference(setup().model);
  a.reference()->save(dir + "/ref.bin");
  GradualEvaluator b(windows(64, 64, 5));
  b.set_reference(Reference::load(dir + "/ref.bin"));
  EXPECT_TRUE(at::equal(a.reference()->log_probs, b.reference()->log_probs));
  EvalResult ra = a.evaluate(setup().model), rb = b.evaluate(setup().model);
  EXPECT_EQ(ra.ppl.value, rb.ppl.value);
  EXPECT_EQ(ra.kl->mean.value, rb.kl->mean.value);
  EXPECT_EQ(ra.kl->same_top_rate, rb.kl->same_top_rate);
  GradualEvaluator c(windows(64, 32, 5));
  EXPECT_THROW(c.set_reference(Reference::load(dir + "/ref.bin")), Error);
  std::ofstream(dir + "/junk.bin") << "junk";
  EXPECT_THROW(Reference::load(dir + "/junk.bin"), Error);
}

// --- Compact reference storage (fp16, top-k + tail) ----------------------------------------------

// Every quantizable weight plus Gaussian noise of 0.03 of its standard deviation (seeded); undone by
// model.restore_all().
void perturb(CausalLM& model, uint64_t seed) {
  at::Generator g = at::detail::createCPUGenerator(seed);
  for (const auto& info : model.weights()) {
    at::Tensor v = model.weight(info.name);
    model.set_weight(info.name, v + at::normal(0, 0.03, v.sizes(), g) * v.std());
  }
}

// The stories260K reference over 6 windows of 128 tokens, and a perturbed copy of the model
// (weights + 0.03 sigma noise): KL around 0.05 nats, the range the search's budgets land in.
struct CompactSetup {
  Windows w = windows(128, 128, 6);
  Reference full;
  at::Tensor model_lp;  ///< [tokens, vocab] float32 of the perturbed model
  EvalResult full_result;
  CompactSetup() {
    GradualEvaluator ev(w);
    ev.set_reference(setup().model);
    full = *ev.reference();
    CausalLM& model = setup().model;
    perturb(model, 5);
    model_lp = ev.scored_log_probs(model);
    full_result = ev.evaluate(model);
    model.restore_all();
  }
};
CompactSetup& compact() {
  static CompactSetup s;
  return s;
}

// The perturbed model's logits again, through a LogitsSource (no model needed: the stored log-probs
// are logits whose softmax is themselves).
EvalResult evaluate_perturbed(GradualEvaluator& ev) {
  const Windows& w = compact().w;
  at::Tensor mask = at::arange(w.inputs.size(1)).unsqueeze(0) >= w.score_from.unsqueeze(1);
  const int64_t vocab = compact().model_lp.size(1);
  at::Tensor logits = at::zeros({w.size(), w.inputs.size(1), vocab});
  logits.index_put_({mask}, compact().model_lp);
  return ev.evaluate([&](int64_t b, int64_t e) { return logits.slice(0, b, e); });
}

EvalResult evaluate_storage(ReferenceStorage storage) {
  GradualEvaluator ev(compact().w);
  ev.set_reference(compact().full.to_storage(storage));
  return evaluate_perturbed(ev);
}

TEST(ReferenceStorage, ParsesNamesAndRejectsBadOnes) {
  EXPECT_EQ(ReferenceStorage::parse("fp32"), ReferenceStorage::float32());
  EXPECT_EQ(ReferenceStorage::parse("fp16"), ReferenceStorage::float16());
  EXPECT_EQ(ReferenceStorage::parse("top64"), ReferenceStorage::top_k(64));
  EXPECT_EQ(ReferenceStorage::parse("top1").k, 1);
  for (const char* name : {"fp32", "fp16", "top7", "top128"}) EXPECT_EQ(ReferenceStorage::parse(name).name(), name);
  for (const char* bad : {"", "fp8", "bf16", "top", "top0", "top-3", "top+3", "TOP4", "top64x", " top4", "top99999999999"})
    GRADQ_EXPECT_THROW_MSG(ReferenceStorage::parse(bad), "expected fp32, fp16, top<K> with K >= 1 (e.g. top64), head or auto");
  GRADQ_EXPECT_THROW_MSG(ReferenceStorage::top_k(0), "k >= 1, got k = 0");
  EXPECT_EQ(ReferenceStorage::float32().bytes_per_token(512), 4 * 512 + 20);
  EXPECT_EQ(ReferenceStorage::float16().bytes_per_token(512), 2 * 512 + 20);
  EXPECT_EQ(ReferenceStorage::top_k(64).bytes_per_token(512), 8 * 64 + 24);
  EXPECT_EQ(ReferenceStorage::parse("head"), ReferenceStorage::head());
  EXPECT_EQ(ReferenceStorage::head().name(), "head");
  EXPECT_EQ(ReferenceStorage::head().bytes_per_token(32000), 20);
  EXPECT_EQ(ReferenceStorage::parse("auto"), ReferenceStorage::automatic());
  EXPECT_EQ(ReferenceStorage::automatic().name(), "auto");
}

TEST(CompactReference, BytesFollowTheStorage) {
  const Reference& full = compact().full;
  const int64_t tokens = full.tokens(), vocab = full.vocab, fingerprint = full.windows_fingerprint.numel() * 8;
  for (const char* name : {"fp32", "fp16", "top16", "top64"}) {
    const ReferenceStorage s = ReferenceStorage::parse(name);
    const Reference r = full.to_storage(s);
    EXPECT_EQ(r.storage, s);
    EXPECT_EQ(r.bytes(), tokens * s.bytes_per_token(vocab) + fingerprint) << name;
  }
  EXPECT_LT(full.to_storage(ReferenceStorage::top_k(64)).bytes() * 3, full.bytes());
}

// A head reference recomputes float32 log-probabilities from the head's inputs: every statistic equals
// float32 storage's bit for bit (the staged head computes what the whole forward does), in a
// fraction of the bytes (stories260K: 64 values of state per token against 512 log-probabilities).
TEST(CompactReference, HeadEqualsFloat32Exactly) {
  for (int64_t batch : {1, 4}) {  // 6 windows: a partial last batch at 4
    EvaluatorOptions opt;
    opt.batch = batch;
    opt.reference_storage = ReferenceStorage::float32();
    GradualEvaluator full(compact().w, opt);
    full.set_reference(setup().model);
    opt.reference_storage = ReferenceStorage::head();
    GradualEvaluator head(compact().w, opt);
    head.set_reference(setup().model);
    ASSERT_TRUE(head.reference()->head);
    EXPECT_FALSE(head.reference()->log_probs.defined());
    EXPECT_LT(head.reference()->bytes() * 4, full.reference()->bytes());
    CausalLM& model = setup().model;
    perturb(model, 9);
    const EvalResult a = full.evaluate(model), b = head.evaluate(model);
    const GradualEvaluator::TokenScores sa = full.token_scores(full.whole_model(model));
    const GradualEvaluator::TokenScores sb = head.token_scores(head.whole_model(model));
    model.restore_all();
    EXPECT_GT(a.kl->mean.value, 0.01);
    EXPECT_EQ(a.kl->mean.value, b.kl->mean.value) << "batch " << batch;
    EXPECT_EQ(a.kl->max, b.kl->max);
    EXPECT_EQ(a.kl->percentiles, b.kl->percentiles);
    EXPECT_EQ(a.kl->same_top_rate, b.kl->same_top_rate);
    EXPECT_EQ(a.kl->delta_ppl.value, b.kl->delta_ppl.value);
    EXPECT_TRUE(at::equal(sa.kl, sb.kl));
    EXPECT_TRUE(at::equal(sa.nll, sb.nll));
  }
}

// A head reference holds its model's stages: it still recomputes the same reference after the
// CausalLM it came from is gone (gradq eval's --reference model is such a temporary).
TEST(CompactReference, HeadOutlivesItsModel) {
  EvaluatorOptions opt;
  opt.reference_storage = ReferenceStorage::head();
  GradualEvaluator orphan(compact().w, opt), kept(compact().w, opt);
  {
    CausalLM temporary = CausalLM::load(test::stories_pt());
    orphan.set_reference(temporary);
  }
  kept.set_reference(setup().model);
  CausalLM& model = setup().model;
  perturb(model, 11);
  const EvalResult a = kept.evaluate(model), b = orphan.evaluate(model);
  model.restore_all();
  EXPECT_GT(a.kl->mean.value, 0.01);
  EXPECT_EQ(a.kl->mean.value, b.kl->mean.value);
  EXPECT_EQ(a.kl->percentiles, b.kl->percentiles);
}

// What a head reference cannot do says so: be saved, be made from logits alone, or serve a model
// whose head or embeddings are quantizable (the recomputed reference would use them).
TEST(CompactReference, HeadRefusesWhatItCannotDo) {
  EvaluatorOptions opt;
  opt.reference_storage = ReferenceStorage::head();
  GradualEvaluator ev(compact().w, opt);
  GRADQ_EXPECT_THROW_MSG(ev.set_reference(ev.whole_model(setup().model)), "needs the model itself");
  ev.set_reference(setup().model);
  const std::string dir = test::temp_dir("head_reference");
  GRADQ_EXPECT_THROW_MSG(ev.reference()->save(dir + "/r.pt"), "a head reference cannot be saved");
  EXPECT_FALSE(std::filesystem::exists(dir + "/r.pt"));
  GRADQ_EXPECT_THROW_MSG(ev.reference()->token_kl(0, at::zeros({1, 512})), "has no stored rows");
  AdapterOptions with_head;
  with_head.include = {"tok_embeddings"};
  CausalLM quantized_head = CausalLM::load(test::stories_pt(), with_head);
  GRADQ_EXPECT_THROW_MSG(ev.set_reference(quantized_head), "only weights inside blocks may be quantized; 'tok_embeddings.weight'");
  GRADQ_EXPECT_THROW_MSG(compact().full.to_storage(ReferenceStorage::head()), "converts to fp32, fp16 or top<K>, not head");
  GRADQ_EXPECT_THROW_MSG(compact().full.to_storage(ReferenceStorage::automatic()), "not auto");
}

// auto keeps the head's inputs when fp16 log-probabilities would pass the threshold and the model
// allows a head reference; fp16 otherwise (below it, a quantizable embedding or head, logits alone).
TEST(CompactReference, AutoChoosesHeadAboveTheThreshold) {
  const int64_t fp16_bytes = compact().w.scored_tokens() * ReferenceStorage::float16().bytes_per_token(512);
  EvaluatorOptions opt;
  opt.reference_storage = ReferenceStorage::automatic();
  opt.auto_head_above_bytes = fp16_bytes - 1;
  GradualEvaluator above(compact().w, opt);
  EXPECT_EQ(above.resolve_storage(setup().model), ReferenceStorage::head());
  above.set_reference(setup().model);
  EXPECT_EQ(above.reference()->storage, ReferenceStorage::head());
  AdapterOptions with_embeddings;
  with_embeddings.include = {"tok_embeddings"};
  EXPECT_EQ(above.resolve_storage(CausalLM::load(test::stories_pt(), with_embeddings)), ReferenceStorage::float16());
  above.set_reference(above.whole_model(setup().model));
  EXPECT_EQ(above.reference()->storage, ReferenceStorage::float16());

  opt.auto_head_above_bytes = fp16_bytes;
  GradualEvaluator at(compact().w, opt);
  EXPECT_EQ(at.resolve_storage(setup().model), ReferenceStorage::float16());
  at.set_reference(setup().model);
  EXPECT_EQ(at.reference()->storage, ReferenceStorage::float16());
  EXPECT_EQ(at.reference()->bytes(), compact().full.to_storage(ReferenceStorage::float16()).bytes());
  // The default threshold keeps stories260K's 21 MB of fp16 log-probabilities (80 windows of 256 tokens).
  EXPECT_GT(EvaluatorOptions{}.auto_head_above_bytes, 80 * 256 * ReferenceStorage::float16().bytes_per_token(512));
}

TEST(CompactReference, ComputedBatchByBatchEqualsConverted) {
  for (const char* name : {"fp16", "top32"}) {
    EvaluatorOptions opt;
    opt.batch = 4;  // 6 windows: a partial last batch
    opt.reference_storage = ReferenceStorage::parse(name);
    GradualEvaluator ev(compact().w, opt);
    ev.set_reference(setup().model);
    const Reference& a = *ev.reference();
    // Converted from a float32 reference of the same batches (another batch size rounds the forward
    // pass differently).
    opt.reference_storage = ReferenceStorage::float32();
    GradualEvaluator full(compact().w, opt);
    full.set_reference(setup().model);
    const Reference b = full.reference()->to_storage(ReferenceStorage::parse(name));
    EXPECT_EQ(a.storage, b.storage);
    EXPECT_TRUE(at::equal(a.log_probs, b.log_probs)) << name;
    EXPECT_TRUE(at::equal(a.target_log_probs, b.target_log_probs)) << name;
    EXPECT_TRUE(at::equal(a.top_tokens, b.top_tokens)) << name;
    if (b.top_indices.defined()) {
      EXPECT_TRUE(at::equal(a.top_indices, b.top_indices)) << name;
      // logsumexp's reduction may split rows differently for another batch size: rounding only.
      EXPECT_TRUE(at::allclose(a.log_tail, b.log_tail, 1e-5, 1e-6)) << name;
    }
  }
}

TEST(CompactReference, TopKOfTheWholeVocabularyEqualsFloat32Exactly) {
  const Reference& full = compact().full;
  const Reference all = full.to_storage(ReferenceStorage::top_k(full.vocab));
  EXPECT_TRUE(at::equal(all.token_kl(0, compact().model_lp), full.token_kl(0, compact().model_lp)));
  const EvalResult a = evaluate_storage(ReferenceStorage::float32());
  const EvalResult b = evaluate_storage(ReferenceStorage::top_k(full.vocab));
  ASSERT_TRUE(a.kl && b.kl);
  EXPECT_GT(a.kl->mean.value, 1e-3);
  EXPECT_EQ(a.kl->mean.value, b.kl->mean.value);
  EXPECT_EQ(a.kl->mean.stderr_, b.kl->mean.stderr_);
  EXPECT_EQ(a.kl->max, b.kl->max);
  EXPECT_EQ(a.kl->median, b.kl->median);
  EXPECT_EQ(a.kl->percentiles, b.kl->percentiles);
  EXPECT_EQ(a.kl->same_top_rate, b.kl->same_top_rate);
  EXPECT_EQ(a.kl->ppl_ratio.value, b.kl->ppl_ratio.value);
  // And float32 storage is the evaluator's formula of before storages, per token bit for bit.
  const at::Tensor ref = full.log_probs, lp = compact().model_lp;
  EXPECT_TRUE(at::equal(full.token_kl(0, lp), (ref.exp() * (ref - lp)).sum(-1).clamp_min(0)));
  // The model's own pass gives the same KL up to the rounding of log_softmax(log_probs) != log_probs.
  EXPECT_NEAR(a.kl->mean.value, compact().full_result.kl->mean.value, 1e-6 * a.kl->mean.value);
}

// The KL error each compact storage introduces on this model, and the statistics that must stay
// exact. Tolerances are relative to the float32 mean KL; the measured errors are in
// docs/BENCHMARKS.md ("Compact reference log-probabilities").
struct StorageCase {
  const char* name;
  double max_relative_kl_error;
};

class CompactStorage : public ::testing::TestWithParam<StorageCase> {};

TEST_P(CompactStorage, KlCloseToFloat32AndOtherStatisticsExact) {
  const StorageCase c = GetParam();
  const ReferenceStorage storage = ReferenceStorage::parse(c.name);
  const EvalResult a = evaluate_storage(ReferenceStorage::float32()), b = evaluate_storage(storage);
  ASSERT_TRUE(a.kl && b.kl);
  const double kl = a.kl->mean.value;
  ASSERT_GT(kl, 1e-2);
  std::printf("%s: mean KL %.6g against float32 %.6g (%+.4f%%)\n", c.name, b.kl->mean.value, kl,
              100 * (b.kl->mean.value / kl - 1));
  EXPECT_NEAR(b.kl->mean.value, kl, c.max_relative_kl_error * kl) << c.name;
  EXPECT_EQ(b.kl->storage, storage);
  // Perplexities, the ratio, delta p and same-top come from full-precision extras: exact.
  EXPECT_EQ(a.reference_ppl->value, b.reference_ppl->value);
  EXPECT_EQ(a.kl->ppl_ratio.value, b.kl->ppl_ratio.value);
  EXPECT_EQ(a.kl->delta_ppl.value, b.kl->delta_ppl.value);
  EXPECT_EQ(a.kl->delta_p_mean.value, b.kl->delta_p_mean.value);
  EXPECT_EQ(a.kl->delta_p_rms, b.kl->delta_p_rms);
  EXPECT_EQ(a.kl->same_top_rate, b.kl->same_top_rate);
  EXPECT_EQ(a.kl->ln_ppl_correlation, b.kl->ln_ppl_correlation);
  if (storage.kind == ReferenceStorage::Kind::kTopK) {
    // Coarsening never raises a KL: per token, up to float32 rounding of the sums.
    const at::Tensor full_kl = compact().full.token_kl(0, compact().model_lp);
    const at::Tensor top_kl = compact().full.to_storage(storage).token_kl(0, compact().model_lp);
    const at::Tensor excess = top_kl - full_kl - 1e-6 * (1 + full_kl);
    EXPECT_LE(excess.max().item<double>(), 0.0) << c.name;
    EXPECT_LE(b.kl->mean.value, kl * (1 + 1e-6)) << c.name;
    EXPECT_LT(b.kl->mean.value, kl) << c.name;  // a real tail: the bound is not tight here
  }
}

INSTANTIATE_TEST_SUITE_P(Storages, CompactStorage,
                         ::testing::Values(StorageCase{"fp16", 1e-3}, StorageCase{"top16", 0.1},
                                           StorageCase{"top32", 0.03}, StorageCase{"top64", 0.005},
                                           StorageCase{"top128", 0.001}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(CompactReference, ModelAgainstItsOwnCompactReference) {
  // top-k: equal distributions stay equal after coarsening, so zero. fp16: the rounding is
  // renormalized away to second order (3.2e-5 mean, 4.4e-4 max on 32 windows without it).
  const at::Tensor lp = compact().full.log_probs;
  for (const char* name : {"fp16", "top16"}) {
    const at::Tensor kl = compact().full.to_storage(ReferenceStorage::parse(name)).token_kl(0, lp);
    EXPECT_LT(kl.mean().item<double>(), 1e-6) << name;
    EXPECT_LT(kl.max().item<double>(), 2e-5) << name;
  }
}

TEST(CompactReference, ArgmaxTiesBeyondKStayExact) {
  // A uniform reference row: every token ties for the top; same-top must still be the argmax's
  // (index 0), whichever k tokens topk keeps.
  at::Tensor lp = at::log_softmax(at::zeros({3, 40}), -1);
  lp[1][7] = lp[1][7] + 1e-3;  // row 1 has a unique top
  const at::Tensor targets = at::tensor(std::vector<int64_t>{0, 1, 2});
  const Reference r = Reference::from_log_probs(lp, targets, ReferenceStorage::top_k(4));
  EXPECT_EQ(r.top_tokens[0].item<int64_t>(), 0);
  EXPECT_EQ(r.top_tokens[1].item<int64_t>(), 7);
  EXPECT_EQ(r.top_indices[0][0].item<int>(), 0);
  EXPECT_EQ(r.top_indices[1][0].item<int>(), 7);
  // Kept indices stay distinct after the argmax is moved to the front.
  for (int64_t i = 0; i < 3; ++i) EXPECT_EQ(std::get<0>(at::_unique(r.top_indices[i])).numel(), 4) << i;
  // The tail is the other 36 tokens' mass: log(36/40) on the uniform rows.
  EXPECT_NEAR(r.log_tail[0].item<double>(), std::log(36.0 / 40.0), 1e-5);
  // Against itself: zero KL, even with the tail.
  EXPECT_LT(r.token_kl(0, lp).abs().max().item<double>(), 1e-6);
}

TEST(CompactReference, SaveLoadRoundTripForEachStorage) {
  const std::string dir = test::temp_dir("reference_storage");
  for (const char* name : {"fp32", "fp16", "top1", "top16", "top64"}) {
    const ReferenceStorage storage = ReferenceStorage::parse(name);
    const Reference r = compact().full.to_storage(storage);
    const std::string path = dir + "/" + name + ".ref";
    r.save(path);
    const Reference l = Reference::load(path);
    EXPECT_EQ(l.storage, storage) << name;
    EXPECT_EQ(l.vocab, r.vocab) << name;
    EXPECT_EQ(l.log_probs.scalar_type(), r.log_probs.scalar_type()) << name;
    for (auto [x, y] : {std::pair{&r.log_probs, &l.log_probs}, {&r.targets, &l.targets},
                        {&r.target_log_probs, &l.target_log_probs}, {&r.top_tokens, &l.top_tokens},
                        {&r.top_indices, &l.top_indices}, {&r.log_tail, &l.log_tail},
                        {&r.windows_fingerprint, &l.windows_fingerprint}}) {
      ASSERT_EQ(x->defined(), y->defined()) << name;
      if (x->defined()) EXPECT_TRUE(at::equal(*x, *y)) << name;
    }
    GradualEvaluator a(compact().w), b(compact().w);
    a.set_reference(r);
    b.set_reference(l);
    const EvalResult ra = evaluate_perturbed(a), rb = evaluate_perturbed(b);
    EXPECT_EQ(ra.kl->mean.value, rb.kl->mean.value) << name;
    EXPECT_EQ(ra.kl->same_top_rate, rb.kl->same_top_rate) << name;
  }
  // A compact reference cannot become another kind.
  GRADQ_EXPECT_THROW_MSG(compact().full.to_storage(ReferenceStorage::float16()).to_storage(ReferenceStorage::top_k(8)),
                         "only a float32 reference converts");
}

c10::Dict<std::string, at::Tensor> reference_dict(const Reference& r) {
  c10::Dict<std::string, at::Tensor> d;
  d.insert("log_probs", r.log_probs);
  d.insert("targets", r.targets);
  d.insert("windows", r.windows_fingerprint);
  return d;
}

std::string pickled(const c10::Dict<std::string, at::Tensor>& d) {
  std::vector<char> bytes = torch::pickle_save(c10::IValue(d));
  return std::string(bytes.begin(), bytes.end());
}

TEST(CompactReference, FilesOfEarlierVersionsLoadAsFloat32) {
  // What Reference::save wrote before storages: three entries, no "storage".
  const Reference& full = compact().full;
  const Reference l = Reference::from_bytes(pickled(reference_dict(full)), "old.ref");
  EXPECT_EQ(l.storage, ReferenceStorage::float32());
  EXPECT_EQ(l.vocab, full.vocab);
  EXPECT_TRUE(at::equal(l.target_log_probs, full.target_log_probs));
  EXPECT_TRUE(at::equal(l.top_tokens, full.top_tokens));
  GradualEvaluator ev(compact().w);
  ev.set_reference(l);
  EXPECT_EQ(evaluate_perturbed(ev).kl->mean.value, evaluate_storage(ReferenceStorage::float32()).kl->mean.value);
}

TEST(CompactReference, MalformedFilesNameExpectedAndActual) {
  const Reference top = compact().full.to_storage(ReferenceStorage::top_k(8));
  auto with = [&](const Reference& r, const std::vector<std::pair<std::string, at::Tensor>>& entries) {
    c10::Dict<std::string, at::Tensor> d = reference_dict(r);
    for (const auto& [k, v] : entries) d.insert_or_assign(k, v);
    return pickled(d);
  };
  auto storage = [](int64_t kind, int64_t k, int64_t vocab) { return at::tensor(std::vector<int64_t>{kind, k, vocab}); };
  const std::vector<std::pair<std::string, at::Tensor>> ok = {
      {"storage", storage(2, 8, top.vocab)}, {"target_log_probs", top.target_log_probs},
      {"top_tokens", top.top_tokens}, {"top_indices", top.top_indices}, {"log_tail", top.log_tail}};
  EXPECT_EQ(Reference::from_bytes(with(top, ok), "ok.ref").storage, ReferenceStorage::top_k(8));
  auto changed = [&](const std::string& key, const at::Tensor& value) {
    auto entries = ok;
    for (auto& [k, v] : entries)
      if (k == key) v = value;
    return with(top, entries);
  };
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(changed("storage", storage(7, 8, top.vocab)), "a.ref"),
                         "storage kind 7, expected 0 (fp32), 1 (fp16) or 2 (top-k)");
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(changed("storage", storage(2, 9, top.vocab)), "b.ref"),
                         "expected log_probs Float [tokens, 9]");
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(changed("storage", storage(2, 8, 4)), "c.ref"),
                         "k = 8, expected 1 <= k <= vocabulary 4");
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(changed("storage", at::zeros({2}, at::kLong)), "d.ref"),
                         "expected storage Long [3], got Long [2]");
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(changed("top_indices", top.top_indices.to(at::kLong)), "e.ref"),
                         "expected top_indices Int [tokens, 8]");
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(changed("top_indices", top.top_indices + top.vocab), "f.ref"),
                         fmt::format("top_indices in [{}, {}], expected [0, {})",
                                     top.top_indices.min().item<int>() + top.vocab,
                                     top.top_indices.max().item<int>() + top.vocab, top.vocab));
  at::Tensor repeated = top.top_indices.clone();
  repeated.select(1, 1).copy_(repeated.select(1, 0));
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(changed("top_indices", repeated), "g.ref"),
                         "keep a token twice, expected distinct top_indices");
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(changed("log_tail", top.log_tail.slice(0, 1)), "h.ref"),
                         "expected log_tail Float [tokens]");
  auto missing = ok;
  missing.pop_back();
  GRADQ_EXPECT_THROW_MSG(Reference::from_bytes(with(top, missing), "i.ref"), "key 'log_tail' (Float [tokens]) missing");
  // An fp16 file with float32 values.
  GRADQ_EXPECT_THROW_MSG(
      Reference::from_bytes(with(compact().full, {{"storage", storage(1, 0, compact().full.vocab)},
                                                  {"target_log_probs", top.target_log_probs},
                                                  {"top_tokens", top.top_tokens}}),
                            "j.ref"),
      "corrupt gradq fp16 reference file: expected log_probs Half [tokens, vocab]");
  // A model whose vocabulary differs from the reference's is refused by name.
  GRADQ_EXPECT_THROW_MSG(top.token_kl(0, at::zeros({2, top.vocab + 1})), "do not fit the reference");
}

TEST(Evaluator, TableAndJsonCarryTheNumbers) {
  GradualEvaluator ev(windows(64, 64, 3));
  ev.set_reference(setup().model);
  EvalResult r = ev.evaluate(setup().model);
  const std::string table = format_eval_table(r);
  for (const char* key : {"PPL", "mean KL", "99.9% KL", "median KL", "same top token", "RMS delta p"})
    EXPECT_NE(table.find(key), std::string::npos) << key;
  const std::string json = eval_result_json(r);
  EXPECT_NE(json.find("\"same_top_rate\""), std::string::npos);
  EXPECT_NE(json.find(fmt::format("{}", r.tokens)), std::string::npos);
  EXPECT_NE(json.find("\"reference_storage\": \"fp32\""), std::string::npos) << json;
  EXPECT_EQ(table.find("reference storage"), std::string::npos);  // float32: the table of earlier versions
  GradualEvaluator top(windows(64, 64, 3), EvaluatorOptions{8, true, ReferenceStorage::top_k(16)});
  top.set_reference(setup().model);
  EXPECT_NE(format_eval_table(top.evaluate(setup().model)).find("top16 (KL rows: lower bounds"),
            std::string::npos);
}

}  // namespace
}  // namespace gradq
