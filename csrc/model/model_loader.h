#pragma once
// One entry point for "a model path the user gave": TorchScript, or a llama2.c legacy checkpoint
// (*.bin) converted in memory.

#include <string>

#include "model/causal_lm.h"

namespace gradq {

/// Loads `path` as a CausalLM. Files ending in ".bin" are read as llama2.c checkpoints, anything
/// else as TorchScript.
CausalLM load_model(const std::string& path, const AdapterOptions& options = {});

/// The embedded default files (third_party/assets; see common/runtime.h).
std::string default_model_path();
std::string default_tokenizer_path();
std::string default_text_path();

}  // namespace gradq
