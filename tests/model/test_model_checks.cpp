// What gradq checks about a model before trusting it: its logits (type, dtype, finiteness) and the
// longest window its forward accepts.

#include <gtest/gtest.h>

#include "common/error.h"
#include "eval/evaluator.h"
#include "model/context_check.h"
#include "model/model_loader.h"
#include "support/gpt_fixture.h"
#include "support/test_support.h"

namespace gradq {
namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

const char* kShape = "tokens.size(0), tokens.size(1), 512";

TEST(ModelChecks, LogitsMustBeOneFloatingTensorOrInAHuggingFaceContainer) {
  const std::string int64 = error_of([] {
    CausalLM m(test::scripted_module(fmt::format("    return torch.zeros([{}]).long()\n", kShape)));
  });
  EXPECT_NE(int64.find("floating-point logits, it returns Long"), std::string::npos) << int64;
  // Hugging Face's containers: a tuple that starts with the logits, a dict holding them under "logits".
  const std::string logits = fmt::format("    x = torch.zeros([{}])\n    x[:, :, 5] = 1.0\n", kShape);
  for (const char* returned : {"    return (x, x + 1)\n", "    return {\"loss\": x + 1, \"logits\": x}\n"}) {
    CausalLM m(test::scripted_module(logits + returned));
    EXPECT_EQ(m.vocab_size(), 512) << returned;
    EXPECT_EQ(m.logits(at::zeros({1, 3}, at::kLong)).select(2, 5).sum().item<double>(), 3.0) << returned;
  }
  for (const char* returned : {"    return (5, x)\n", "    return {\"scores\": x}\n"}) {
    const std::string msg = error_of([&] { CausalLM m(test::scripted_module(logits + returned)); });
    EXPECT_NE(msg.find("forward must return the logits as one tensor [B, T, vocab], a tuple that starts with them or "
                       "a dict with \"logits\"; it returns a "),
              std::string::npos) << msg;
    EXPECT_EQ(msg.find("fails on int64 tokens"), std::string::npos) << msg;
  }
  // float64 logits are converted to float32.
  CausalLM f64(test::scripted_module(fmt::format("    return torch.zeros([{}]).double()\n", kShape)));
  EXPECT_EQ(f64.logits(at::zeros({2, 5}, at::kLong)).scalar_type(), at::kFloat);
}

// A model traced with an attention mask beside the tokens is refused with what to do; an input with a
// default is fine (gradq passes the tokens alone).
TEST(ModelChecks, ForwardMustTakeTheTokensAlone) {
  const std::string logits = fmt::format("    return torch.zeros([{}])\n", kShape);
  torch::jit::Module two("TwoInputs");
  two.define("def forward(self, tokens, attention_mask):\n" + logits);
  const std::string msg = error_of([&] { CausalLM m(two); });
  EXPECT_NE(msg.find("forward must take the tokens alone, forward(tokens) -> logits; it takes 2 input(s) without a "
                     "default (tokens, attention_mask)"),
            std::string::npos) << msg;
  torch::jit::Module optional("OptionalMask");
  optional.define("def forward(self, tokens, attention_mask: Optional[Tensor] = None):\n" + logits);
  EXPECT_EQ(CausalLM(optional).vocab_size(), 512);
}

// The defaulted input is a constant of the staged graph: the stages give the whole forward's logits.
TEST(ModelChecks, AnInputWithADefaultKeepsTheStages) {
  torch::jit::Module wrapper = test::make_gpt_fixture_with_defaulted_inputs();
  CausalLM model(wrapper);
  ASSERT_NE(model.stages(), nullptr) << model.stages_unavailable_reason();
  const at::Tensor tokens = (at::arange(24, at::kLong) * 7 % 500).view({2, 12});
  EXPECT_TRUE(at::equal(model.stages()->logits(tokens), model.logits(tokens)));
}

// Before: an operator failing inside forward reached the TorchScript interpreter, which rethrows it
// as std::runtime_error with the traceback: CausalLM's probe caught only c10::Error, so the library
// let a non-gradq error out (fuzz_torchscript, 2026-12-03: torchscript-unknown-quantizer.pt).
TEST(ModelChecks, AForwardFailingInsideAnOperatorIsOneLineError) {
  const std::string msg = error_of([] {
    CausalLM m(test::scripted_module(
        fmt::format("    return torch.zeros([{}]).index_select(0, tokens.view(-1) + 100)\n", kShape)));
  });
  EXPECT_NE(msg.find("the module's forward fails on int64 tokens [1, 2]: RuntimeError: index out of range in self"),
            std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

TEST(ModelChecks, NonFiniteLogitsNameTheWindow) {
  // Finite except in the third window (its first token is 7): -log(1 - 1) = +inf there.
  CausalLM m(test::scripted_module(fmt::format(
      "    x = torch.zeros([{}])\n    x[:, :, 3] = -torch.log(1.0 - (tokens[:, :1] == 7).float())\n    return x\n",
      kShape)));
  Windows w;
  w.inputs = at::zeros({4, 8}, at::kLong);
  w.inputs[2][0] = 7;
  w.targets = at::zeros({4, 8}, at::kLong);
  w.score_from = at::zeros({4}, at::kLong);
  GradualEvaluator evaluator(w, EvaluatorOptions{2});
  const std::string msg = error_of([&] { evaluator.set_reference(m); });
  EXPECT_NE(msg.find("NaN or infinite values in window 2 (of 4)"), std::string::npos) << msg;
  EXPECT_NE(error_of([&] { evaluator.evaluate(m); }).find("window 2"), std::string::npos);
  EvaluatorOptions unchecked{2};
  unchecked.check_finite = false;
  EXPECT_TRUE(std::isnan(GradualEvaluator(w, unchecked).evaluate(m).ppl.value));
}

TEST(ModelChecks, ContextLimitIsFoundAndNamed) {
  test::GptConfig config;
  config.layers = 2;
  CausalLM gpt(test::make_gpt_fixture(config));  // learned positions: 128
  EXPECT_EQ(accepted_context(gpt, 100), 100);
  EXPECT_EQ(accepted_context(gpt, 500), config.positions);
  EXPECT_NO_THROW(check_context(gpt, config.positions, "--ctx"));
  const std::string msg = error_of([&] { check_context(gpt, 256, "--ctx"); });
  EXPECT_NE(msg.find("--ctx 256 is longer than the model accepts: its forward works up to 128 tokens"),
            std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  CausalLM stories = load_model(test::stories_bin());
  EXPECT_EQ(accepted_context(stories, 4096), 512);
}

TEST(ModelChecks, DirectoryAsModel) {
  const std::string msg = error_of([] { load_model(test::temp_dir("model_dir")); });
  EXPECT_NE(msg.find("is a directory, expected a TorchScript file"), std::string::npos) << msg;
}

}  // namespace
}  // namespace gradq
