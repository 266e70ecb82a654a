#pragma once
// Greedy decoding with any CausalLM.

#include <cstdint>
#include <functional>
#include <vector>

#include "model/causal_lm.h"

namespace gradq {

struct GenerateOptions {
  int64_t steps = 256;               ///< tokens to generate
  int64_t max_context = 0;           ///< keep only the last max_context tokens as input (0: all)
  std::vector<int64_t> stop_ids;     ///< stop after emitting one of these (not included)
};

/// Appends up to `steps` argmax tokens to `prompt`; returns only the generated ids. Calls
/// `on_token` with each id as it is produced (for streaming output).
std::vector<int64_t> generate_greedy(const CausalLM& model, const std::vector<int64_t>& prompt,
                                     const GenerateOptions& options,
                                     const std::function<void(int64_t)>& on_token = nullptr);

}  // namespace gradq
