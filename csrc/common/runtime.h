#pragma once
// Process-wide runtime settings: thread count and the location of the embedded default assets.

#include <string>
#include <vector>

namespace gradq {

/// Process-wide TorchScript executor settings gradq relies on; called by CausalLM, idempotent.
void configure_runtime();

/// Upper bound of set_threads(): more threads than this per core only cost memory and switches.
constexpr int kMaxThreadsPerCore = 4;

/// The hardware threads (cores) this process may run on.
int hardware_threads();

/// The cores the one-minute load average leaves idle, at least 1 and at most hardware_threads().
int default_threads();

/// Sets intra-op threads for libtorch and returns the count set. Debian's libtorch starts at 1
/// thread, so gradq always sets it; 0 means default_threads(). Throws gradq::Error outside
/// [0, kMaxThreadsPerCore x hardware_threads()].
int set_threads(int threads);

/// Directory holding the embedded default model, tokenizer and text (third_party/assets in the
/// source tree, share/gradq/assets when installed). Overridable with GRADQ_ASSETS.
std::string assets_dir();

/// Where one of gradq's loadable modules (the SentencePiece shim, the GPU bench) is looked for, in
/// order: `install_name` beside the loaded libgradq.so (an installed gradq), then `build_path`, where
/// the build wrote it.
std::vector<std::string> module_candidates(const std::string& install_name, const std::string& build_path);

/// gradq's version string (project version).
std::string version();

}  // namespace gradq
