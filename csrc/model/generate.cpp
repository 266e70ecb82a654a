#include "model/generate.h"

#include <algorithm>

#include "common/error.h"

namespace gradq {

std::vector<int64_t> generate_greedy(const CausalLM& model, const std::vector<int64_t>& prompt,
                                     const GenerateOptions& options, const std::function<void(int64_t)>& on_token) {
  GRADQ_CHECK(!prompt.empty(), "generation needs at least one prompt token (e.g. BOS)");
  GRADQ_CHECK(options.steps >= 0, "steps must be >= 0, got {}", options.steps);
  std::vector<int64_t> sequence = prompt;
  std::vector<int64_t> generated;
  for (int64_t step = 0; step < options.steps; ++step) {
    const int64_t n = static_cast<int64_t>(sequence.size());
    const int64_t start = options.max_context > 0 ? std::max<int64_t>(0, n - options.max_context) : 0;
    at::Tensor tokens = at::tensor(std::vector<int64_t>(sequence.begin() + start, sequence.end()), at::kLong).unsqueeze(0);
    const int64_t next = model.logits(tokens).select(1, -1).argmax(-1).item<int64_t>();
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), next) != options.stop_ids.end()) break;
    sequence.push_back(next);
    generated.push_back(next);
    if (on_token) on_token(next);
  }
  return generated;
}

}  // namespace gradq
