#pragma once
// Process-wide runtime settings: thread count and the location of the embedded default assets.

#include <string>

namespace gradq {

/// Process-wide TorchScript executor settings gradq relies on; called by CausalLM, idempotent.
void configure_runtime();

/// Sets intra-op threads for libtorch. Debian's libtorch starts at 1 thread, so gradq always sets
/// it; `threads <= 0` means all hardware cores.
void set_threads(int threads);

/// Directory holding the embedded default model, tokenizer and text (third_party/assets in the
/// source tree, share/gradq/assets when installed). Overridable with GRADQ_ASSETS.
std::string assets_dir();

/// gradq's version string (project version).
std::string version();

}  // namespace gradq
