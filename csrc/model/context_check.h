#pragma once
// How long a window a model accepts. TorchScript carries no "max context" field, and a forward past
// the model's position table fails deep inside the graph with a multi-line traceback, so the
// length is found by running the forward: one pass of a single window when it fits, a binary search
// over lengths only when it does not (the error path).

#include <cstdint>
#include <string>

#include "model/causal_lm.h"

namespace gradq {

/// `length` when `model`'s forward accepts one window of `length` tokens, else the longest length
/// below it that it accepts (0 when none).
int64_t accepted_context(const CausalLM& model, int64_t length);

/// Throws gradq::Error unless `model` accepts windows of `length` tokens, naming `option`, the
/// length asked for and the longest the model accepts.
void check_context(const CausalLM& model, int64_t length, const std::string& option);

}  // namespace gradq
