// Uses the installed gradq C++ API: the embedded default model, tokenizer and text, greedy
// generation and an evaluation. Exits non-zero if anything differs from the golden facts.
#include <gradq/common/runtime.h>
#include <gradq/data/dataset.h>
#include <gradq/eval/evaluator.h>
#include <gradq/model/generate.h>
#include <gradq/model/model_loader.h>
#include <gradq/tokenizer/tokenizer.h>

#include <iostream>

int main() {
  gradq::set_threads(1);
  auto tokenizer = gradq::Tokenizer::load_sentencepiece(gradq::default_tokenizer_path());
  gradq::CausalLM model = gradq::load_model(gradq::default_model_path());
  gradq::GenerateOptions opt;
  opt.steps = 12;
  const std::string text = tokenizer->decode(gradq::generate_greedy(model, {tokenizer->bos_id()}, opt));
  std::cout << "generated: " << text << "\n";
  if (text.rfind("Once upon a time, there was a little girl", 0) != 0) return 1;
  gradq::WindowSpec spec;
  spec.ctx = 128;
  spec.stride = 128;
  spec.bos_id = tokenizer->bos_id();
  spec.max_windows = 4;
  gradq::GradualEvaluator evaluator(gradq::make_windows(tokenizer->encode(gradq::read_text_file(gradq::default_text_path())), spec));
  evaluator.set_reference(model);
  gradq::EvalResult r = evaluator.evaluate(model);
  std::cout << "ppl " << r.ppl.value << " kl " << r.kl->mean.value << "\n";
  return (r.ppl.value > 1 && r.ppl.value < 20 && r.kl->mean.value < 1e-6) ? 0 : 1;
}
