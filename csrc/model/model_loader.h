#pragma once
// One entry point for "a model path the user gave": TorchScript, or a llama2.c legacy checkpoint
// (*.bin) converted in memory; and the one writer of TorchScript files.

#include <string>

#include "model/causal_lm.h"

namespace gradq {

/// Loads `path` as a CausalLM. Files ending in ".bin" are read as llama2.c checkpoints, anything
/// else as TorchScript.
CausalLM load_model(const std::string& path, const AdapterOptions& options = {});

/// Saves a module atomically with bytes that depend only on the module (Module::save(path) would
/// embed the temporary file's name in the zip).
void save_module(const torch::jit::Module& module, const std::string& path);

/// The embedded default files (third_party/assets; see common/runtime.h).
std::string default_model_path();
std::string default_tokenizer_path();
std::string default_text_path();

}  // namespace gradq
