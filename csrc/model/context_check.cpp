#include "model/context_check.h"

#include "common/error.h"
#include "common/error_text.h"

namespace gradq {
namespace {

bool accepts(const CausalLM& model, int64_t length, std::string* why) {
  try {
    model.logits(at::zeros({1, length}, at::kLong));
    return true;
  } catch (const std::exception& e) {  // c10::Error, torch::jit::JITException (a failed TorchScript assert)
    if (why) *why = essential_error_line(e);
  }
  return false;
}

}  // namespace

int64_t accepted_context(const CausalLM& model, int64_t length) {
  GRADQ_CHECK(length >= 1, "a window needs at least 1 token, got {}", length);
  if (accepts(model, length, nullptr)) return length;
  // Invariant: `lo` is accepted (0 trivially), `hi` is not.
  int64_t lo = 0, hi = length;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (accepts(model, mid, nullptr) ? lo : hi) = mid;
  }
  return lo;
}

void check_context(const CausalLM& model, int64_t length, const std::string& option) {
  GRADQ_CHECK(length >= 1, "{} must be at least 1, got {}", option, length);
  std::string why;
  if (accepts(model, length, &why)) return;
  const int64_t longest = accepted_context(model, length - 1 > 0 ? length - 1 : 1);
  GRADQ_CHECK(longest <= 0 || longest >= length, "{} {} is longer than the model accepts: its forward works up to {} tokens ({}); "
              "give {} {} or less", option, length, longest, why, option, longest);
  GRADQ_CHECK(longest > 0, "the model's forward fails on a window of {} tokens ({}), and on every shorter one", length, why);
}

}  // namespace gradq
